"""The verified serving config written back into the run's Triton repository, its rollback, and capacity records.

A write-back publishes a new numbered version (the stable version's model files, hard-linked) and makes it the
stable one (:mod:`autoglm.releases`): the verified knobs in every published variant's ``config.pbtxt`` (python and
native flavours; :func:`autoglm.triton_config.with_serving_knobs` keeps the rest as compress wrote it), the
verified variant in ``task.json``, a lineage entry for the version (the loadtest report that chose it, the version
it came from) and the repository manifest: new output hashes (the stage stays complete), ``config["triton"]``
with the knobs, ``metrics["serving"]`` with the config it replaced. ``autoglm loadtest --rollback`` (or ``autoglm
release rollback``) restores that one and its version; the written-back version stays in the lineage.

Before anything is written, the current files with the manifest's own knobs set must come out byte for byte
as they are: a repository whose configs disagree with its manifest is refused, never half-rewritten.
The generation model (it batches by itself) keeps its config through a batching write-back (it gets the new
version number too); a ``--scenario generate`` write-back sets its own knobs instead (model parameters and
instance count, recorded as the manifest's ``config["generate"]``) and leaves the batching models' as they are.
"""

from __future__ import annotations

import socket
from typing import Any
from urllib.parse import urlsplit

from autoglm.artifacts import RunDir
from autoglm.config import Settings
from autoglm.errors import AutoGLMError
from autoglm.releases import checked, commit, render_configs
from autoglm.versions import FLAVOURS, add_version, link_version, next_version, now

SOURCE, ROLLBACK = "loadtest --tune", "loadtest --rollback"
KNOBS = ("max_batch_size", "max_queue_delay_us", "preferred_batch_sizes", "instances")


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


def generate_knobs(repo, task_info: dict[str, Any], names) -> dict[str, Any]:
    """The generation model's ``names`` parameters and instance count as its config.pbtxt holds them now."""
    from autoglm.triton_config import parse_pbtxt

    model = task_info["generate"]
    path = next(p for folder in FLAVOURS if (p := repo / folder / model / "config.pbtxt").is_file())
    msg = parse_pbtxt(path.read_text())
    return {"parameters": {k: msg.parameters[k].string_value for k in sorted(names) if k in msg.parameters},
            "instances": msg.instance_group[0].count if msg.instance_group else 1}


def write_back(run: RunDir, verified: dict[str, Any], origin: dict[str, Any]) -> dict[str, Any]:
    """Make ``verified`` (a loadtest config: model and knobs) the repository's config; returns the serving record
    written into the repository manifest, with the files that changed. ``origin`` (the loadtest report that
    verified it) goes into the record and the new version's lineage."""
    manifest, repo, task_info, lineage = checked(run)
    if verified.get("parameters") is not None:
        return _write_back_generate(run, manifest, repo, task_info, lineage, verified, origin)
    old = dict(manifest.config["triton"])
    preferred = list(verified["preferred_batch_sizes"] or [])
    if preferred == [verified["max_batch_size"]]:
        preferred = []  # compress's spelling of "prefer the largest batch"; Triton serves [] as exactly that
    triton = {**old, "max_batch_size": verified["max_batch_size"], "max_queue_delay_us": verified["max_queue_delay_us"],
              "preferred_batch_sizes": preferred, "instances": verified["instances"],
              "max_queue_size": verified.get("max_queue_size") or 0}  # the unbounded queue it was measured with
    stable = lineage["stable"]
    previous = {"triton": old, "recommended": task_info["recommended"], "version": stable}
    earlier = manifest.metrics.get("serving") or {}
    version = stable
    if {"triton": triton, "recommended": verified["model"]} == {k: previous[k] for k in ("triton", "recommended")}:
        if earlier.get("source") == SOURCE:  # the same config verified again: a rollback still undoes the first
            previous = earlier["previous"]
    elif stable is not None:  # a new version: the stable one's files with the verified config
        version = next_version(lineage)
        render_configs(repo, task_info, triton, version)  # refuses an impossible config before any file is made
        link_version(repo, stable, version)
        add_version(lineage, repo, version, {"source": SOURCE, "parent": stable, **origin,
                                             "variants": task_info["models"], "recommended": verified["model"],
                                             "triton": triton})
    serving = {"source": SOURCE, **origin, "previous": previous, "version": version,
               "verified": {"model": verified["model"], **{k: triton[k] for k in KNOBS}}, "written_at": now()}
    changed = commit(run, manifest, repo, task_info, lineage, triton, verified["model"], version, SOURCE, serving)
    return {**serving, "changed": changed}


