"""Serving configs applied to a live Triton through its model-control API, without a restart.

An override is the model's full config JSON from ``GET /v2/models/<m>/config`` (the HTTP JSON keeps
int64 fields as numbers; the gRPC JSON renders them as strings and forces a full reload) with the
swept fields changed, posted as ``POST /v2/repository/models/<m>/load {"parameters": {"config": ...}}``.
A change of ``instance_group.count`` alone is applied in place; batching changes reload the model.
Triton must run with ``--model-control-mode=explicit`` (what :class:`serve.triton.TritonServer` does).
"""

from __future__ import annotations

import copy
import json
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from typing import Any

from autoglm.errors import AutoGLMError

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via an http_proxy


@dataclass(frozen=True)
class ServingConfig:
    """The serving knobs the sweep varies for one model. None keeps the model's current value."""

    model: str
    max_queue_delay_us: int | None = None
    preferred_batch_sizes: tuple[int, ...] | None = None
    instances: int | None = None
    max_queue_size: int | None = None  # 0: Triton's default queue policy (unbounded, no timeout)
    max_batch_size: int | None = None  # a change reloads the model (the batch axis stays dynamic)
    # model parameters the model reads at load (the generation model's decode slots, stream interval), as
    # sorted (name, value) pairs; a change reloads the model
    parameters: tuple[tuple[str, str], ...] | None = None

    def __post_init__(self) -> None:
        if self.parameters is not None:
            pairs = self.parameters.items() if isinstance(self.parameters, dict) else self.parameters
            object.__setattr__(self, "parameters", tuple(sorted((str(k), str(v)) for k, v in pairs)))
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise AutoGLMError(f"max_batch_size={self.max_batch_size} must be >= 1 (the largest batch Triton forms)")
        if self.max_queue_delay_us is not None and self.max_queue_delay_us < 0:
            raise AutoGLMError(f"max_queue_delay_us={self.max_queue_delay_us} must be >= 0 (µs; 0 = no waiting)")
        if self.instances is not None and self.instances < 1:
            raise AutoGLMError(f"instances={self.instances} must be >= 1")
        if self.max_queue_size is not None and self.max_queue_size < 0:
            raise AutoGLMError(f"max_queue_size={self.max_queue_size} must be >= 0 (0: unbounded)")
        if self.preferred_batch_sizes is not None:
            object.__setattr__(self, "preferred_batch_sizes", tuple(int(b) for b in self.preferred_batch_sizes))

    def label(self) -> str:
        """Short human-readable name, e.g. ``digits-int8 delay=2000µs pref=[8,16] x2``."""
        parts = [self.model]
        if self.max_queue_delay_us is not None:
            parts.append(f"delay={self.max_queue_delay_us}µs")
        if self.preferred_batch_sizes is not None:
            parts.append(f"pref=[{','.join(map(str, self.preferred_batch_sizes))}]")
        if self.instances is not None:
            parts.append(f"x{self.instances}")
        if self.max_queue_size is not None:
            parts.append(f"queue={self.max_queue_size or 'unbounded'}")
        if self.max_batch_size is not None:
            parts.append(f"max_batch={self.max_batch_size}")
        parts += [f"{k}={v}" for k, v in self.parameters or ()]
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["preferred_batch_sizes"] = list(self.preferred_batch_sizes) if self.preferred_batch_sizes is not None \
            else None
        if self.parameters is None:
            del data["parameters"]  # the batching models' records keep their shape
        else:
            data["parameters"] = dict(self.parameters)
        return data


