"""Cut upstream CRDs down to the JSON schemas of what deploy emits: ``tests/deploy/crds/<Kind>.json``.

kubernetes-validate knows Kubernetes' own kinds only; the CRDs the render uses are checked against
their own OpenAPI schemas, vendored here as small files. Each keeps, from the CRD's
``openAPIV3Schema``, only the properties the rendered objects use (every constraint on them kept,
descriptions dropped) and forbids any other, so a typo or a field the CRD lacks fails like
kubernetes-validate's strict mode. Regenerate after emitting a new field (in a checkout of each
project at the tag in ``SOURCES``)::

    python -m tests.deploy.crds.cut PROMETHEUS_OPERATOR GATEWAY_API KEDA
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).parent
# kind -> (project, tag, CRD file in that project, served version)
SOURCES = {
    "ServiceMonitor": ("prometheus-operator/prometheus-operator", "v0.93.0",
                       "example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml", "v1"),
    "PodMonitor": ("prometheus-operator/prometheus-operator", "v0.93.0",
                   "example/prometheus-operator-crd/monitoring.coreos.com_podmonitors.yaml", "v1"),
    "Gateway": ("kubernetes-sigs/gateway-api", "v1.6.1",
                "config/crd/standard/gateway.networking.k8s.io_gateways.yaml", "v1"),
    "HTTPRoute": ("kubernetes-sigs/gateway-api", "v1.6.1",
                  "config/crd/standard/gateway.networking.k8s.io_httproutes.yaml", "v1"),
    "ScaledObject": ("kedacore/keda", "v2.20.2", "config/crd/bases/keda.sh_scaledobjects.yaml", "v1alpha1"),
}
DROPPED = {"description", "example", "examples"}


def samples() -> list[dict[str, Any]]:
    """Every custom object the render can emit (each option that changes one)."""
    from autoglm.autoscaling import AutoscaleRules
    from deploy.k8s import ingress, monitors, serving
    from deploy.release import Capacity, Release

    release = Release(run="r", task="digits", models={"int8": "m"}, recommended="m", version=1, instances_per_pod=2,
                      repository_sha="0" * 64, autoglm_version="0", task_json=b"{}",
                      capacity=Capacity(50.0, False, "default"))
    keda = serving.autoscalers(release, AutoscaleRules(), "http://prometheus:9090", "autoglm")
    return [*monitors.monitors({"release": "x"}, "metrics", "http"), *ingress.gateway_api("a.example.com", "s", "c"),
            *(o for o in keda if o["apiVersion"].startswith("keda.sh/"))]


def prune(schema: dict[str, Any], values: list[Any]) -> dict[str, Any]:
    """``schema`` with only the properties some of ``values`` use, recursively; other properties forbidden."""
    out = {k: copy.deepcopy(v) for k, v in schema.items() if k not in DROPPED | {"properties", "items"}}
    out = _strip(out)
    if "properties" in schema:
        dicts = [v for v in values if isinstance(v, dict)]
        used = sorted({key for d in dicts for key in d})
        unknown = [key for key in used if key not in schema["properties"]]
        if unknown:
            raise SystemExit(f"the CRD has no field {unknown}: fix the emitted object")
        out["properties"] = {k: prune(schema["properties"][k], [d[k] for d in dicts if k in d]) for k in used}
        out.setdefault("additionalProperties", False)
    if "items" in schema:
        out["items"] = prune(schema["items"], [item for v in values if isinstance(v, list) for item in v])
    return out


def _strip(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k not in DROPPED}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def cut(kind: str, crd: dict[str, Any], objects: list[dict[str, Any]]) -> dict[str, Any]:
    project, tag, path, version = SOURCES[kind]
    served = next(v for v in crd["spec"]["versions"] if v["name"] == version)
    schema = prune(served["schema"]["openAPIV3Schema"], objects)
    group = crd["spec"]["group"]
    schema["properties"]["apiVersion"] = {"const": f"{group}/{version}"}
    schema["properties"]["kind"] = {"const": kind}
    schema["required"] = sorted({"apiVersion", "kind", "metadata", "spec", *schema.get("required", [])})
    return {"$comment": f"cut from github.com/{project} {tag}: {path} ({version}), by tests/deploy/crds/cut.py: "
            "only the fields deploy emits", "$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def main(checkouts: list[str]) -> None:
    roots = [Path(c) for c in checkouts]
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for obj in samples():
        by_kind.setdefault(obj["kind"], []).append(obj)
    for kind, (project, _, path, _) in SOURCES.items():
        root = next((r for r in roots if (r / path).is_file()), None)
        if root is None:
            raise SystemExit(f"no checkout of {project} among {checkouts} has {path}")
        crd = yaml.safe_load((root / path).read_text())
        text = json.dumps(cut(kind, crd, by_kind[kind]), indent=1, sort_keys=False) + "\n"
        (HERE / f"{kind}.json").write_text(text)
        print(f"{kind}: {len(text)} bytes")


if __name__ == "__main__":
    main(sys.argv[1:])
