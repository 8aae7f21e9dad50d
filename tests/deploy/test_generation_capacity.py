"""Deploy sizes a run's generation model by its verified :generate capacity (tokens/s per instance): the same
flavour and device-kind refusal as the predict capacity, the knobs it was verified at, and loadtest's per-workload
records (a predict loadtest after the generate one keeps both)."""

from __future__ import annotations

import json

from autoglm.artifacts import StageWriter, write_atomic
from autoglm.config import DeploySettings
from deploy import render_run
from deploy.capacity import workload_record
from deploy.scaling import TOKENS, quantity

GEN = "digits-generate"
NATIVE_CPU = {"capacity_flavour": "native", "device_kind": "cpu", "host": "ci-host"}
VERIFIED = {"model": GEN, "instances": 2, "parameters": {"max_sequences": "16", "stream_interval_ms": "5"}}


def _add_generation_model(rundir, max_sequences: int = 16, kind: str = "KIND_CPU") -> None:
    """The repository with a generation model (its config.pbtxt holds its knobs), manifest rewritten over it."""
    repo, before = rundir.stage_dir("repository"), rundir.manifest("repository")
    info = json.loads((repo / "task.json").read_text()) | {"generate": GEN}
    write_atomic(repo / "task.json", (json.dumps(info, indent=2) + "\n").encode())
    write_atomic(repo / "native" / GEN / "config.pbtxt", (
        f'name: "{GEN}"\ninstance_group [{{ count: 2 kind: {kind} }}]\n'
        f'parameters {{ key: "max_sequences" value {{ string_value: "{max_sequences}" }} }}\n'
        'parameters { key: "stream_interval_ms" value { string_value: "5" } }\n').encode())
    write_atomic(repo / "native" / GEN / "1" / "model.py", b"# placeholder")
    writer = StageWriter(rundir, "repository", before.config, inputs=["compress"])
    for path in sorted(p for p in repo.rglob("*") if p.is_file() and p.name != "manifest.json"):
        writer.add_output(str(path.relative_to(repo)))
    writer.manifest.metrics = before.metrics
    writer.commit()


def _loadtest(rundir, workloads: dict) -> None:
    writer = StageWriter(rundir, "loadtest", {"scenario": "generate"}, inputs=["repository"])
    latest = workloads[next(reversed(workloads))]
    writer.manifest.metrics = {**latest, "workloads": workloads}
    writer.commit()


GENERATE = {"mode": "tune", "scenario": "generate", "recommended": VERIFIED, "capacity_per_instance_tps": 900.0,
            "capacity_per_instance_rps": 14.0, "ttft_p95_ms": 120.0, "itl_p95_ms": 4.0, "instances": 2, **NATIVE_CPU}
PREDICT = {"mode": "sweep", "scenario": "triton", "capacity_per_instance_rps": 180.0, "p95_ms": 9.0, "instances": 2,
           "recommended": {"model": "digits-int8", "max_queue_delay_us": 0, "preferred_batch_sizes": [64],
                           "instances": 2, "max_batch_size": 64}, **NATIVE_CPU}


def _render(published, **options):
    settings, _, keys = published
    deploy = settings.deploy.model_dump() | {"api_keys_file": keys, "kustomize": False} | options
    return render_run(settings.model_copy(update={"deploy": DeploySettings.model_validate(deploy)}), force=True)


def _hpa(manifest, rundir, env="cpu"):
    import yaml

    text = (rundir.stage_dir("deploy") / "out" / env / "k8s" / "base" / "serving.yaml").read_text()
    return next(d for d in yaml.safe_load_all(text) if d and d.get("kind") == "HorizontalPodAutoscaler")


def test_a_verified_generate_capacity_sizes_the_generation_model_beside_the_predict_one(published):
    _, rundir, _ = published
    _add_generation_model(rundir)
    _loadtest(rundir, {"predict": PREDICT, "generate": GENERATE})

    manifest = _render(published)

    gen = manifest.metrics["generation_capacity"]
    assert gen["measured"] and gen["tokens_per_s_per_instance"] == 900.0 and gen["instances_per_pod"] == 2
    assert gen["source"] == ("verified by `loadtest --scenario generate --tune`: 900 tokens/s per instance at TTFT "
                             "p95 120 ms, inter-token p95 4.0 ms on the native flavour, cpu (host ci-host)")
    # the predict models keep their own record although the generate run was the latest
    assert manifest.metrics["capacity_measured"] and manifest.metrics["capacity_rps_per_instance"] == 180.0
    metrics = {m["pods"]["metric"]["name"]: m["pods"]["target"]["averageValue"]
               for m in _hpa(manifest, rundir)["spec"]["metrics"]}
    assert metrics[TOKENS.name] == quantity(1200)  # 900 tokens/s x 2 instances / the rule's up factor 1.5
    rules = (rundir.stage_dir("deploy") / "out" / "cpu" / "k8s" / "monitoring" / "adapter-rules.yaml").read_text()
    assert TOKENS.source in rules


def test_a_generate_capacity_from_another_device_kind_or_config_is_refused_naming_both(published):
    _, rundir, _ = published
    _add_generation_model(rundir, kind="KIND_GPU")
    _loadtest(rundir, {"generate": GENERATE})

    refused = _render(published).metrics["generation_capacity"]
    assert not refused["measured"]
    assert ("loadtest measured 900 tokens/s per instance on the native flavour, cpu (host ci-host), but the cpu "
            f"overlay serves {GEN} on the native flavour, gpu: measure there, or set "
            "deploy.allow_capacity_mismatch=true") in refused["source"]
    assert _render(published, allow_capacity_mismatch=True).metrics["generation_capacity"]["measured"]

    _add_generation_model(rundir, max_sequences=64)  # the repository now serves other decode slots
    _loadtest(rundir, {"generate": GENERATE})
    other = _render(published).metrics["generation_capacity"]
    assert not other["measured"] and "max_sequences 16 (deployed: 64)" in other["source"]
    assert TOKENS.source not in (rundir.stage_dir("deploy") / "out" / "cpu" / "k8s" / "monitoring"
                                 / "adapter-rules.yaml").read_text()


def test_an_unverified_or_missing_generate_capacity_is_said_and_a_predict_only_manifest_reads_as_before(published):
    _, rundir, _ = published
    _add_generation_model(rundir)
    _loadtest(rundir, {"generate": GENERATE | {"mode": "single"}})
    metrics = _render(published).metrics
    assert "run it with --tune" in metrics["generation_capacity"]["source"]
    assert "loadtest measured only the generation model" in metrics["capacity_source"]

    old = {"capacity_per_instance_rps": 120.0, "scenario": "triton"}  # a manifest older than the records
    assert workload_record(old, "predict") is old and workload_record(old, "generate") is None
    assert workload_record({"scenario": "generate"}, "predict") is None
