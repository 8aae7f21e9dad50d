"""Make one version the stable one of a run's Triton repository, on disk: each model's ``config.pbtxt`` (the
version's serving knobs and ``version_policy: specific {versions: [V]}``), ``task.json``'s recommended model,
the lineage (``versions.json``) and the repository manifest, written last.

Used by loadtest's write-back (a tuned config as a new version, and its rollback) and by ``autoglm release``
(promote and roll back). Before anything is written the repository must be what its manifest says: every file's
hash, and each config as the manifest's knobs and stable version render it; otherwise it is refused untouched.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from autoglm.artifacts import Manifest, RunDir, atomic_output, sha256_file, verify_outputs, write_atomic
from autoglm.config import TritonModelSettings
from autoglm.errors import AutoGLMError
from autoglm.versions import FLAVOURS, VERSIONS_FILE, load_lineage, set_stable, with_versions, write_lineage


def render_configs(repo: Path, task_info: dict[str, Any], triton: dict[str, Any],
                   version: int | None = None, generate: dict[str, Any] | None = None) -> dict[str, str]:
    """``config.pbtxt`` text (by path relative to ``repo``) of every published model in every flavour present:
    the ``triton`` serving knobs on the batching models, ``generate``'s (``parameters`` and ``instances``; None:
    as written) on the generation model, which batches by itself, and, with ``version``, the policy serving that
    version; everything else as compress wrote it (device placement too)."""
    from autoglm.triton_config import DynamicBatching, with_model_parameters, with_serving_knobs

    try:
        t = TritonModelSettings(**triton)
    except ValueError as exc:
        raise AutoGLMError(f"serving config {triton} cannot be written: {exc}") from None
    batching = DynamicBatching(max_queue_delay_us=t.max_queue_delay_us,
                               preferred_batch_sizes=tuple(t.preferred_batch_sizes), max_queue_size=t.max_queue_size)
    batched = set(task_info["models"].values())
    texts = {}
    for name in sorted(batched | ({task_info["generate"]} if task_info.get("generate") else set())):
        for folder in FLAVOURS:
            config = repo / folder / name / "config.pbtxt"
            if not config.is_file():
                continue
            text = config.read_text()
            if name in batched:
                text = with_serving_knobs(text, max_batch_size=t.max_batch_size, batching=batching,
                                          instances=t.instances)
            elif generate:
                text = with_model_parameters(text, parameters=generate["parameters"], instances=generate["instances"])
            texts[f"{folder}/{name}/config.pbtxt"] = with_versions(text, [version]) if version else text
    return texts


def checked(run: RunDir) -> tuple[Manifest, Path, dict[str, Any], dict[str, Any]]:
    """(manifest, repository directory, task.json, lineage), after checking the files are the ones the manifest
    lists and each config is what the manifest's knobs and the stable version regenerate."""
    manifest = run.manifest("repository")
    repo = run.stage_dir("repository")
    verify_outputs(repo, manifest)
    task_info = json.loads((repo / "task.json").read_text())
    lineage = load_lineage(repo)
    drift = [rel for rel, text in render_configs(repo, task_info, manifest.config["triton"], lineage["stable"],
                                                 manifest.config.get("generate")).items()
             if (repo / rel).read_text() != text]
    if drift:
        raise AutoGLMError(f"{repo / drift[0]} does not hold the serving knobs of the manifest's config['triton'] "
                           f"and its stable version: the repository was changed another way; re-run `autoglm "
                           "compress --force` before releasing or writing a tuned config back")
    return manifest, repo, task_info, lineage


def commit(run: RunDir, manifest: Manifest, repo: Path, task_info: dict[str, Any], lineage: dict[str, Any],
           triton: dict[str, Any], recommended: str, version: int | None, by: str,
           serving: dict[str, Any] | None = None, generate: dict[str, Any] | None = None, **why: Any) -> list[str]:
    """Serve ``version`` with ``triton`` and ``recommended`` (and ``generate``'s knobs on the generation model;
    None: the manifest's): the configs, task.json, the lineage, then the manifest (last; new files of the
    repository are added to it). Returns the files that changed."""
    generate = generate if generate is not None else manifest.config.get("generate")
    texts = render_configs(repo, task_info, triton, version, generate)  # renders (and checks) all before any write
    info = {**task_info, "recommended": recommended}
    if isinstance(task_info.get("recommendation"), dict):
        # compress's reasoning stays; a release that serves another model says so
        choice = {k: v for k, v in task_info["recommendation"].items() if k != "served"}
        if task_info["models"].get(choice.get("variant")) != recommended:
            choice["served"] = {"model": recommended, "source": (serving or {}).get("source", by)}
        info["recommendation"] = choice
    changed = [rel for rel, text in texts.items() if (repo / rel).read_text() != text]
    for rel in changed:
        with atomic_output(repo / rel) as tmp:
            tmp.write_text(texts[rel])
            tmp.chmod(0o644)  # readable by a Triton running as another user, as compress writes it
    if info != task_info:
        write_atomic(repo / "task.json", (json.dumps(info, indent=2) + "\n").encode())
        (repo / "task.json").chmod(0o644)
        changed.append("task.json")
    if version is not None and version != lineage["stable"]:
        set_stable(lineage, version, by, **why)
    if version is not None and load_lineage(repo) != lineage:
        write_lineage(repo, lineage)
        changed.append(VERSIONS_FILE)
    new = [str(p.relative_to(repo)) for p in sorted(repo.rglob("*"))
           if p.is_file() and p.name != "manifest.json" and str(p.relative_to(repo)) not in manifest.outputs]
    for rel in [*changed, *new]:
        manifest.outputs[rel] = {"sha256": sha256_file(repo / rel), "size": (repo / rel).stat().st_size}
    manifest.config["triton"] = triton
    if generate is not None:
        manifest.config["generate"] = generate
    manifest.metrics["recommended"] = recommended
    manifest.metrics["lineage"] = lineage
    if serving is not None:
        manifest.metrics["serving"] = serving
    write_atomic(run.manifest_path("repository"), (manifest.to_json() + "\n").encode())
    return changed