def override(base: dict[str, Any], cfg: ServingConfig) -> dict[str, Any]:
    """``base`` (a config from GET /v2/models/<m>/config) with ``cfg``'s knobs set; base is not modified."""
    out = copy.deepcopy(base)
    if cfg.max_batch_size is not None:
        if not out.get("max_batch_size"):
            raise AutoGLMError(f"model '{cfg.model}' batches by itself (max_batch_size 0): leave it out of the "
                               "batching knobs")
        out["max_batch_size"] = cfg.max_batch_size
    if any(v is not None for v in (cfg.max_queue_delay_us, cfg.preferred_batch_sizes, cfg.max_queue_size)):
        batching = out.get("dynamic_batching")
        if batching is None:
            raise AutoGLMError(f"model '{cfg.model}' has no dynamic batching in its config: enable it in the "
                               "repository (compress writes it) before sweeping queue delays or batch sizes")
        if cfg.max_queue_delay_us is not None:
            batching["max_queue_delay_microseconds"] = cfg.max_queue_delay_us
        if cfg.preferred_batch_sizes is not None:
            too_big = [b for b in cfg.preferred_batch_sizes if not 1 <= b <= out.get("max_batch_size", 0)]
            if too_big:
                raise AutoGLMError(f"preferred batch sizes {too_big} are outside 1..max_batch_size="
                                   f"{out.get('max_batch_size')} of '{cfg.model}': drop them from the sweep")
            batching["preferred_batch_size"] = list(cfg.preferred_batch_sizes)
        if cfg.max_queue_size is not None:
            policy = batching.setdefault("default_queue_policy", {})
            policy["max_queue_size"] = cfg.max_queue_size
            if cfg.max_queue_size == 0:
                # Triton 2.51: any non-default queue policy (a size bound or a timeout) makes the dynamic
                # batcher stall ~500 ms at a time; 0 restores the default policy entirely.
                policy["default_timeout_microseconds"] = 0
    if cfg.parameters:
        unknown = [k for k, _ in cfg.parameters if k not in (out.get("parameters") or {})]
        if unknown:
            raise AutoGLMError(f"model '{cfg.model}' has no parameters {unknown} in its config (it has "
                               f"{sorted(out.get('parameters') or {})}): leave them out of the knobs")
        for name, value in cfg.parameters:
            out["parameters"][name] = {"string_value": value}
    if cfg.instances is not None:
        groups = out.get("instance_group") or [{"kind": "KIND_CPU"}]
        groups[0]["count"] = cfg.instances  # one group is what compress writes; extra groups stay as they are
        out["instance_group"] = groups
    return out


