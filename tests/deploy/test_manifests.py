"""Rendered manifests validate offline (Kubernetes schemas, kustomize, promtool) and say what the rules say."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import grpc
import pytest
import yaml

import jsonschema

from autoglm.autoscaling import AutoscaleRules
from autoglm.config import load_settings
from autoglm.local_http import DIRECT
from deploy import render_run
from deploy.render import find_kubectl
from deploy.scaling import SERIES, hpa_behavior, hpa_limit
from serve.triton import free_ports
from tests.deploy.conftest import KEY_LINE, publish_repository

K8S_VERSION = "1.32"  # the kubectl here; the bundled schemas of kubernetes-validate include it
kubectl = pytest.mark.skipif(find_kubectl()[0] is None, reason=f"kustomize not run: {find_kubectl()[1]}")
CRDS = Path(__file__).parent / "crds"  # custom kinds: schemas cut from their CRDs (see crds/cut.py)
CUSTOM = {p.stem: json.loads(p.read_text()) for p in CRDS.glob("*.json")}


def validate(obj: dict) -> None:
    """``obj`` against its schema: a CRD's cut schema for custom kinds, Kubernetes' own (strict) for the rest."""
    if obj["kind"] in CUSTOM:
        jsonschema.validate(obj, CUSTOM[obj["kind"]], cls=jsonschema.Draft202012Validator)
    else:
        kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (offline schemas)")
        kv.validate(obj, K8S_VERSION, strict=True)  # strict: unknown fields are errors too


@pytest.fixture(scope="module")
def release_run(tmp_path_factory):
    """A published run, rendered for gpu and cpu with tune workers and their in-cluster PostgreSQL."""
    root = tmp_path_factory.mktemp("deploy")
    rundir = publish_repository(root / "runs")
    keys = root / "keys.txt"
    keys.write_text(KEY_LINE)
    for env, more in (("cpu", ["deploy.ingress.host='api.example.com'", "deploy.ingress.tls_secret='api-tls'",
                               "deploy.ingress.class_name='nginx'"]), ("gpu", [])):
        render_run(load_settings(None, [f"run.root='{root / 'runs'}'", "run.name='rel'", f"deploy.env='{env}'",
                                        f"deploy.api_keys_file='{keys.as_posix()}'", "deploy.tune_workers=3", *more]))
    return rundir


@pytest.fixture(scope="module")
def edge(release_run):
    """The same repository rendered with KEDA, the Gateway API and labelled monitors (run 'edge', cpu)."""
    root = release_run.path.parent
    rundir = publish_repository(root, "edge")
    render_run(load_settings(None, [f"run.root='{root}'", "run.name='edge'", "deploy.autoscaler='keda'",
                                    f"deploy.api_keys_file='{(root.parent / 'keys.txt').as_posix()}'",
                                    "deploy.ingress.host='api.example.com'", "deploy.ingress.api='gateway-api'",
                                    "deploy.ingress.class_name='istio'",
                                    "deploy.monitor_labels={release='kube-prometheus-stack'}"]))
    return rundir.stage_dir("deploy") / "out" / "cpu"


@pytest.fixture(scope="module")
def rendered(release_run):
    return release_run.stage_dir("deploy") / "out"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _objects(out: Path) -> list[tuple[str, dict]]:
    """Every Kubernetes object of a render: the kustomize builds where kubectl exists, else the source files."""
    if (out / "rendered.yaml").is_file():
        files = [out / "rendered.yaml", out / "rendered-tune.yaml"]
    else:
        files = [*sorted((out / "k8s/base").glob("[!k]*.yaml")), out / "k8s/tune/tune.yaml"]  # not kustomization
    files = [f for f in files if f.is_file()]
    return [(f.name, d) for f in files for d in _docs(f)]


@pytest.mark.parametrize("env", ["cpu", "gpu", "edge"])
def test_every_object_validates_against_the_kubernetes_schemas(rendered, edge, env):
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (offline schemas)")
    objects = _objects(edge if env == "edge" else rendered / env)
    assert len(objects) >= 15
    for _, obj in objects:
        validate(obj)
    broken = copy.deepcopy(next(o for _, o in objects if o["kind"] == "HorizontalPodAutoscaler"))
    broken["spec"]["behavior"]["scaleUp"]["policies"][0]["periodSecond"] = 30  # a typo must not pass
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, K8S_VERSION, strict=True)


def test_every_custom_kind_is_rendered_and_checked_against_its_crd(rendered, edge):
    objects = [o for _, o in _objects(rendered / "cpu") + _objects(edge)]
    kinds = {o["kind"] for o in objects}
    assert set(CUSTOM) <= kinds  # ServiceMonitor, PodMonitor, Gateway, HTTPRoute, ScaledObject
    for schema in CUSTOM.values():
        assert "github.com/" in schema["$comment"] and len(json.dumps(schema)) < 16_000  # cut, and says from where
    typos = {"ServiceMonitor": ("endpoints", "intervall"), "PodMonitor": ("podMetricsEndpoints", "prot"),
             "Gateway": ("listeners", "hostName"), "HTTPRoute": ("rules", "backendRef"),
             "ScaledObject": ("triggers", "metricTyp")}
    for kind, (field, typo) in typos.items():
        broken = copy.deepcopy(next(o for o in objects if o["kind"] == kind))
        broken["spec"][field][0][typo] = "x"  # an unknown field, as a typo makes one
        with pytest.raises(jsonschema.ValidationError, match=typo):
            validate(broken)
    scaled = copy.deepcopy(next(o for o in objects if o["kind"] == "ScaledObject"))
    scaled["spec"]["triggers"][0]["metadata"]["threshold"] = 0.2  # KEDA's trigger metadata is strings only
    with pytest.raises(jsonschema.ValidationError):
        validate(scaled)


def test_monitors_scrape_the_ports_the_annotations_name(rendered, edge):
    objects = {(o["kind"], o["metadata"]["name"]): o for _, o in _objects(edge)}
    gateway = objects[("Deployment", "autoglm-gateway")]["spec"]["template"]
    triton = objects[("Deployment", "autoglm-triton")]["spec"]["template"]
    service = objects[("Service", "autoglm-gateway")]
    monitor, pods = objects[("ServiceMonitor", "autoglm-gateway")], objects[("PodMonitor", "autoglm-triton")]
    (endpoint,), (pod_endpoint,) = monitor["spec"]["endpoints"], pods["spec"]["podMetricsEndpoints"]
    service_port = next(p for p in service["spec"]["ports"] if p["name"] == endpoint["port"])
    container_port = {p["name"]: p["containerPort"] for p in gateway["spec"]["containers"][0]["ports"]}
    assert container_port[service_port["targetPort"]] == int(gateway["metadata"]["annotations"]["prometheus.io/port"])
    assert endpoint["path"] == gateway["metadata"]["annotations"]["prometheus.io/path"]
    triton_ports = {p["name"]: p["containerPort"] for p in triton["spec"]["containers"][0]["ports"]}
    assert triton_ports[pod_endpoint["port"]] == int(triton["metadata"]["annotations"]["prometheus.io/port"])
    assert pod_endpoint["path"] == triton["metadata"]["annotations"]["prometheus.io/path"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert pods["spec"]["selector"]["matchLabels"].items() <= triton["metadata"]["labels"].items()
    for obj in (monitor, pods):
        assert obj["metadata"]["labels"]["release"] == "kube-prometheus-stack"  # Prometheus' selector finds them
        assert obj["metadata"]["namespace"] == "autoglm"
    scrape = yaml.safe_load((rendered / "cpu/k8s/monitoring/prometheus-scrape.yaml").read_text())
    job_labels = {r["target_label"] for r in scrape["scrape_configs"][0]["relabel_configs"] if "target_label" in r}
    assert {r["targetLabel"] for r in endpoint["relabelings"]} == job_labels - {"__metrics_path__", "__address__",
                                                                                "namespace", "pod"}


def test_the_ingress_sends_the_configured_host_to_the_gateway_over_tls(rendered):
    objects = {(o["kind"], o["metadata"]["name"]): o for _, o in _objects(rendered / "cpu")}
    spec = objects[("Ingress", "autoglm-gateway")]["spec"]
    assert spec["ingressClassName"] == "nginx"
    assert spec["tls"] == [{"hosts": ["api.example.com"], "secretName": "api-tls"}]
    (rule,) = spec["rules"]
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert rule["host"] == "api.example.com" and rule["http"]["paths"][0]["path"] == "/"
    service = objects[("Service", backend["name"])]
    assert backend["port"] == {"name": "http"} and "http" in {p["name"] for p in service["spec"]["ports"]}
    gpu = {o["kind"] for _, o in _objects(rendered / "gpu")}
    assert not gpu & {"Ingress", "Gateway", "HTTPRoute"}  # no deploy.ingress.host: nothing exposed
    assert (rendered / "gpu/k8s/base/ingress.yaml").exists() is False


def test_the_http_route_attaches_to_a_tls_gateway_and_reaches_the_gateway_service(edge):
    objects = {(o["kind"], o["metadata"]["name"]): o for _, o in _objects(edge)}
    assert ("Ingress", "autoglm-gateway") not in objects  # one way in
    gateway, route = objects[("Gateway", "autoglm-gateway")], objects[("HTTPRoute", "autoglm-gateway")]
    (listener,) = gateway["spec"]["listeners"]
    assert gateway["spec"]["gatewayClassName"] == "istio"
    assert (listener["protocol"], listener["port"], listener["hostname"]) == ("HTTPS", 443, "api.example.com")
    assert listener["tls"] == {"mode": "Terminate", "certificateRefs": [{"kind": "Secret",
                                                                          "name": "autoglm-gateway-tls"}]}
    (parent,) = route["spec"]["parentRefs"]
    assert (parent["name"], parent["sectionName"]) == (gateway["metadata"]["name"], listener["name"])
    assert route["spec"]["hostnames"] == ["api.example.com"]
    (backend,) = route["spec"]["rules"][0]["backendRefs"]
    service = objects[("Service", backend["name"])]
    assert {"name": "http", "port": backend["port"], "targetPort": "http"} in service["spec"]["ports"]


TRITON_PODS = 'namespace="autoglm",pod=~"autoglm-triton-.+"'  # the adapter's matchers, as Prometheus sees the pods


def test_keda_scales_triton_on_the_hpas_queries_targets_and_behavior(rendered, edge):
    keda = {(o["kind"], o["metadata"]["name"]): o for _, o in _objects(edge)}
    hpa = next(o for _, o in _objects(rendered / "cpu") if o["kind"] == "HorizontalPodAutoscaler"
               and o["metadata"]["name"] == "autoglm-triton")["spec"]
    scaled = keda[("ScaledObject", "autoglm-triton")]["spec"]
    targeted = [o["spec"]["scaleTargetRef"]["name"] for (kind, _), o in keda.items()
                if kind in ("HorizontalPodAutoscaler", "ScaledObject")]
    assert sorted(targeted) == ["autoglm-gateway", "autoglm-triton"]  # never two scalers on one Deployment
    assert scaled["scaleTargetRef"] == hpa["scaleTargetRef"]
    assert (scaled["minReplicaCount"], scaled["maxReplicaCount"]) == (hpa["minReplicas"], hpa["maxReplicas"])
    assert scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"] == hpa["behavior"]
    assert scaled["pollingInterval"] == AutoscaleRules().interval_s
    hpa_targets = {m["pods"]["metric"]["name"]: m["pods"]["target"]["averageValue"] for m in hpa["metrics"]}
    assert len(scaled["triggers"]) == len(hpa_targets) == len(SERIES)
    for series, trigger in zip(SERIES, scaled["triggers"], strict=True):
        assert (trigger["type"], trigger["metricType"]) == ("prometheus", "AverageValue")
        milli = int(hpa_targets[series.name].removesuffix("m"))
        assert round(float(trigger["metadata"]["threshold"]) * 1000) == milli  # the HPA's target, as a decimal
        assert trigger["metadata"]["query"] == f"sum({series.promql(TRITON_PODS)})"
        assert trigger["metadata"]["serverAddress"] == "http://prometheus-operated.monitoring.svc:9090"
    assert keda[("ScaledObject", "autoglm-triton")]["metadata"]["annotations"]["autoglm.dev/targets"].startswith(
        "latency targets 200 ms")


def test_every_container_pulls_by_an_explicit_policy(rendered):
    for _, obj in _objects(rendered / "cpu"):
        pod = obj.get("spec", {}).get("template", {}).get("spec", {})
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            assert container["imagePullPolicy"] == "IfNotPresent", (obj["kind"], container["name"])


@kubectl
def test_kustomize_builds_serving_and_tune(rendered, edge):
    for directory in (rendered / "cpu/k8s", rendered / "cpu/k8s/tune", rendered / "gpu/k8s/overlays/gpu", edge / "k8s"):
        proc = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    objects = dict(((o["kind"], o["metadata"]["name"]), o) for _, o in _objects(rendered / "gpu"))
    triton = objects[("Deployment", "autoglm-triton")]["spec"]["template"]["spec"]
    assert triton["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"  # the overlay applied
    assert triton["containers"][0]["image"] == "nvcr.io/nvidia/tritonserver:25.11-py3"  # gpu: a current release
    gateway = objects[("Deployment", "autoglm-gateway")]["spec"]["template"]["spec"]
    secret = next(name for kind, name in objects if kind == "Secret")
    assert gateway["volumes"][0]["secret"]["secretName"] == secret  # kustomize's hashed name, rewired
    assert objects[("ConfigMap", "autoglm-adapter-rules")]["metadata"]["namespace"] == "monitoring"
    assert all(o["metadata"].get("namespace") == "autoglm" for (k, _), o in objects.items()
               if k not in ("Namespace",) and o["metadata"]["name"] != "autoglm-adapter-rules")


def test_probes_hit_the_real_endpoints(rendered):
    objects = {o["metadata"]["name"]: o for _, o in _objects(rendered / "cpu") if o["kind"] == "Deployment"}
    triton = objects["autoglm-triton"]["spec"]["template"]["spec"]["containers"][0]
    assert triton["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert triton["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert {p["name"]: p["containerPort"] for p in triton["ports"]} == {"http": 8000, "grpc": 8001, "metrics": 8002}
    gateway = objects["autoglm-gateway"]["spec"]["template"]["spec"]["containers"][0]
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {p["name"]: p["containerPort"] for p in gateway["ports"]} == {"http": 8080, "grpc": 8081}
    service = next(o for _, o in _objects(rendered / "cpu") if o["kind"] == "Service"
                   and o["metadata"]["name"] == "autoglm-gateway")
    assert {"name": "grpc", "port": 8081, "targetPort": "grpc", "appProtocol": "grpc"} in service["spec"]["ports"]
    settings = json.loads((rendered / "cpu/k8s/base/gateway.json").read_text())
    assert settings["grpc_port"] == 8081 and settings["triton_grpc_url"].endswith(":8001")
    for deployment in objects.values():
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            assert container["securityContext"]["runAsNonRoot"] and "limits" in container["resources"]


def test_triton_is_reachable_only_from_the_gateway_and_prometheus(rendered):
    policy = next(o for _, o in _objects(rendered / "cpu") if o["kind"] == "NetworkPolicy"
                  and o["metadata"]["name"] == "autoglm-triton")
    rules = policy["spec"]["ingress"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    inference = next(r for r in rules if {p["port"] for p in r["ports"]} == {8000, 8001})
    assert inference["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "gateway",
                                                                  "app.kubernetes.io/part-of": "autoglm"}}}]
    metrics = next(r for r in rules if {p["port"] for p in r["ports"]} == {8002})
    assert metrics["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    assert len(rules) == 2


@pytest.mark.parametrize("rules", [
    AutoscaleRules(),
    AutoscaleRules(min_instances=1, max_instances=24),
    AutoscaleRules(up_factor=2.0, down_factor=1.5, min_instances=2, max_instances=16, up_after_s=10, up_cooldown_s=20),
], ids=["defaults", "up-to-24", "x2-div1.5"])
def test_hpa_behavior_does_what_the_rules_do(rules):
    behavior = hpa_behavior(rules)
    for n in range(rules.min_instances, rules.max_instances):
        assert min(rules.max_instances, hpa_limit(n, behavior["scaleUp"], up=True)) == rules.scaled_up(n), n
    for n in range(rules.min_instances + 1, rules.max_instances + 1):
        assert max(rules.min_instances, hpa_limit(n, behavior["scaleDown"], up=False)) == rules.scaled_down(n), n
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] == rules.up_after_s
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == rules.down_after_s
    assert {p["periodSeconds"] for p in behavior["scaleUp"]["policies"]} == {max(rules.up_after_s, rules.up_cooldown_s)}


def test_default_rules_render_as_documented(rendered):
    hpa = next(o for _, o in _objects(rendered / "cpu") if o["kind"] == "HorizontalPodAutoscaler"
               and o["metadata"]["name"] == "autoglm-triton")
    spec, rules = hpa["spec"], AutoscaleRules()
    up, down = spec["behavior"]["scaleUp"], spec["behavior"]["scaleDown"]
    assert (up["stabilizationWindowSeconds"], up["policies"][0]) == (30, {"type": "Percent", "value": 50,
                                                                          "periodSeconds": 60})
    assert (down["stabilizationWindowSeconds"], down["policies"][0]) == (300, {"type": "Percent", "value": 16,
                                                                               "periodSeconds": 300})
    assert (spec["minReplicas"], spec["maxReplicas"]) == (rules.min_instances, rules.max_instances)
    targets = {m["pods"]["metric"]["name"]: m["pods"]["target"]["averageValue"] for m in spec["metrics"]}
    assert targets == {"autoglm_triton_request_latency_seconds": "200m", "autoglm_triton_request_p95_seconds": "200m",
                       "autoglm_triton_requests_per_second": "66667m"}  # default 50 req/s x 2 instances / 1.5


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian: prometheus)")
def test_compose_prometheus_config_passes_promtool(rendered):
    proc = subprocess.run(["promtool", "check", "config", str(rendered / "cpu/compose/prometheus.yml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_file_structure(rendered):
    compose = yaml.safe_load((rendered / "cpu/compose/docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"triton", "gateway", "prometheus", "grafana"}
    assert "../../../../repository/native:/models:ro" in services["triton"]["volumes"]
    assert "deploy" not in services["triton"]  # no GPU reservation in the cpu env
    assert all(p.startswith("127.0.0.1:") for p in services["triton"]["ports"] + services["prometheus"]["ports"])
    assert services["gateway"]["ports"] == ["8080:8080", "8081:8081"] and services["grafana"]["profiles"] == ["dashboard"]
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):  # every file the stack mounts exists where the compose file says
                assert (rendered / "cpu/compose" / source).resolve().exists(), source
    dashboard = json.loads((rendered / "cpu/compose/grafana/autoglm.json").read_text())
    assert dashboard["panels"] and all(t["expr"] for p in dashboard["panels"] for t in p["targets"])


def test_rendered_gateway_command_and_settings_start_the_real_gateway(rendered, release_run, tmp_path):
    """The container's command line with the rendered settings: /healthz answers, /readyz says no Triton."""
    deployment = next(o for _, o in _objects(rendered / "cpu") if o["kind"] == "Deployment"
                      and o["metadata"]["name"] == "autoglm-gateway")
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    settings = json.loads((rendered / "cpu/k8s/base/gateway.json").read_text())
    settings["repository"] = str(release_run.stage_dir("repository"))  # the ConfigMap's task.json, here
    nobody, grpc_port, port = free_ports(3)
    settings["triton_url"] = f"http://127.0.0.1:{nobody}"  # nobody listens: not ready
    settings["host"], settings["grpc_port"] = "127.0.0.1", grpc_port
    path = tmp_path / "gateway.json"
    path.write_text(json.dumps(settings))
    command = [sys.executable, "-m", *command]
    command[command.index("--port") + 1], command[command.index("--host") + 1] = str(port), "127.0.0.1"
    proc = subprocess.Popen(command, env={"SERVE_GATEWAY_SETTINGS": str(path), "PATH": ""},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[2])
    try:
        assert _status(f"http://127.0.0.1:{port}/healthz", proc) == 200
        assert _status(f"http://127.0.0.1:{port}/readyz", proc) == 503
        with grpc.insecure_channel(f"127.0.0.1:{settings['grpc_port']}") as channel:  # the gRPC port answers
            grpc.channel_ready_future(channel).result(timeout=10)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _status(url: str, proc: subprocess.Popen, timeout_s: float = 30) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the gateway exited: {proc.stdout.read().decode()[-2000:]}")
        try:
            with DIRECT.open(url, timeout=2) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"no answer from {url} in {timeout_s} s")
