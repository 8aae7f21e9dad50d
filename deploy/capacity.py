"""Requests per second one model instance serves within the SLO: loadtest's figure, when it holds for what the
rendered overlay serves, else a deliberately low default, with a sentence saying which and why.

Loadtest's capacity is used when all of these hold:

1. loadtest completed, or a ``loadtest --tune`` write-back in the repository manifest (``metrics["serving"]``) names
   this loadtest (its manifest's sha256, or its report's path and sha256): rewriting the repository leaves the
   loadtest that chose the config "stale" only by that rewrite;
2. it found a serving config within the SLO;
3. that config is the deployed one: the recommended model with the repository's batching knobs and instance count
   (``config["triton"]``, which a write-back updates), compared on each knob loadtest recorded;
4. it was measured on the repository flavour and device kind the overlay serves (:func:`serving_target`);
   ``deploy.allow_capacity_mismatch`` (``--use-capacity-anyway``) uses it anyway, and says so. A loadtest that
   recorded neither (written before capacity records carried them) counts as unknown: used, and the sentence says
   that nothing was checked.

A run with a generation model (charlm) is also sized by its verified ``:generate`` capacity, tokens/s per instance
(:func:`generation_capacity`): the same checks, on the generation model's own knobs (decode slots and the other
model parameters, instance count) and on the flavour and device kind its config serves. Loadtest keeps one record
per workload in its manifest (``metrics["workloads"]``), so measuring one workload does not drop the other's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoglm.artifacts import RunDir, sha256_file

DEFAULT_CAPACITY_RPS = 50.0  # per model instance, when no loadtest measured one: deliberately low (scales out early)
SERVED_FLAVOUR = "native"  # the model image and the compose stack both serve repository/native
# the knobs of a serving config that change what one instance serves, as loadtest records them and compress (or a
# write-back) writes them into the repository manifest's config["triton"]
KNOBS = ("max_queue_delay_us", "preferred_batch_sizes", "instances", "max_batch_size")
WRITE_BACK = "loadtest --tune"  # metrics["serving"]["source"] of a repository a tune study wrote back
_KIND = re.compile(r"\bkind\s*:\s*KIND_(\w+)")


@dataclass(frozen=True)
class GenerationCapacity:
    """Tokens per second one instance of the generation model streams within its SLO (None: not used, and why)."""

    model: str
    tokens_per_s_per_instance: float | None
    instances_per_pod: int
    source: str
    measured_on: dict[str, Any] | None = None

    @property
    def measured(self) -> bool:
        return self.tokens_per_s_per_instance is not None

    def per_pod(self) -> float:
        return (self.tokens_per_s_per_instance or 0.0) * self.instances_per_pod


@dataclass(frozen=True)
class Capacity:
    """Requests per second one model instance serves within the SLO, and where the figure comes from."""

    rps_per_instance: float
    measured: bool
    source: str  # a sentence for the rendered files: what measured it, or why the default is used
    measured_on: dict[str, Any] | None = None  # loadtest's capacity record: flavour, device kind, host (None: unknown)
    generation: GenerationCapacity | None = None  # the generation model's, where the run has one

    def per_pod(self, instances_per_pod: int) -> float:
        return self.rps_per_instance * instances_per_pod


@dataclass(frozen=True)
class Target:
    """Where the rendered overlay serves the recommended model: the repository flavour and the device kind."""

    env: str
    model: str
    flavour: str
    device: str

    def label(self) -> str:
        return f"the {self.env} overlay serves {self.model} on the {self.flavour} flavour, {self.device}"


def serving_target(repository: Path, model: str, env: str) -> Target:
    """The overlay of ``env`` serves ``repository/native``; ``model`` runs on the device its instance group names
    (KIND_GPU: a TensorRT plan, KIND_CPU: ONNX Runtime, even in the gpu overlay), or, where the config names none,
    where Triton puts it: on the pod's GPU in the gpu overlay."""
    config = repository / SERVED_FLAVOUR / model / "config.pbtxt"
    found = _KIND.search(config.read_text()) if config.is_file() else None
    kind = found.group(1).lower() if found else None
    return Target(env, model, SERVED_FLAVOUR, kind if kind in ("cpu", "gpu") else env)


