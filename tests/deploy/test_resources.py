"""Triton's resource requests and limits follow what loadtest measured at the deployed config (CPU-seconds per
request at the autoscaler's target, peak RSS with headroom); without a measurement the defaults stay and say so."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from autoglm.config import DeploySettings
from autoglm.errors import AutoGLMError
from deploy import render_run
from deploy.resources import DEFAULT_RESOURCES, MEASURE
from tests.deploy.conftest import TRITON, complete_loadtest
from tests.deploy.test_manifests import kubectl, validate

# the config the fixture repository deploys, as loadtest records it (no preferred sizes are served as [max])
DEPLOYED = {"model": "digits-int8", "max_queue_delay_us": 0, "preferred_batch_sizes": [64], "instances": 2,
            "max_batch_size": 64}
# 120 req/s per instance x 2 instances: 240 req/s per pod, the HPA's target 240 / 1.5 = 160 req/s per pod;
# 0.05 J/request at 10 W per core = 5 ms of CPU per request
MEASURED = {"capacity_rps": 240.0, "energy_method": "estimated:cpu-s×10W", "j_per_request": 0.05,
            "scenario": "triton", "peak_rss_mib": 612.4}


def _render(published, **options):
    settings, rundir, keys = published
    deploy = settings.deploy.model_dump() | {"api_keys_file": keys, "kustomize": False} | options
    manifest = render_run(settings.model_copy(update={"deploy": DeploySettings.model_validate(deploy)}), force=True)
    return manifest, rundir.stage_dir("deploy") / "out" / deploy["env"]


def _triton(docs: list[dict]) -> tuple[dict, dict]:
    """The Triton Deployment and the container's resources among rendered objects."""
    deployment = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "autoglm-triton")
    container = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "triton")
    return deployment, container["resources"]


def _patch(out, env="cpu") -> tuple[dict, dict]:
    return _triton([yaml.safe_load((out / f"k8s/overlays/{env}/triton.yaml").read_text())])


@kubectl
def test_measured_cpu_and_memory_flow_into_the_built_manifests_consistent_with_the_hpa(published):
    complete_loadtest(published[1], 120.0, DEPLOYED, **MEASURED)
    manifest, out = _render(published, kustomize=True)
    docs = [d for d in yaml.safe_load_all((out / "rendered.yaml").read_text()) if d]
    deployment, resources = _triton(docs)
    # request: 5 ms x 160 req/s = 0.8 cores; limit: 5 ms x 240 req/s x 1.5 = 1.8 cores; memory: 612.4 MiB x 1.5
    assert resources == {"requests": {"cpu": "800m", "memory": "919Mi"},
                         "limits": {"cpu": "1800m", "memory": "919Mi"}}
    hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler" and d["metadata"]["name"] == "autoglm-triton")
    rps = next(m["pods"]["target"]["averageValue"] for m in hpa["spec"]["metrics"]
               if m["pods"]["metric"]["name"] == "autoglm_triton_requests_per_second")
    assert rps == "160000m" and int(resources["requests"]["cpu"][:-1]) == 0.005 * int(rps[:-1])  # one target, both
    annotations = deployment["metadata"]["annotations"]
    assert annotations["autoglm.dev/resources-source"] == "measured"
    assert "5 ms CPU per request" in annotations["autoglm.dev/resources"] and "612 MiB" in annotations[
        "autoglm.dev/resources"]
    validate(deployment)
    assert manifest.metrics["triton_resources"]["measured"] == ["cpu", "memory"]
    assert "loadtest/manifest.json" in manifest.inputs
    assert "919Mi" in (out / "README.md").read_text()


def test_keda_targets_the_same_load_the_cpu_request_is_sized_for(published):
    complete_loadtest(published[1], 120.0, DEPLOYED, **MEASURED)
    _, out = _render(published, autoscaler="keda")
    docs = yaml.safe_load_all((out / "k8s/base/serving.yaml").read_text())
    scaled = next(d for d in docs if d and d["kind"] == "ScaledObject")
    threshold = next(t["metadata"]["threshold"] for t in scaled["spec"]["triggers"] if t["name"].endswith("second"))
    assert float(threshold) == 160.0 and _patch(out)[1]["requests"]["cpu"] == "800m"