class ModelControl:
    """Triton's model repository API at ``http_url`` (``http://host:port``)."""

    def __init__(self, http_url: str, timeout_s: float = 120.0):
        self.http_url = http_url.rstrip("/")
        self.timeout_s = timeout_s

    def _call(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.http_url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with _DIRECT.open(req, timeout=self.timeout_s) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except OSError as exc:
            raise AutoGLMError(f"Triton at {self.http_url} is unreachable ({exc}): start it (`autoglm serve`) "
                               "or pass --triton-url") from exc

    def config(self, model: str) -> dict[str, Any]:
        """The model's effective config (HTTP JSON form)."""
        status, body = self._call("GET", f"/v2/models/{model}/config")
        if status != 200:
            raise AutoGLMError(f"Triton has no loaded model '{model}' ({status}: {_message(body)}): load it or "
                               "pick a variant from repository/task.json")
        return json.loads(body)

    def ready(self, model: str) -> bool:
        return self._call("GET", f"/v2/models/{model}/ready")[0] == 200

    def load(self, model: str, config: dict[str, Any] | None = None) -> float:
        """Load ``model`` (with ``config`` as an override); returns the seconds Triton took."""
        started = time.monotonic()
        body = {"parameters": {"config": json.dumps(config)}} if config is not None else {}
        status, reply = self._call("POST", f"/v2/repository/models/{model}/load", body)
        if status != 200:
            hint = ("start Triton with --model-control-mode=explicit" if "explicit" in _message(reply)
                    else "check the model's files and Triton's log")
            raise AutoGLMError(f"Triton refused to load '{model}' ({status}: {_message(reply)}): {hint}")
        return time.monotonic() - started

    def unload(self, model: str) -> None:
        status, reply = self._call("POST", f"/v2/repository/models/{model}/unload", {})
        if status != 200:
            raise AutoGLMError(f"Triton refused to unload '{model}' ({status}: {_message(reply)})")

    def apply(self, cfg: ServingConfig, base: dict[str, Any]) -> dict[str, Any]:
        """Apply ``cfg`` over ``base`` live and check Triton reports it; returns the applied config."""
        wanted = override(base, cfg)
        seconds = self.load(cfg.model, wanted)
        got = self.config(cfg.model)
        mismatched = [k for k, v in serving_knobs(wanted).items() if serving_knobs(got)[k] != v]
        mismatched += [k for k, v in cfg.parameters or () if model_parameters(got).get(k) != v]
        if mismatched:
            raise AutoGLMError(f"Triton accepted the config of '{cfg.model}' but reports different {mismatched}: "
                               f"wanted {serving_knobs(wanted)}, got {serving_knobs(got)}; check Triton's log")
        applied = serving_knobs(got)
        if cfg.parameters:
            applied["parameters"] = {k: model_parameters(got).get(k) for k, _ in cfg.parameters}
        return {"applied": applied, "load_s": seconds}


class LiveModels:
    """The models a search touches on a live Triton: loaded on first use (from the repository on disk) and
    given back as they were found by :meth:`restore` (unloaded when the search loaded them)."""

    def __init__(self, control: ModelControl):
        self.control = control
        self.originals: dict[str, dict[str, Any]] = {}
        self.loaded_here: list[str] = []

    def base(self, model: str) -> dict[str, Any]:
        """The config ``model`` had before the search touched it (loading it first when it is not loaded)."""
        if model not in self.originals:
            if not self.control.ready(model):
                self.control.load(model)
                self.loaded_here.append(model)
            self.originals[model] = self.control.config(model)
        return self.originals[model]

    def apply(self, cfg: ServingConfig) -> dict[str, Any]:
        """:meth:`ModelControl.apply` over the model's original config."""
        return self.control.apply(cfg, self.base(cfg.model))

    def restore(self, keep: str | None = None) -> None:
        """Every touched model back to its original config (``keep`` stays loaded as it is now)."""
        problems = []
        for model, config in self.originals.items():
            try:
                if model == keep:
                    continue
                if model in self.loaded_here:
                    self.control.unload(model)
                else:
                    self.control.load(model, config)  # the config found before, applied the same live way
            except AutoGLMError as exc:
                problems.append(str(exc))
        if problems:
            raise AutoGLMError("could not restore Triton's models: " + "; ".join(problems)
                               + ". Reload them from the repository (unload, then load) or restart Triton")


def serving_knobs(config: dict[str, Any]) -> dict[str, Any]:
    """The swept knobs as Triton reports them in a config (HTTP JSON form)."""
    batching = config.get("dynamic_batching") or {}
    groups = config.get("instance_group") or [{}]
    return {"max_queue_delay_us": int(batching.get("max_queue_delay_microseconds", 0)),
            "preferred_batch_sizes": [int(b) for b in batching.get("preferred_batch_size", [])],
            "instances": int(groups[0].get("count", 1)),
            "max_queue_size": int((batching.get("default_queue_policy") or {}).get("max_queue_size", 0)),
            "max_batch_size": int(config.get("max_batch_size", 0))}


def model_parameters(config: dict[str, Any]) -> dict[str, str]:
    """A config's model parameters (HTTP JSON form) as name -> string value."""
    return {k: str((v or {}).get("string_value", "")) for k, v in (config.get("parameters") or {}).items()}


def _message(body: bytes) -> str:
    try:
        return str(json.loads(body).get("error", body[:200].decode(errors="replace")))
    except (ValueError, AttributeError):
        return body[:200].decode(errors="replace") or "(empty reply)"
