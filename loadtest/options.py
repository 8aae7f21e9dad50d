"""Load-test options beyond ``autoglm.config.LoadtestSettings`` (users, duration, SLO).

They live here until the shared config grows them (the fields map one to one onto a future
``loadtest`` section); the CLI sets them with flags. Same habits as the config: unknown keys refused,
checked at construction, errors that name the fix.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from autoglm.config import Settings


class SweepGrid(BaseModel):
    """The operating points: every serving config (variant x delay x preferred sizes x instances) is
    applied to the live Triton and measured at every client concurrency in ``users``."""

    model_config = ConfigDict(extra="forbid")
    variants: list[str] = Field(default_factory=list, description="task.json variant names or Triton model "
                                "names; empty: the recommended model; ['all']: every published variant")
    max_queue_delay_us: list[int] = Field(default_factory=lambda: [0, 2000], min_length=1)
    preferred_batch_sizes: list[list[int] | None] = Field(
        default_factory=lambda: [None], min_length=1, description="None keeps the model's own setting")
    instances: list[int] = Field(default_factory=lambda: [1, 2], min_length=1)
    max_queue_size: list[int | None] = Field(
        default_factory=lambda: [None], min_length=1, description="Triton's queue bound; 0 unbounded, None "
        "keeps the model's own (Triton 2.51 stalls ~500 ms at a time under any bound: compare with 0)")
    users: list[int] = Field(default_factory=list, description="client concurrency; empty: 1 and loadtest.users")
    window_s: float = Field(5.0, gt=0, description="measured seconds per operating point")

    @model_validator(mode="after")
    def _ranges(self) -> SweepGrid:
        if any(d < 0 for d in self.max_queue_delay_us):
            raise ValueError(f"sweep max_queue_delay_us {self.max_queue_delay_us} must be >= 0 µs")
        if any(q is not None and q < 0 for q in self.max_queue_size):
            raise ValueError(f"sweep max_queue_size {self.max_queue_size} must be >= 0 (0: unbounded)")
        if any(n < 1 for n in [*self.instances, *self.users]):
            raise ValueError("sweep instances and users must all be >= 1")
        if any(sizes == [] for sizes in self.preferred_batch_sizes):
            # Triton's auto-complete turns an empty list into [max_batch_size], so [] cannot be applied
            raise ValueError("an empty preferred_batch_sizes list becomes [max_batch_size] in Triton: use none "
                             "(the model's own setting) or list the sizes, e.g. 'none;8,16'")
        if any(b < 1 for sizes in self.preferred_batch_sizes if sizes for b in sizes):
            raise ValueError(f"sweep preferred_batch_sizes {self.preferred_batch_sizes} must be >= 1")
        return self

    def concurrency(self, default_users: int) -> list[int]:
        return sorted(set(self.users or [1, default_users]))

    def size(self, n_models: int, default_users: int) -> int:
        """Operating points in the sweep (each one a measured window)."""
        return (n_models * len(self.max_queue_delay_us) * len(self.preferred_batch_sizes) * len(self.instances)
                * len(self.max_queue_size) * len(self.concurrency(default_users)))


class LoadtestOptions(BaseModel):
    """Where to send load and how; defaults come from ``serve`` settings."""

    model_config = ConfigDict(extra="forbid")
    target: str | None = Field(None, description="gateway base URL; default http://<serve.host>:<gateway_port>")
    triton_url: str | None = Field(None, description="Triton HTTP URL; default from serve settings")
    metrics_url: str | None = Field(None, description="Triton metrics URL; default from serve settings")
    scenario: Literal["task", "v2", "triton", "generate"] = "task"
    shape: Literal["steady", "step", "spike"] = "steady"
    shape_steps: int = Field(4, ge=1, description="steps of the step shape (each one a reported phase)")
    spawn_rate: float | None = Field(None, gt=0, description="users started per second; default all in 1 s")
    warmup_s: float = Field(1.0, ge=0, description="seconds after spawning before the window opens")
    model: str | None = Field(None, description="variant or Triton model name; default task.json's recommended")
    pids: list[int] = Field(default_factory=list, description="serving processes to meter besides those found "
                            "listening on the target and Triton ports")
    samples: int = Field(128, ge=1, description="distinct validation requests in the payload file")
    per_request: int = Field(1, ge=1, description="validation examples per request (the client's batch)")
    generate_tokens: int = Field(8, ge=1, description="max_new_tokens of :generate requests (language models)")
    overhead: bool = Field(True, description="also measure Triton directly at the same load (gateway overhead)")
    sweep: bool = False
    grid: SweepGrid = Field(default_factory=SweepGrid)
    keep_recommended: bool = Field(False, description="leave the live Triton on the recommended config")

    @model_validator(mode="after")
    def _shapes_are_single_windows(self) -> LoadtestOptions:
        if self.sweep and self.scenario == "generate":
            raise ValueError("the sweep tunes Triton's dynamic batching, which the generation model does not use "
                             "(it batches its own steps): drop --sweep for --scenario generate")
        if self.sweep and self.shape != "steady":
            raise ValueError(f"the sweep measures steady windows; shape '{self.shape}' applies to a single run: "
                             "drop --sweep or use --shape steady")
        return self

    def urls(self, settings: Settings) -> tuple[str, str, str]:
        """(gateway, Triton HTTP, Triton metrics) URLs."""
        serve = settings.serve
        triton = self.triton_url or serve.triton_url or f"http://{serve.host}:{serve.triton_http_port}"
        metrics = self.metrics_url or f"http://{serve.host}:{serve.triton_metrics_port}/metrics"
        gateway = self.target or f"http://{serve.host}:{serve.gateway_port}"
        return gateway.rstrip("/"), triton.rstrip("/"), metrics

    def host_for(self, scenario: str, settings: Settings) -> str:
        gateway, triton, _ = self.urls(settings)
        return triton if scenario == "triton" else gateway