def _write_back_generate(run: RunDir, manifest, repo, task_info: dict[str, Any], lineage: dict[str, Any],
                         verified: dict[str, Any], origin: dict[str, Any]) -> dict[str, Any]:
    """The generation model's verified knobs (model parameters and instance count) as a new version."""
    if verified["model"] != task_info.get("generate"):
        raise AutoGLMError(f"'{verified['model']}' is not the repository's generation model "
                           f"({task_info.get('generate')}): only its knobs are model parameters")
    new = {"parameters": dict(sorted(verified["parameters"].items())), "instances": verified["instances"]}
    old = generate_knobs(repo, task_info, new["parameters"])
    triton, stable = manifest.config["triton"], lineage["stable"]
    previous = {"triton": triton, "recommended": task_info["recommended"], "version": stable, "generate": old}
    earlier = manifest.metrics.get("serving") or {}
    version = stable
    if new == old:
        if earlier.get("source") == SOURCE:  # the same config verified again: a rollback still undoes the first
            previous = earlier["previous"]
    elif stable is not None:
        version = next_version(lineage)
        render_configs(repo, task_info, triton, version, new)  # refuses an impossible config before any file is made
        link_version(repo, stable, version)
        add_version(lineage, repo, version, {"source": SOURCE, "parent": stable, **origin,
                                             "variants": task_info["models"], "recommended": task_info["recommended"],
                                             "triton": triton, "generate": new})
    serving = {"source": SOURCE, **origin, "previous": previous, "version": version,
               "verified": {"model": verified["model"], **new}, "written_at": now()}
    changed = commit(run, manifest, repo, task_info, lineage, triton, task_info["recommended"], version, SOURCE,
                     serving, generate=new)
    return {**serving, "changed": changed}


def rollback(run: RunDir) -> dict[str, Any]:
    """Restore the config the last write-back replaced (files, task.json, manifest); returns what was restored."""
    manifest, repo, task_info, lineage = checked(run)
    serving = manifest.metrics.get("serving") or {}
    if serving.get("source") != SOURCE:
        why = "it was rolled back already" if serving.get("source") == ROLLBACK else "its config is compress's own"
        raise AutoGLMError(f"nothing to roll back in {repo}: {why}. Set compress.triton and re-run `autoglm compress "
                           "--force` for another config")
    previous = serving["previous"]
    record = {"source": ROLLBACK, "restored": previous, "rolled_back": serving["verified"],
              "loadtest": serving.get("loadtest"), "written_at": now()}
    version = previous.get("version", lineage["stable"])
    changed = commit(run, manifest, repo, task_info, lineage, previous["triton"], previous["recommended"], version,
                     ROLLBACK, record, generate=previous.get("generate"), rolled_back=serving.get("version"))
    return {**record, "changed": changed}


def rollback_run(settings: Settings) -> int:
    """``autoglm loadtest --rollback``: the CLI's entry; prints what it restored."""
    run = RunDir(settings.run.root, settings.run.name)
    record = rollback(run)
    restored = record["restored"]
    knobs = restored.get("generate") or {k: restored['triton'].get(k) for k in KNOBS}
    print(f"loadtest: rolled back {run.stage_dir('repository')} to {restored['recommended']} with {knobs} "
          f"({len(record['changed'])} files); restart `autoglm serve` to serve it")
    return 0
