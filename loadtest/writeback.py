"""The verified serving config written back into the run's Triton repository, its rollback, and capacity records.

A write-back sets the verified knobs in every published variant's ``config.pbtxt`` (python and native
flavours; :func:`autoglm.triton_config.with_serving_knobs` keeps the rest as compress wrote it), names the verified
variant in ``task.json``, and rewrites the repository manifest: new output hashes (the stage stays
complete), ``config["triton"]`` with the knobs, ``metrics["serving"]`` with the lineage (the loadtest
report that chose it) and the config it replaced. ``autoglm loadtest --rollback`` restores that one.

Before anything is written, the current files with the manifest's own knobs set must come out byte for byte
as they are: a repository whose configs disagree with its manifest is refused, never half-rewritten.
The generation model (it batches by itself) is left as it is.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from autoglm.artifacts import RunDir, atomic_output, sha256_file, verify_outputs, write_atomic
from autoglm.config import Settings, TritonModelSettings
from autoglm.errors import AutoGLMError

SOURCE, ROLLBACK = "loadtest --tune", "loadtest --rollback"
KNOBS = ("max_batch_size", "max_queue_delay_us", "preferred_batch_sizes", "instances")
FLAVOURS = ("python", "native")  # the repository folders compress writes


def capacity_record(settings: Settings, live_config: dict[str, Any] | None) -> dict[str, Any]:
    """Where a capacity was measured: the repository flavour Triton served, the device kind of the model's
    instances and the host Triton ran on (deploy refuses capacity from another flavour or device kind)."""
    live = live_config or {}
    if live.get("backend") == "python":
        flavour = "python"
    elif live.get("platform") in ("onnxruntime_onnx", "tensorrt_plan"):
        flavour = "native"
    else:  # Triton not reachable: what serve was told to start
        flavour = settings.serve.flavour
    groups = live.get("instance_group") or [{}]
    kind = "gpu" if any(g.get("kind") == "KIND_GPU" for g in groups) else "cpu"
    triton_url = settings.loadtest.urls(settings.serve)[1]
    host = urlsplit(triton_url).hostname or ""
    if host in ("localhost", "::1", "0.0.0.0") or host.startswith("127."):
        host = socket.gethostname()
    return {"capacity_flavour": flavour, "device_kind": kind, "host": host}


def render_configs(repo: Path, task_info: dict[str, Any], triton: dict[str, Any]) -> dict[str, str]:
    """``config.pbtxt`` text (by path relative to ``repo``) of every published variant in every flavour present,
    with the ``triton`` serving knobs and everything else as compress wrote it (device placement included)."""
    from autoglm.triton_config import DynamicBatching, with_serving_knobs

    try:
        t = TritonModelSettings(**triton)
    except ValueError as exc:
        raise AutoGLMError(f"serving config {triton} cannot be written: {exc}") from None
    batching = DynamicBatching(max_queue_delay_us=t.max_queue_delay_us,
                               preferred_batch_sizes=tuple(t.preferred_batch_sizes), max_queue_size=t.max_queue_size)
    texts = {}
    for name in sorted(set(task_info["models"].values())):
        for folder in FLAVOURS:
            config = repo / folder / name / "config.pbtxt"
            if config.is_file():
                texts[f"{folder}/{name}/config.pbtxt"] = with_serving_knobs(
                    config.read_text(), max_batch_size=t.max_batch_size, batching=batching, instances=t.instances)
    return texts


def _checked(run: RunDir):
    """The repository manifest and task.json, after checking the files are the ones the manifest regenerates."""
    manifest = run.manifest("repository")
    repo = run.stage_dir("repository")
    verify_outputs(repo, manifest)
    task_info = json.loads((repo / "task.json").read_text())
    drift = [rel for rel, text in render_configs(repo, task_info, manifest.config["triton"]).items()
             if (repo / rel).read_text() != text]
    if drift:
        raise AutoGLMError(f"{repo / drift[0]} does not hold the serving knobs of the manifest's "
                           f"config['triton']: the repository was changed another way; re-run `autoglm compress "
                           "--force` before writing a tuned config back")
    return manifest, repo, task_info


def _commit(run: RunDir, manifest, repo: Path, task_info: dict, triton: dict, recommended: str,
            serving: dict) -> list[str]:
    """Write the configs, task.json, then the manifest (last); returns the files that changed."""
    texts = render_configs(repo, task_info, triton)  # renders (and checks) all before anything is written
    info = {**task_info, "recommended": recommended}
    if isinstance(task_info.get("recommendation"), dict):  # compress's reasoning stays; a write-back that serves
        choice = {k: v for k, v in task_info["recommendation"].items() if k != "served"}  # another model says so
        if task_info["models"].get(choice.get("variant")) != recommended:
            choice["served"] = {"model": recommended, "source": serving["source"]}
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
    for rel in changed:
        manifest.outputs[rel] = {"sha256": sha256_file(repo / rel), "size": (repo / rel).stat().st_size}
    manifest.config["triton"] = triton
    manifest.metrics["recommended"] = recommended
    manifest.metrics["serving"] = serving
    write_atomic(run.manifest_path("repository"), (manifest.to_json() + "\n").encode())
    return changed


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def write_back(run: RunDir, verified: dict[str, Any], lineage: dict[str, Any]) -> dict[str, Any]:
    """Make ``verified`` (a loadtest config: model and knobs) the repository's config; returns the serving record
    written into the repository manifest, with the files that changed."""
    manifest, repo, task_info = _checked(run)
    old = dict(manifest.config["triton"])
    preferred = list(verified["preferred_batch_sizes"] or [])
    if preferred == [verified["max_batch_size"]]:
        preferred = []  # compress's spelling of "prefer the largest batch"; Triton serves [] as exactly that
    triton = {**old, "max_batch_size": verified["max_batch_size"], "max_queue_delay_us": verified["max_queue_delay_us"],
              "preferred_batch_sizes": preferred, "instances": verified["instances"],
              "max_queue_size": verified.get("max_queue_size") or 0}  # the unbounded queue it was measured with
    previous = {"triton": old, "recommended": task_info["recommended"]}
    earlier = manifest.metrics.get("serving") or {}
    if earlier.get("source") == SOURCE and previous == {"triton": triton, "recommended": verified["model"]}:
        previous = earlier["previous"]  # the same config verified again: a rollback still undoes the first
    serving = {"source": SOURCE, **lineage, "previous": previous,
               "verified": {"model": verified["model"], **{k: triton[k] for k in KNOBS}}, "written_at": _now()}
    changed = _commit(run, manifest, repo, task_info, triton, verified["model"], serving)
    return {**serving, "changed": changed}


def rollback(run: RunDir) -> dict[str, Any]:
    """Restore the config the last write-back replaced (files, task.json, manifest); returns what was restored."""
    manifest, repo, task_info = _checked(run)
    serving = manifest.metrics.get("serving") or {}
    if serving.get("source") != SOURCE:
        why = "it was rolled back already" if serving.get("source") == ROLLBACK else "its config is compress's own"
        raise AutoGLMError(f"nothing to roll back in {repo}: {why}. Set compress.triton and re-run `autoglm compress "
                           "--force` for another config")
    previous = serving["previous"]
    record = {"source": ROLLBACK, "restored": previous, "rolled_back": serving["verified"],
              "loadtest": serving.get("loadtest"), "written_at": _now()}
    changed = _commit(run, manifest, repo, task_info, previous["triton"], previous["recommended"], record)
    return {**record, "changed": changed}


def rollback_run(settings: Settings) -> int:
    """``autoglm loadtest --rollback``: the CLI's entry; prints what it restored."""
    run = RunDir(settings.run.root, settings.run.name)
    record = rollback(run)
    restored = record["restored"]
    print(f"loadtest: rolled back {run.stage_dir('repository')} to {restored['recommended']} with "
          f"{ {k: restored['triton'].get(k) for k in KNOBS} } ({len(record['changed'])} files); restart "
          "`autoglm serve` to serve it")
    return 0