def capacity_for(run: RunDir, triton: dict[str, Any], target: Target, allow_mismatch: bool = False) -> Capacity:
    """Loadtest's capacity for ``target``'s model served with ``triton`` (see the module docstring)."""
    state = run.state("loadtest")
    written_back = state in ("complete", "stale") and _written_back(run)
    if state != "complete" and not written_back:
        return _default(f"loadtest is {state}: run `autoglm loadtest` to measure it")
    metrics = workload_record(run.manifest("loadtest").metrics, "predict")
    if metrics is None:
        return _default("loadtest measured only the generation model: run `autoglm loadtest` on the predict models")
    value = metrics.get("capacity_per_instance_rps")
    if not value:
        return _default("loadtest found no serving config within the SLO: see runs/<run>/loadtest/report.json")
    value = float(value)
    measured_on = dict(metrics.get("recommended") or {})
    measured_on.setdefault("instances", metrics.get("instances"))
    differs = {k: (measured_on[k], want) for k, want in deployed_config(target.model, triton).items()
               if measured_on.get(k) is not None and want is not None and measured_on[k] != want}
    if differs:
        what = ", ".join(f"{k} {got} (deployed: {want})" for k, (got, want) in differs.items())
        return _default(f"loadtest measured {value:.1f} on another config: {what}; set compress.triton to it and "
                        "re-run compress and loadtest, or write a `loadtest --tune` result back")
    p95 = metrics.get("p95_ms")
    how = "verified by `loadtest --tune` and written back" if written_back else "measured by loadtest"
    figure = f"{value:.1f} req/s per instance" + (f" at p95 {p95:.1f} ms" if isinstance(p95, int | float) else "")
    record, refused, note = _where(metrics, target, figure, allow_mismatch)
    if refused:
        return _default(refused)
    known = {k: v for k, v in record.items() if v is not None}
    return Capacity(value, True, f"{how}: {figure}{_measured_on(record)}{note}", known or None)


def _where(metrics: dict[str, Any], target: Target, figure: str,
           allow_mismatch: bool) -> tuple[dict[str, Any], str | None, str]:
    """Where a capacity was measured against where ``target`` serves: (the record, why it is refused or None,
    the note the capacity's sentence ends with)."""
    record = {k: metrics.get(k) for k in ("capacity_flavour", "device_kind", "host")}
    wanted = {"capacity_flavour": target.flavour, "device_kind": target.device}
    mismatched = [k for k, want in wanted.items() if record[k] is not None and record[k] != want]
    if mismatched and not allow_mismatch:
        return record, (f"loadtest measured {figure}{_measured_on(record)}, but {target.label()}: measure there, or "
                        "set deploy.allow_capacity_mismatch=true (--use-capacity-anyway) to use it anyway"), ""
    if mismatched:
        return record, None, f"; {target.label()}: used anyway (deploy.allow_capacity_mismatch)"
    if None in (record["capacity_flavour"], record["device_kind"]):
        unknown = " and ".join(w for k, w in (("capacity_flavour", "flavour"), ("device_kind", "device kind"))
                               if record[k] is None)
        return record, None, (f"; its {unknown} not recorded (an older loadtest): not checked against the "
                               f"{target.env} overlay")
    return record, None, ""


def workload_record(metrics: dict[str, Any], workload: str) -> dict[str, Any] | None:
    """A loadtest manifest's record of ``workload`` ('predict' or 'generate'); a manifest older than the records
    is the record of the workload its scenario measured."""
    records = metrics.get("workloads")
    if isinstance(records, dict):
        record = records.get(workload)
        return record if isinstance(record, dict) else None
    measured = "generate" if metrics.get("scenario") == "generate" else "predict"
    return metrics if measured == workload else None


