"""Numbered model versions in a Triton repository and their lineage, shared by compress (which adds a version),
loadtest's write-back (which adds one for a tuned serving config) and serve's release commands (which switch the
stable version).

A *version* is a repository-wide release number ``N``: every published model has ``<flavour>/<model>/<N>/``, and
the lineage (``versions.json`` in the repository, copied into the repository manifest's ``metrics["lineage"]``)
records for each version where it came from (stage, run, trial, variant), the serving knobs it was released with,
the sha256 of each of its files and when it was made. Triton's ``config.pbtxt`` is per model, not per version, so
it holds the serving knobs of the *stable* version and ``version_policy: specific {versions: [stable]}``: a plain
restart serves the stable version; a canary is loaded beside it through Triton's model control and requests are
addressed to ``/v2/models/<model>/versions/<N>/infer``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from pathlib import Path
from typing import Any

from autoglm.artifacts import sha256_file, write_atomic
from autoglm.errors import ConfigError, IntegrityError

VERSIONS_FILE = "versions.json"
FLAVOURS = ("python", "native")  # the repository folders compress writes


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def empty_lineage() -> dict[str, Any]:
    return {"stable": None, "versions": {}, "history": []}


def load_lineage(repo: Path) -> dict[str, Any]:
    """The repository's lineage (``versions.json``); an empty one where none was written yet."""
    path = Path(repo) / VERSIONS_FILE
    if not path.is_file():
        return empty_lineage()
    try:
        lineage = json.loads(path.read_text())
        lineage["versions"], lineage.setdefault("history", [])
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"{path} cannot be read ({exc}): re-run `autoglm compress --force`") from None
    return lineage


def write_lineage(repo: Path, lineage: dict[str, Any]) -> None:
    path = Path(repo) / VERSIONS_FILE
    write_atomic(path, (json.dumps(lineage, indent=2) + "\n").encode())
    path.chmod(0o644)


def next_version(lineage: dict[str, Any]) -> int:
    """One above every version the lineage has ever held (numbers are never reused)."""
    return 1 + max([int(v) for v in lineage["versions"]] + [h.get("version", 0) for h in lineage["history"]] + [0])


def version_dirs(repo: Path, version: int, models: list[str] | None = None) -> list[Path]:
    """``<flavour>/<model>/<version>`` directories present (of ``models`` only, where given)."""
    found = []
    for folder in FLAVOURS:
        for model_dir in sorted((Path(repo) / folder).glob("*")):
            if (models is None or model_dir.name in models) and (model_dir / str(version)).is_dir():
                found.append(model_dir / str(version))
    return found


def version_files(repo: Path, version: int) -> dict[str, str]:
    """sha256 of every file of ``version``, by path relative to ``repo``."""
    repo = Path(repo)
    return {str(p.relative_to(repo)): sha256_file(p) for d in version_dirs(repo, version)
            for p in sorted(d.rglob("*")) if p.is_file()}


def add_version(lineage: dict[str, Any], repo: Path, version: int, entry: dict[str, Any]) -> dict[str, Any]:
    """Record ``version`` (its files hashed now) as the stable one; returns its lineage entry."""
    record = {**entry, "created": now(), "files": version_files(repo, version)}
    lineage["versions"][str(version)] = record
    set_stable(lineage, version, entry["source"])
    return record


def set_stable(lineage: dict[str, Any], version: int, by: str, **why: Any) -> None:
    lineage["stable"] = version
    lineage["history"].append({"version": version, "by": by, "at": now(), **why})


def entry(lineage: dict[str, Any], version: int) -> dict[str, Any]:
    """The lineage entry of ``version``; ConfigError naming the versions there are."""
    record = lineage["versions"].get(str(version))
    if record is None:
        known = ", ".join(sorted(lineage["versions"], key=int)) or "none"
        raise ConfigError(f"version {version} is not in this repository's lineage (versions: {known}): name one "
                          "of those, or publish a new one with `autoglm compress --force`")
    return record


def check_version(repo: Path, lineage: dict[str, Any], version: int) -> dict[str, Any]:
    """``version``'s lineage entry, after checking each of its files against the sha256 recorded when it was
    made; IntegrityError naming the first file that changed or went missing."""
    record = entry(lineage, version)
    for rel, digest in record["files"].items():
        path = Path(repo) / rel
        actual = sha256_file(path) if path.is_file() else None
        if actual != digest:
            what = "is missing" if actual is None else f"was modified (sha256 {actual[:12]}… but {digest[:12]}… " \
                                                       "was recorded)"
            raise IntegrityError(f"version {version} cannot be served: {path} {what}; restore the file, or publish "
                                 "a fresh version with `autoglm compress --force`")
    return record


def link_version(repo: Path, source: int, version: int) -> None:
    """Make ``version`` a copy of ``source``'s files, hard-linked (no disk cost; files are only ever replaced
    by rename, never rewritten in place); a copy where links are refused (another file system)."""
    for src_dir in version_dirs(repo, source):
        dst_dir = src_dir.parent / str(version)
        if dst_dir.exists():
            shutil.rmtree(dst_dir)
        for src in sorted(p for p in src_dir.rglob("*") if p.is_file()):
            dst = dst_dir / src.relative_to(src_dir)
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)


def carried_versions(repo: Path, models: set[str]) -> dict[str, Any]:
    """The lineage to keep when compress publishes again: versions of ``models`` whose files are intact.
    Directories of other models, and versions whose files changed, are removed (they could not be released)."""
    repo = Path(repo)
    lineage = load_lineage(repo) if (repo / VERSIONS_FILE).is_file() else empty_lineage()
    for folder in FLAVOURS:
        for model_dir in (repo / folder).glob("*"):
            if model_dir.name not in models:
                shutil.rmtree(model_dir)
    kept = {}
    for number, record in lineage["versions"].items():
        files = {rel: h for rel, h in record["files"].items() if rel.split("/")[1] in models}
        intact = files and all((repo / rel).is_file() and sha256_file(repo / rel) == h for rel, h in files.items())
        if intact:
            kept[number] = {**record, "files": files}
        else:
            for d in version_dirs(repo, int(number)):
                shutil.rmtree(d)
    lineage["versions"] = kept
    if str(lineage["stable"]) not in kept:
        lineage["stable"] = None
    return lineage


def with_versions(text: str, versions: list[int] | tuple[int, ...]) -> str:
    """``config.pbtxt`` text serving exactly ``versions`` (``version_policy: specific``); the rest unchanged."""
    from autoglm.triton_config import parse_pbtxt
    from google.protobuf import text_format

    msg = parse_pbtxt(text)
    msg.version_policy.Clear()
    msg.version_policy.specific.versions.extend(sorted(set(versions)))
    return text_format.MessageToString(msg)


def served_versions(text: str) -> list[int]:
    """The versions a ``config.pbtxt`` names (empty: Triton's default policy, the latest)."""
    from autoglm.triton_config import parse_pbtxt

    msg = parse_pbtxt(text)
    return list(msg.version_policy.specific.versions) if msg.version_policy.HasField("specific") else []