def test_gpu_overlay_keeps_its_gpu_and_sets_no_cpu_limit(published):
    complete_loadtest(published[1], 120.0, DEPLOYED, **MEASURED)
    _, out = _render(published, env="gpu")
    assert _patch(out, "gpu")[1] == {"requests": {"cpu": "800m", "memory": "919Mi", "nvidia.com/gpu": "1"},
                                     "limits": {"memory": "919Mi", "nvidia.com/gpu": "1"}}


def test_memory_headroom_is_configurable_and_validated(published):
    complete_loadtest(published[1], 120.0, DEPLOYED, **MEASURED)
    _, out = _render(published, resources={"memory_headroom": 2.0, "cpu_limit_headroom": 1.0})
    assert _patch(out)[1]["limits"] == {"cpu": "1200m", "memory": "1225Mi"}
    with pytest.raises(ValidationError, match="memory_headroom"):
        DeploySettings.model_validate({"resources": {"memory_headroom": 0.5}})


def test_without_a_loadtest_the_defaults_stay_and_the_annotation_names_the_command(published):
    manifest, out = _render(published)
    deployment, resources = _patch(out)
    assert resources == DEFAULT_RESOURCES["cpu"]
    assert deployment["metadata"]["annotations"]["autoglm.dev/resources-source"] == "default"
    assert f"`{MEASURE}` measures it" in deployment["metadata"]["annotations"]["autoglm.dev/resources"]
    assert manifest.metrics["triton_resources"]["measured"] == []


def test_loadtest_of_another_config_leaves_the_defaults(published):
    complete_loadtest(published[1], 120.0, DEPLOYED | {"instances": 1}, **MEASURED)
    _, out = _render(published)
    assert _patch(out)[1] == DEFAULT_RESOURCES["cpu"]


@pytest.mark.parametrize("record, cpu, memory, says", [
    # a hardware counter gives joules, not CPU-seconds: the CPU stays the default, the memory is measured
    (MEASURED | {"energy_method": "rapl"}, DEFAULT_RESOURCES["cpu"]["requests"]["cpu"], "919Mi", "hardware counter"),
    # an older loadtest without a peak RSS: memory stays the default
    ({k: v for k, v in MEASURED.items() if k != "peak_rss_mib"}, "800m", "2Gi", "no peak RSS"),
    # measured through the gateway: used, and said to include the gateway's processes
    (MEASURED | {"scenario": "task"}, "800m", "919Mi", "upper bound for Triton"),
])
def test_partial_measurements_say_what_they_are(published, record, cpu, memory, says):
    complete_loadtest(published[1], 120.0, DEPLOYED, **record)
    _, out = _render(published)
    deployment, resources = _patch(out)
    assert (resources["requests"]["cpu"], resources["requests"]["memory"]) == (cpu, memory)
    assert says in deployment["metadata"]["annotations"]["autoglm.dev/resources"]


@pytest.mark.parametrize("bad, field", [
    ({"peak_rss_mib": "lots"}, "peak_rss_mib"),
    ({"peak_rss_mib": -3.0}, "peak_rss_mib"),
    ({"j_per_request": float("nan")}, "j_per_request"),
    ({"j_per_request": None}, "no j_per_request"),
    ({"energy_method": "estimated:cpu-s"}, "energy_method"),
])
def test_malformed_loadtest_fields_are_refused_before_the_last_render_is_touched(published, bad, field):
    _, out = _render(published)  # a good render first
    complete_loadtest(published[1], 120.0, DEPLOYED, **(MEASURED | bad))
    with pytest.raises(AutoGLMError, match=field) as error:
        _render(published)
    assert "autoglm loadtest --force" in str(error.value)
    assert published[1].state("deploy") == "complete" and (out / "k8s/overlays/cpu/triton.yaml").is_file()