def generation_capacity(run: RunDir, repository: Path, model: str, env: str,
                        allow_mismatch: bool = False) -> GenerationCapacity:
    """The generation model's verified capacity in tokens/s per instance, when a ``loadtest --scenario generate
    --tune`` verified it at the knobs the repository serves, on its flavour and device kind (see the module
    docstring); otherwise none, with the reason."""
    deployed = _generate_knobs(repository / SERVED_FLAVOUR / model / "config.pbtxt")
    instances = deployed["instances"]

    def unused(why: str) -> GenerationCapacity:
        return GenerationCapacity(model, None, instances, f"not sized by tokens/s ({why})")

    state = run.state("loadtest")
    if state != "complete" and not (state == "stale" and _written_back(run)):
        return unused(f"loadtest is {state}")
    metrics = workload_record(run.manifest("loadtest").metrics, "generate")
    if metrics is None:
        return unused("no `autoglm loadtest --scenario generate --tune` measured it")
    value = metrics.get("capacity_per_instance_tps")
    if metrics.get("mode") != "tune" or not value:
        return unused("the last `loadtest --scenario generate` verified no config within the SLO: run it with --tune")
    config = metrics.get("recommended") or {}
    wanted = {"instances": config.get("instances"),
              **{k: str(v) for k, v in (config.get("parameters") or {}).items()}}
    served = {"instances": instances, **deployed["parameters"]}
    differs = {k: (v, served.get(k)) for k, v in wanted.items() if v is not None and served.get(k) != v}
    figure = f"{float(value):.0f} tokens/s per instance"
    if differs:
        what = ", ".join(f"{k} {got} (deployed: {want})" for k, (got, want) in differs.items())
        return unused(f"loadtest measured {figure} on another config: {what}; write the `loadtest --tune` result "
                      "back")
    record, refused, note = _where(metrics, serving_target(repository, model, env), figure, allow_mismatch)
    if refused:
        return unused(refused)
    ttft, itl = metrics.get("ttft_p95_ms"), metrics.get("itl_p95_ms")
    slo = (f" at TTFT p95 {ttft:.0f} ms, inter-token p95 {itl:.1f} ms"
           if isinstance(ttft, int | float) and isinstance(itl, int | float) else "")
    known = {k: v for k, v in record.items() if v is not None}
    return GenerationCapacity(model, float(value), instances, f"verified by `loadtest --scenario generate --tune`: "
                              f"{figure}{slo}{_measured_on(record)}{note}", known or None)


def _generate_knobs(config: Path) -> dict[str, Any]:
    """The generation model's instance count and parameters (strings, as Triton holds them) in its config."""
    if not config.is_file():
        return {"instances": 1, "parameters": {}}
    from autoglm.triton_config import parse_pbtxt

    msg = parse_pbtxt(config.read_text())
    return {"instances": msg.instance_group[0].count if msg.instance_group else 1,
            "parameters": {k: v.string_value for k, v in msg.parameters.items()}}


def deployed_config(model: str, triton: dict[str, Any]) -> dict[str, Any]:
    """The serving config the repository deploys, in the form loadtest records a live config."""
    deployed = {"model": model} | {k: triton.get(k) for k in KNOBS}
    # Triton's auto-complete turns no preferred sizes into [max_batch_size] (see SweepGrid): the repository's [] is
    # served, and measured, as that
    if deployed["preferred_batch_sizes"] == [] and triton.get("max_batch_size"):
        deployed["preferred_batch_sizes"] = [triton["max_batch_size"]]
    return deployed


def _written_back(run: RunDir) -> bool:
    """Whether the repository serves a write-back that this very loadtest chose: its lineage names the loadtest
    manifest's sha256, or the path and sha256 of a report among the loadtest's outputs."""
    serving = run.manifest("repository").metrics.get("serving")
    if not isinstance(serving, dict) or serving.get("source") != WRITE_BACK:
        return False
    lineage = serving.get("loadtest")
    if isinstance(lineage, str):
        return lineage == sha256_file(run.manifest_path("loadtest"))
    if isinstance(lineage, dict) and isinstance(lineage.get("report"), str):
        output = run.manifest("loadtest").outputs.get(lineage["report"].removeprefix("loadtest/"), {})
        return output.get("sha256") == lineage.get("sha256")
    return False


def _measured_on(record: dict[str, Any]) -> str:
    flavour, device, host = record["capacity_flavour"], record["device_kind"], record["host"]
    parts = [f"the {flavour} flavour" if flavour else "", device or ""]
    where = ", ".join(p for p in parts if p)
    return (f" on {where}" if where else "") + (f" (host {host})" if host else "")


def _default(why: str) -> Capacity:
    return Capacity(DEFAULT_CAPACITY_RPS, False, f"default {DEFAULT_CAPACITY_RPS:g} req/s per instance ({why})")
