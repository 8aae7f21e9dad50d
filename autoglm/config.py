"""One typed config tree, loaded once: TOML file, then ``AUTOGLM_*`` environment, then ``--set`` flags.

Every section forbids unknown keys, so a typo is an error that suggests the right name instead of a
silently ignored setting. Stages receive the resolved :class:`Settings` and save it with their outputs.
"""

from __future__ import annotations

import datetime
import difflib
import json
import os
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, ValidationError, field_validator,
                      model_validator)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from autoglm.errors import ConfigError

ENV_PREFIX = "AUTOGLM_"
ENV_DELIMITER = "__"


class Section(BaseModel):
    # a number given where text goes (`--run 2024`, `tune.study_name=1`) is that text; no setting takes inf or nan
    # (TOML spells both): a duration, a rate or a limit of inf would pass `gt=0` and fail deep inside a stage
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True,
                              allow_inf_nan=False)


def toml_value(raw: str) -> Any:
    """``raw`` read as a TOML literal (``3e-4``, ``true``, ``[1, 2]``, ``'text'``); what is not one stays the
    (stripped) text, and so does a date: no setting is one (``--run 2024-06-01`` is a name)."""
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        return raw.strip()
    return raw.strip() if isinstance(value, datetime.date | datetime.time) else value


def _literal_leaves(value: Any) -> Any:
    """Environment variables reach a table's leaves as strings (AUTOGLM_TASK__MODEL__N_LAYER=2 -> "2"): read
    the numbers and booleans among them as ``--set`` would."""
    if isinstance(value, dict):
        return {k: _literal_leaves(v) for k, v in value.items()}
    if isinstance(value, str) and isinstance(parsed := toml_value(value), int | float | bool):
        return parsed
    return value


Table = Annotated[dict[str, Any], BeforeValidator(_literal_leaves)]  # a free-form table of the config


class RunSettings(Section):
    name: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="run directory name")
    root: Path = Field(Path("runs"), description="where run directories live")
    cache_dir: Path = Field(Path(".cache/autoglm"), description="prepared task data")
    seed: int = 1337
    threads: int | None = Field(None, ge=1, description="intra-op threads for torch and ONNX Runtime")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda|cuda:\d+)$", description="where training (train, tune "
                        "trials, DDP ranks: NCCL on CUDA), export and calibration run: auto (CUDA where torch sees "
                        "it, else cpu), cpu, cuda or cuda:N")


class TaskSettings(Section):
    name: str = Field("digits", description="built-in task name or 'module:attr' of your own Task class")
    data: str | None = Field(None, description="task data source, e.g. a UTF-8 text file for charlm")
    model_id: str | None = Field(None, description="pretrained model of the hf-* tasks: a local save_pretrained "
                                 "directory or a Hugging Face hub id")
    model: Table = Field(default_factory=dict, description="architecture overrides")


class TrainSettings(Section):
    """The shared training loop: an optimizer (AdamW by default), linear warmup then a decay schedule (cosine by
    default), accumulation, clipping, and opt-in feedback (gradient noise scale, curvature, adaptive batch)."""

    lr: float = Field(1e-3, gt=0)
    min_lr_frac: float = Field(0.1, ge=0, le=1, description="final lr as a fraction of lr")
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    warmup_frac: float = Field(0.05, ge=0, lt=1)
    batch_size: int = Field(32, ge=1)
    grad_accum: int = Field(1, ge=1)
    grad_clip: float = Field(1.0, ge=0, description="0 turns clipping off")
    max_steps: int = Field(2000, ge=1)
    time_budget_s: float | None = Field(None, gt=0, description="stop after this much training time")
    eval_every: int = Field(100, ge=1)
    eval_batches: int = Field(20, ge=1)
    optimizer: Literal["adamw", "sgd", "adafactor"] = Field("adamw", description="adamw (beta1, beta2), sgd "
                                                            "(Nesterov, momentum) or adafactor (torch's, factored)")
    momentum: float = Field(0.9, gt=0, lt=1, description="sgd: Nesterov momentum")
    schedule: Literal["cosine", "linear", "step", "constant"] = Field(
        "cosine", description="lr after warmup: cosine or linear decay to lr x min_lr_frac, step (x step_gamma "
        "every step_every), or constant")
    step_gamma: float = Field(0.1, gt=0, le=1, description="step schedule: lr factor at each decay")
    step_every: float = Field(0.3, gt=0, le=1, description="step schedule: steps between decays, as a fraction "
                              "of max_steps (counted from the end of warmup)")
    feedback_every: int = Field(0, ge=0, description="steps between feedback measurements (gradient noise scale, "
                                "top Hessian eigenvalue) logged as 'feedback' lines; 0 turns them off")
    adaptive_batch: bool = Field(False, description="grow grad_accum toward the measured gradient noise scale, up "
                                 "to max_grad_accum (needs feedback_every > 0); never below grad_accum")
    max_grad_accum: int = Field(8, ge=1, description="adaptive_batch: the most micro-batches per step")

    @model_validator(mode="after")
    def _feedback_for_adaptive(self) -> TrainSettings:
        if self.adaptive_batch and self.feedback_every == 0:
            raise ValueError("train.adaptive_batch measures the gradient noise scale: set train.feedback_every > 0 "
                             "(e.g. 50)")
        if self.adaptive_batch and self.max_grad_accum < self.grad_accum:
            raise ValueError(f"train.adaptive_batch grows grad_accum up to max_grad_accum: set "
                             f"train.max_grad_accum >= train.grad_accum ({self.grad_accum})")
        return self


class MeasureSettings(Section):
    warmup: int = Field(5, ge=0)
    repeats: int = Field(30, ge=3)
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 32], min_length=1)
    energy: Literal["auto", "nvml", "rapl", "estimated"] = "auto"
    watts_per_core: float = Field(10.0, gt=0, description="basis of estimated energy (CPU-seconds x W)")

    @model_validator(mode="after")
    def _positive_batches(self) -> MeasureSettings:
        if any(b < 1 for b in self.batch_sizes):
            raise ValueError("measure.batch_sizes must all be >= 1")
        return self


class EarlyStopSettings(Section):
    """Multi-objective successive halving: a trial stops at a rung when it falls outside the best
    1/reduction_factor of that rung's population by Pareto rank over (metric, latency, energy)."""

    enabled: bool = True
    reduction_factor: int = Field(3, ge=2)
    min_resource: int | Literal["auto"] = Field(
        100, description="training steps at the first rung; 'auto': from the budget, so that the rungs the "
        "population can fill end at the longest schedule (see tune.early_stop.auto_min_resource)")
    warmup_trials: int = Field(4, ge=1, description="trials a rung must have seen before it stops any")
    shared_schedule: bool = Field(False, description="every trial trains on one schedule: a searched "
                                  "train.max_steps is fixed at its range's longest, and the rungs decide how far "
                                  "each trial gets (successive halving's resource; rungs then compare like with "
                                  "like). False: max_steps stays a knob, rungs compare schedules at least as long")
    budget_trials: float | None = Field(None, gt=0, description="min_resource='auto': how many whole-schedule "
                                        "trials the budget pays for; None: tune.n_trials")
    extrapolate: bool = Field(False, description="also stop a trial between rungs when a power law fitted to its "
                              "validation curve, at the optimistic end of its uncertainty, still ends dominated by "
                              "a completed trial (see tune.curves)")
    first_rung_frac: float | None = Field(1 / 9, gt=0, lt=1, description="the first rung no earlier than this "
                                          "fraction of the longest schedule the space holds (min_resource is raised "
                                          "to it; 1/9: two rungs of reduction factor 3 below it at most): a rung at "
                                          "a twelfth of the schedule judges where the learning curves still cross; "
                                          "None: min_resource as it is")
    portfolio_grace: int = Field(0, ge=0, description="rungs a queued tune.portfolio entry passes without being "
                                 "judged (its values are recorded there for the others): an entry is a prior chosen "
                                 "for where it ends, often a lower learning rate that is behind early; 0: judged "
                                 "from the first rung like any trial")

    @field_validator("min_resource", mode="before")
    @classmethod
    def _steps_or_auto(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        if isinstance(value, str) and value.strip().isdigit() and int(value) >= 1:  # from the environment
            return int(value)
        raise ValueError("use a number of training steps >= 1, or 'auto'")


class TuneSettings(Section):
    sampler: Literal["tpe", "nsga2", "random", "gp"] = "tpe"
    startup_trials: int | None = Field(None, ge=1, description="tpe/gp: trials drawn at random before the model "
                                       "takes over; None: max(4, 2 x objectives). Trials the tuner queues (the "
                                       "warm start, compression siblings) come on top. Keep it a small part of "
                                       "the trials a budget fits, or the sampler never models")
    n_trials: int = Field(20, ge=1)
    timeout_s: float | None = Field(None, gt=0)
    storage: str | None = Field(None, description="SQLAlchemy URL; default: a journal file in the run")
    study_name: str = "autoglm"
    search_space: str = Field("default", description="preset name (default, training, compression, adaptive = default "
                              "narrowing around the best trials after the start-up; alias adaptive-v2) or a TOML file")
    space: Table = Field(default_factory=dict, description="per-knob overrides: a fixed value or "
                                  "{low, high, log, choices}, keyed like 'train.lr' or 'model.n_layer'")
    objectives: list[Literal["metric", "latency", "energy"]] = Field(
        default_factory=lambda: ["metric", "latency", "energy"], min_length=1
    )
    metric: str | None = Field(None, description="which of the task's metrics the 'metric' objective is, e.g. "
                               "'perplexity' for charlm or 'loss' for digits, in that metric's direction; None: the "
                               "task's own (charlm val_loss, digits accuracy). AutoTuner's objective= sets it")
    mlflow_uri: str | None = Field(None, description="MLflow tracking store logging each trial and the stage's "
                                   "manifest and report (compress's and loadtest's too), e.g. "
                                   "sqlite:///runs/mlflow.db or a server's http(s) URL (the mlflow extra); None: no "
                                   "tracking. Not part of the stage's config")
    serving_batch: int = Field(32, ge=1, description="latency objective: p95 at this batch size")
    probe_repeats: int = Field(30, ge=3, description="timed runs per latency/energy measurement in a trial")
    early_stop: EarlyStopSettings = Field(default_factory=EarlyStopSettings)
    warm_start: Table | None = Field(
        None, description="first trial of a new study: the configured model and training values (clipped into "
        "the searched ranges), compression knobs at their defaults, these knob values on top, e.g. "
        "{'quantize.mode' = 'static'}; None: the sampler draws every trial")
    compression_siblings: bool = Field(True, description="when a trial completes with the best metric so far, "
                                       "queue its trained model under each searched quantization mode, pruning "
                                       "off: cached checkpoints make these cost compression only")
    heartbeat_s: int = Field(30, ge=1, description="RDB storages: trials silent this long x2 are retried")
    workers: int = Field(1, ge=1, description="processes sharing this study (an Indexed Job's parallelism)")
    ddp_procs: int = Field(1, ge=1, description="train each trial data-parallel on this many torchrun ranks "
                           "(gloo on CPU, NCCL on GPU); early stopping then judges only finished trials")
    worker_index: int = Field(0, ge=0, description="this process's index among tune.workers, 0-based")
    max_metric_loss: float = Field(0.01, ge=0, description="selection: allowed loss vs the best, relative")
    latency_slo_ms: float | None = Field(None, gt=0, description="selection: p95 latency limit")
    max_joules: float | None = Field(None, gt=0, description="selection: energy per inference limit")
    weights: dict[Literal["metric", "latency", "energy"], float] = Field(
        default_factory=lambda: {"metric": 1.0, "latency": 0.5, "energy": 0.5}
    )
    portfolio: str | None = Field("builtin", description="transferable priors queued first in a new study (after "
                                  "tune.warm_start): 'builtin' (tune/portfolio.json), the path of a portfolio JSON "
                                  "file, or 'off'. Each entry is relative to the task (lr x, steps x, width x, ...), "
                                  "so it applies to tasks it was never learned on; judged by the rungs like any trial")
    portfolio_size: int = Field(4, ge=0, description="how many of the portfolio's entries a new study queues, first "
                                "ones first")
    metric_share: float = Field(0.0, ge=0, le=1, description="tpe/gp with several objectives: this share of the "
                                "trials drawn after the start-up is proposed for the metric alone (a single-objective "
                                "TPE over every completed trial, compression off, judged by the rungs on the metric "
                                "alone; the best model's compressed variants come from tune.compression_siblings); 0 "
                                "(default): every trial from the multi-objective model")

    @model_validator(mode="after")
    def _distinct_objectives(self) -> TuneSettings:
        if self.worker_index >= self.workers:
            raise ValueError(f"tune.worker_index={self.worker_index} must be below tune.workers={self.workers}")
        if len(set(self.objectives)) != len(self.objectives):
            raise ValueError(f"tune.objectives {self.objectives} repeats an objective: list each once")
        return self


Calibration = Literal["minmax", "entropy", "percentile"]  # ONNX Runtime's static INT8 calibration methods


class QuantizeSettings(Section):
    mode: Literal["auto", "dynamic", "static"] = Field("auto", description="int8/pruned-int8: auto = by the graph")
    preset: str | None = Field(None, description="named recipe; None chooses by the graph's ops")
    calibration: Calibration = "minmax"
    calibration_batches: int = Field(8, ge=0, description="batches of training inputs for static INT8")
    per_channel: bool = True


class PruneSettings(Section):
    ratio: float = Field(0.5, gt=0, lt=1, description="fraction of prunable channels removed")
    finetune_steps: int = Field(200, ge=0)
    finetune_lr_frac: float = Field(0.3, gt=0, le=1, description="fine-tune lr as a fraction of train.lr")


class QATSettings(Section):
    steps: int = Field(200, ge=1)
    # the model is trained already: QAT nudges weights onto the grid. On digits at 4-bit grids 0.2 beat both 0.1
    # and 1.0 (no better than fine-tuning in FP32, then PTQ)
    lr_frac: float = Field(0.2, gt=0, le=1, description="QAT lr as a fraction of train.lr (0.1 lost to PTQ "
                           "on one digits seed in three)")


class Int4Settings(Section):
    """INT4 weight-only quantization (ONNX Runtime's MatMulNBits): the int4 variants and int4 decode graphs."""

    # smaller blocks: more scales (block 32: 0.64 bytes per weight, 128: 0.54), a finer grid. 128 decoded the
    # development shapes (bench/_hf_models.DEV_SHAPES) 1.12-1.41x faster than 32 at 1-8 sequences on an AVX2
    # host, for +0.06% / +0.17% loss vs 32's +0.04% / +0.07% on the development corpora
    # (bench/results/2026-12-07-hf-int4-blocks.md); the decode graphs try finer blocks where the gate rejects it
    block_size: Literal[16, 32, 64, 128] = Field(128, description="weights sharing one scale along the input (the "
                                                 "decode graphs' first try: a rejected block is halved down to 32)")
    symmetric: bool = Field(False, description="no zero points: slightly smaller, slightly less accurate")
    # GPT-2-small shape, 2 cores: 4 decoded 1.6x (batch 1) and 1.5x (batch 8) faster than 0, at the same loss
    accuracy_level: Literal[0, 4] = Field(4, description="4: int8 compute (per-row activation blocks; VNNI/AVX2 "
                                          "kernels), 0: FP32 compute from dequantized weights")
    # the head is an LM's widest MatMul: in FP32 it cost half the batch-1 speed for a loss INT4 kept anyway
    keep_head: bool = Field(False, description="leave an LM's head (its last MatMul) in FP32")


class TritonModelSettings(Section):
    """How each variant is served; loadtest sweeps these live."""

    max_batch_size: int = Field(64, ge=1)
    max_queue_delay_us: int = Field(0, ge=0, description="dynamic batching delay; 0 batches what is queued")
    preferred_batch_sizes: list[int] = Field(default_factory=list)
    max_queue_size: int = Field(0, ge=0, description="Triton rejects requests beyond this queue; 0 = unbounded "
                                "(Triton 2.51 stalls ~500 ms under any bound: the gateway bounds load instead)")
    instances: int = Field(1, ge=1)
    intra_op_threads: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _preferred_fit(self) -> TritonModelSettings:
        too_big = [b for b in self.preferred_batch_sizes if not 1 <= b <= self.max_batch_size]
        if too_big:
            raise ValueError(f"preferred_batch_sizes {too_big} must be between 1 and max_batch_size="
                             f"{self.max_batch_size}: lower them or raise max_batch_size")
        return self


class GenerateSettings(Section):
    """KV-cache generation for decoder tasks (charlm): decode graphs and the streaming Triton model."""

    enabled: bool = Field(True, description="build prefill/step graphs and the <task>-generate model")
    int8: bool = Field(True, description="try dynamic INT8 graphs; served when within max_metric_loss and faster. "
                      "Their activation scale is per batch, so a sequence's tokens can depend on what "
                      "runs beside it; false: FP32 or INT4 (per-row), reproducible under any concurrency")
    int4: bool = Field(True, description="try INT4 weight-only graphs (compress.int4); served when within "
                       "max_metric_loss and the fastest")
    max_sequences: int = Field(32, ge=1, description="sequences decoded together (cache slots); more wait")
    max_waiting: int = Field(256, ge=0, description="requests waiting for a slot before new ones are refused")
    max_new_tokens: int = Field(1024, ge=1, description="upper bound of one request's max_new_tokens")
    stream_interval_ms: float = Field(10, ge=0, description="after the first token, send new tokens this often "
                                      "(0: a response per token, which caps throughput at ~1 ms CPU per token)")
    stream_responses_per_s: float = Field(500, ge=0, description="responses per second for all sequences "
                                          "together: n live sequences each send every n/budget s (0: no budget)")
    intra_op_threads: int = Field(1, ge=0, description="ONNX Runtime threads of the decode loop (0: all cores)")
    small_batch_step: bool = Field(True, description="serve a second step graph while few sequences step, where "
                                   "another precision within max_metric_loss (alone and mixed with the served one "
                                   "in each sequence) decoded those batches faster in compress's rounds")
    prefill_chunk: int = Field(8, ge=1, description="sequences encoded per prefill batch; a larger group joining "
                               "or sliding at once is split, so its first chunk steps while the rest is encoded")
    prefill_thread: Literal["auto", "true", "false"] = Field(
        "auto", description="encode joining prompts on a thread of their own while the other sequences step (true), "
        "or on the decode loop's, prefill_chunk of them after each step (false: every sequence waits for the chunk); "
        "auto: the thread only where intra_op_threads leave a core free (a second pool on the step's cores slows both)")
    kv_cache: Literal["int8", "fp32"] = Field("int8", description="KV cache of the quantized graphs: int8 "
                                              "(per-channel scales; used where it too keeps the loss within "
                                              "max_metric_loss, else fp32) or fp32. FP32 graphs keep an fp32 cache")
    intra_op_spinning: Literal["off", "run", "on"] = Field("run", description="how the decode step's idle ONNX "
                                                          "Runtime threads wait: off (sleep), run (spin within a "
                                                          "step, sleep after it), on (spin on after it too); "
                                                          "prefills always sleep. On a host busy with other "
                                                          "work, try off")

    @field_validator("prefill_thread", mode="before")
    @classmethod
    def _prefill_thread_word(cls, value: Any) -> Any:
        return str(value).lower() if isinstance(value, bool) else value  # TOML's true/false


class CompressSettings(Section):
    variants: list[str] = Field(default_factory=lambda: ["fp32", "int8", "pruned", "pruned-int8"], min_length=1,
                                description="variants to build, by the names compress registers "
                                "(compress.variant_names(); checked where compress and tune run)")
    checkpoint: str | None = Field(None, description="compress this checkpoint instead of tune's selection")
    exporter: Literal["dynamo", "legacy"] = "dynamo"
    simplify: bool = Field(True, description="onnxslim the export when it removes nodes (parity-checked after)")
    parity_atol: float = Field(1e-4, gt=0, description="FP32 parity gate: |onnx - torch| <= atol + rtol|torch|")
    parity_rtol: float = Field(1e-3, ge=0)
    max_metric_loss: float = Field(0.01, ge=0, description="INT8/pruned gate: allowed relative metric loss")
    quantize: QuantizeSettings = Field(default_factory=QuantizeSettings)
    prune: PruneSettings = Field(default_factory=PruneSettings)
    qat: QATSettings = Field(default_factory=QATSettings)
    int4: Int4Settings = Field(default_factory=Int4Settings)
    triton: TritonModelSettings = Field(default_factory=TritonModelSettings)
    generate: GenerateSettings = Field(default_factory=GenerateSettings)
    providers: list[str] = Field(default_factory=lambda: ["auto"], min_length=1, description="ONNX Runtime "
                                 "execution providers of compress's timing and the python-backend models: ['auto'] "
                                 "(on a GPU serve.device: TensorRT where onnxruntime-gpu has it, then CUDA, then CPU; "
                                 "on the CPU: CPU) or names from tensorrt, cuda, cpu, in priority order (a missing "
                                 "one is an error naming its package)")
    tensorrt_fp16: bool = Field(True, description="TensorRT (the EP in compress timing and Triton's ONNX Runtime "
                                "accelerator): FP16 kernels where TensorRT picks them; INT8 graphs keep their QDQ")

    @field_validator("providers")
    @classmethod
    def _known_providers(cls, value: list[str]) -> list[str]:
        known = {"auto", "tensorrt", "cuda", "cpu"}
        if unknown := [v for v in value if v not in known]:
            raise ValueError(f"unknown providers {unknown}: use ['auto'] or names from tensorrt, cuda, cpu")
        if "auto" in value and len(value) > 1:
            raise ValueError("'auto' stands alone: write ['auto'] or list providers by name")
        return value


class GatewayLimits(Section):
    """``serve.gateway``: the gateway's workers, keys and limits. Rate limits hold for the gateway on one host
    (its workers share their buckets); ``max_in_flight`` and the pool are per worker: N workers admit N×."""

    workers: int = Field(1, ge=1, description="uvicorn worker processes (a second one does not help on 2 cores)")
    grpc_port: int = Field(8081, ge=0, le=65535, description="KServe v2 over gRPC (tritonclient.grpc), on "
                           "serve.host like the HTTP port; 0 turns it off")
    api_keys_file: Path | None = Field(None, description="'name:sha256' lines (`python -m serve --new-api-key "
                                       "NAME` prints one); required when serve.host is beyond loopback")
    rate_limit_rps: float = Field(0, ge=0, description="per-key sustained requests/s; 0 turns it off")
    rate_limit_burst: int = Field(50, ge=1, description="per-key bucket size")
    max_body_bytes: int = Field(4 << 20, ge=1024)
    request_timeout_s: float = Field(10.0, gt=0)
    max_in_flight: int = Field(128, ge=1, description="requests admitted at once; beyond it: 503 + Retry-After")
    upstream_connections: int | None = Field(None, ge=1, description="keep-alive pool size; None: max_in_flight")
    connect_timeout_s: float = Field(1.0, gt=0)
    retry_after_s: int = Field(1, ge=1)
    max_new_tokens: int = Field(256, ge=1, description="upper bound of :generate's max_new_tokens")
    max_score_chars: int = Field(16384, ge=2)
    tracing: bool = Field(False, description="OpenTelemetry traces over OTLP/HTTP to $OTEL_EXPORTER_OTLP_ENDPOINT "
                          "(the standard OTEL_* variables apply): a span per request and per call to Triton, whose "
                          "traceparent makes Triton's own spans (configured to the same endpoint) join the trace; "
                          "needs the otel extra")
    access_log: bool = Field(False, description="uvicorn's access log, a line per request (≈10% of a small "
                             "request's CPU; the gateway's metrics count requests either way)")


class CanarySettings(Section):
    """A canary release: the gateway sends ``weight`` percent of each model's requests to ``version`` and the rest
    to the stable version, and ``autoglm release watch`` rolls the canary back when it does worse than the stable
    over ``window_s`` (a 5xx fraction above the stable's by ``error_margin``, or a p95 above the stable's by
    ``p95_margin`` and ``p95_slack_ms``)."""

    version: int | None = Field(None, ge=1, description="the repository version to canary (`autoglm serve --canary "
                                "N`); None: no canary")
    weight: float = Field(10.0, gt=0, lt=100, description="percent of requests sent to the canary")
    client_header: str = Field("x-client-id", pattern=r"^[A-Za-z0-9-]+$", description="a request header naming "
                               "the client: its requests stay on one version (sticky), as an API key's do; without "
                               "either a request picks a version at random")
    error_margin: float = Field(0.02, ge=0, le=1, description="roll back when the canary's 5xx fraction exceeds "
                                "the stable's by more than this")
    p95_margin: float = Field(0.5, ge=0, description="roll back when the canary's p95 exceeds the stable's by more "
                              "than this fraction of it ...")
    p95_slack_ms: float = Field(5.0, ge=0, description="... and by more than this many ms (smaller differences are "
                                "noise at these latencies)")
    window_s: float = Field(30.0, gt=0, description="the window the canary and the stable are compared over")
    min_requests: int = Field(50, ge=1, description="requests each version needs in the window before it is judged")
    check_every_s: float = Field(1.0, gt=0, description="how often `autoglm release watch` compares them")


class ServeSettings(Section):
    host: str = "127.0.0.1"
    gateway_port: int = Field(8080, ge=1, le=65535)
    triton_http_port: int = Field(8000, ge=1, le=65535)
    triton_grpc_port: int = Field(8001, ge=1, le=65535)
    triton_metrics_port: int = Field(8002, ge=1, le=65535)
    triton_url: str | None = Field(None, pattern=r"^http://[^/:\s]+:\d+/?$",
                                   description="use an external Triton (http://host:port) instead of starting one")
    flavour: Literal["python", "native"] = Field("python", description="repository flavour: python (the bundled "
                                                 "Triton) or native (NVIDIA's container)")
    models: list[str] = Field(default_factory=list, description="variants or model names to load; empty: all")
    autoscale: bool = Field(False, description="run the local autoscaler on the recommended model")
    autoscale_rules: Table = Field(default_factory=dict, description="autoscaling rule overrides "
                                            "(autoglm.autoscaling.AutoscaleRules), e.g. {max_instances = 3}; "
                                            "`autoglm serve -a KEY=VALUE` sets one")
    control_port: int = Field(9090, ge=0, le=65535, description="supervisor/autoscaler metrics; 0 turns it off")
    start_timeout_s: float = Field(90.0, gt=0)
    gateway: GatewayLimits = Field(default_factory=GatewayLimits)
    triton_tracing: bool = Field(True, description="with serve.gateway.tracing, the bundled Triton's own "
                                 "OpenTelemetry spans (request, model, compute) in the gateway's traces. Triton 2.51 "
                                 "can crash (SIGSEGV) when many concurrent requests are traced (its issue #7795, fixed "
                                 "in later releases): under load sample a fraction (OTEL_TRACES_SAMPLER="
                                 "parentbased_traceidratio) or set this false")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda|cuda:\d+)$", description="where the models are "
                        "served and timed (tune's latency/energy objectives too): auto (run.device's choice), cpu, "
                        "cuda or cuda:N; a GPU gives KIND_GPU instance groups on that device in both flavours")
    canary: CanarySettings = Field(default_factory=CanarySettings)


class SweepGrid(Section):
    """The operating points: every serving config (variant x delay x preferred sizes x instances) is
    applied to the live Triton and measured at every client concurrency in ``users``."""

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

    @field_validator("preferred_batch_sizes", "max_queue_size", mode="before")
    @classmethod
    def _none_spelled_out(cls, value: Any) -> Any:
        """TOML has no null: "none" in a config file or environment variable means None."""
        return [None if isinstance(v, str) and v.lower() == "none" else v for v in value] \
            if isinstance(value, list) else value

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


class LoadtestTuneSettings(Section):
    """``autoglm loadtest --tune``: a Bayesian study over the live Triton's serving knobs (each trial applied
    through model control, no restart), maximizing capacity per instance within the SLO and minimizing
    J/request. The gateway's ``max_in_flight`` is not a knob: the gateway reads it once at start and has no
    way to change it live, so a trial could not apply it without a restart."""

    enabled: bool = Field(False, description="run the study (--tune) instead of one window or the --sweep grid")
    n_trials: int = Field(20, ge=1, description="trials in the study, the baseline (the current config) first; "
                          "a rerun continues the study up to this many")
    sampler: Literal["tpe", "gp", "random", "grid"] = Field(
        "gp", description="gp/tpe: Bayesian (gp chosen on development serving tasks: bench loadtest "
        "--generate-dev, --search-dev); random; grid: every combination of the ranges' ends (and every variant, "
        "instance count and preferred option), for comparison")
    startup_trials: int = Field(4, ge=1, description="tpe/gp: trials drawn at random before the model takes over")
    late_random: float = Field(0.5, ge=0, lt=1, description="tpe/gp: share of the trials after the study's first "
                               "half drawn at random, evenly spaced (the front's far end; the first half stays the "
                               "model's; 0.5 chosen on a development serving task: bench loadtest --late-dev); 0: none")
    seed: int | None = Field(None, description="sampler seed (a fixed seed replays the same proposals)")
    variants: list[str] = Field(default_factory=lambda: ["all"], description="task.json variant names or Triton "
                                "model names to choose among; ['all']: every published variant; []: the recommended")
    max_batch_size: tuple[int, int] = Field((8, 64), description="[low, high] of the batch the batcher may form")
    preferred_batch_sizes: list[list[int]] = Field(
        default_factory=lambda: [[], [4], [8]], min_length=1, description="options, each a list of preferred "
        "sizes; [] prefers the largest batch (Triton's own default); every size must fit the lowest max_batch_size")
    max_queue_delay_us: tuple[int, int] = Field((0, 4000), description="[low, high] of the dynamic batcher's delay")
    delay_step_us: int = Field(500, ge=1, description="the delay's granularity")
    instances: tuple[int, int] = Field((1, 2), description="[low, high] of the model's instance count")
    users: int | None = Field(None, ge=1, description="the top of each trial's concurrency ladder; None: "
                              "loadtest.users")
    steps: int = Field(4, ge=1, description="concurrency ladder: users/steps, 2*users/steps, ..., users; a "
                       "trial's capacity is the best step's throughput within the SLO")
    step_s: float = Field(3.0, ge=1, description="measured seconds per step (locust changes users once a second)")
    verify_s: float = Field(15.0, gt=0, description="the steady window that verifies the best config at its "
                            "capacity concurrency")
    verify_candidates: int = Field(3, ge=1, description="the best feasible configs measured again in the "
                                   "verify_s window, beside the config served before the study: the best of them "
                                   "that holds the SLO is verified")
    write_back: bool = Field(True, description="write the verified config into the repository (--rollback undoes)")
    replicates: int = Field(1, ge=1, description="tpe/gp: windows a config on the study's front may take (its "
                            "value is their mean): after the startup trials, a window re-measures the first of the "
                            "verify_candidates best front configs with fewer, never two windows in a row; 1 "
                            "(default): every window a new draw")
    # the generation model's own knobs (--scenario generate: it batches its decode steps itself, no Triton batcher)
    max_sequences: tuple[int, int] = Field((4, 64), description="--scenario generate: [low, high] of the decode "
                                           "slots (sequences stepped together; more requests wait)")
    stream_interval_ms: tuple[int, int] = Field((0, 20), description="--scenario generate: [low, high] of the "
                                                "interval a stream's tokens are coalesced over (0: every token)")
    stream_interval_step_ms: int = Field(5, ge=1, description="the stream interval's granularity")
    # "on" is left out by default: it spins between steps too, on the cores the prefill, Triton and the gateway use
    intra_op_spinning: list[Literal["off", "run", "on"]] = Field(
        default_factory=lambda: ["off", "run"], min_length=1, description="--scenario generate: how the decode "
        "step's idle threads may wait (compress.generate.intra_op_spinning), the modes to choose among")

    @model_validator(mode="after")
    def _ranges(self) -> LoadtestTuneSettings:
        if self.max_sequences[0] < 1 or self.stream_interval_ms[0] < 0:
            raise ValueError("loadtest.tune.max_sequences must be >= 1 and stream_interval_ms >= 0 ms")
        for name in ("max_batch_size", "max_queue_delay_us", "instances", "max_sequences", "stream_interval_ms"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"loadtest.tune.{name} [{low}, {high}] has low > high: write it as [low, high]")
        if self.instances[0] < 1:
            raise ValueError(f"loadtest.tune.instances {list(self.instances)} must start at 1 or more: a model "
                             "with zero instances serves nothing")
        if self.max_batch_size[0] < 1 or self.max_queue_delay_us[0] < 0:
            raise ValueError("loadtest.tune.max_batch_size must be >= 1 and max_queue_delay_us >= 0 µs")
        too_big = sorted({b for sizes in self.preferred_batch_sizes for b in sizes
                          if not 1 <= b <= self.max_batch_size[0]})
        if too_big:
            raise ValueError(f"preferred batch sizes {too_big} do not fit every max_batch_size in "
                             f"{list(self.max_batch_size)}: keep them between 1 and {self.max_batch_size[0]} or "
                             "raise loadtest.tune.max_batch_size's low end")
        if self.users is not None and self.users < self.steps:
            raise ValueError(f"loadtest.tune.users={self.users} cannot make {self.steps} steps of at least one "
                             "user: raise users or lower loadtest.tune.steps")
        return self


class LoadtestSettings(Section):
    """Where to send load, how much and how, the SLO gate, and the sweep's grid; URLs default to ``serve``'s."""

    users: int = Field(16, ge=1)
    duration_s: float = Field(30, gt=0)
    slo_p95_ms: float = Field(200, gt=0)
    slo_error_rate: float = Field(0.01, ge=0, le=1)
    target: str | None = Field(None, description="gateway base URL; default http://<serve.host>:<gateway_port>")
    triton_url: str | None = Field(None, description="Triton HTTP URL; default from serve settings")
    metrics_url: str | None = Field(None, description="Triton metrics URL; default from serve settings")
    scenario: Literal["task", "v2", "triton", "generate"] = "task"
    shape: Literal["steady", "step", "spike"] = "steady"
    shape_steps: int = Field(4, ge=1, description="steps of the step shape (each one a reported phase)")
    spawn_rate: float | None = Field(None, gt=0, description="users started per second; default all in 1 s")
    warmup_s: float = Field(1.0, ge=0, description="seconds after spawning before the window opens")
    model: str | None = Field(None, description="variant or Triton model name; default task.json's recommended")
    api_key: SecretStr | None = Field(None, description="the gateway's API key, sent as a Bearer token (set it "
                                      "in AUTOGLM_LOADTEST__API_KEY: a run saves its config, with this masked)")
    pids: list[int] = Field(default_factory=list, description="serving processes to meter besides those found "
                            "listening on the target and Triton ports")
    samples: int = Field(128, ge=1, description="distinct validation requests in the payload file")
    per_request: int = Field(1, ge=1, description="validation examples per request (the client's batch)")
    generate_tokens: int = Field(8, ge=1, description="max_new_tokens of :generate requests (language models)")
    overhead: bool = Field(True, description="also measure Triton directly at the same load (gateway overhead)")
    sweep: bool = False
    grid: SweepGrid = Field(default_factory=SweepGrid)
    keep_recommended: bool = Field(False, description="leave the live Triton on the recommended config")
    tune: LoadtestTuneSettings = Field(default_factory=LoadtestTuneSettings)
    rollback: bool = Field(False, description="restore the repository config a --tune write-back replaced, and "
                           "do nothing else")
    # streaming generation (--scenario generate --tune) is judged on what a reader sees, not on whole streams
    slo_ttft_p95_ms: float = Field(500, gt=0, description="--scenario generate --tune: p95 time to first token")
    slo_itl_p95_ms: float = Field(50, gt=0, description="--scenario generate --tune: p95 inter-token latency")

    @model_validator(mode="after")
    def _shapes_are_single_windows(self) -> LoadtestSettings:
        if self.sweep and self.scenario == "generate":
            raise ValueError("the sweep tunes Triton's dynamic batching, which the generation model does not use "
                             "(it batches its own steps): drop --sweep (loadtest.sweep) for --scenario generate")
        if self.sweep and self.shape != "steady":
            raise ValueError(f"the sweep measures steady windows; shape '{self.shape}' applies to a single run: "
                             "drop --sweep (loadtest.sweep) or use --shape steady")
        if self.tune.enabled and self.sweep:
            raise ValueError("--tune and --sweep are two searches over the same knobs: pick one")
        if self.tune.enabled and self.shape != "steady":
            raise ValueError(f"--tune measures its own step ladder; shape '{self.shape}' applies to a single run: "
                             "drop --shape")
        return self

    def urls(self, serve: ServeSettings) -> tuple[str, str, str]:
        """(gateway, Triton HTTP, Triton metrics) URLs."""
        triton = self.triton_url or serve.triton_url or f"http://{serve.host}:{serve.triton_http_port}"
        metrics = self.metrics_url or f"http://{serve.host}:{serve.triton_metrics_port}/metrics"
        gateway = self.target or f"http://{serve.host}:{serve.gateway_port}"
        return gateway.rstrip("/"), triton.rstrip("/"), metrics

    def host_for(self, scenario: str, serve: ServeSettings) -> str:
        gateway, triton, _ = self.urls(serve)
        return triton if scenario == "triton" else gateway


DNS_LABEL = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"  # Kubernetes names of namespaces (and most objects)
DNS_NAME = r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"  # a host, a Secret's name


class IngressSettings(Section):
    """The gateway's way in from outside the cluster, TLS-terminated with a certificate from a Secret.
    Nothing is rendered until ``host`` is set."""

    host: str | None = Field(None, pattern=DNS_NAME, max_length=253,
                             description="the gateway's public DNS name, e.g. api.example.com; None: no Ingress or "
                             "HTTPRoute (the gateway stays a ClusterIP Service)")
    api: Literal["ingress", "gateway-api"] = Field(
        "ingress", description="ingress: a networking.k8s.io/v1 Ingress; gateway-api: a Gateway (HTTPS listener) "
        "and an HTTPRoute (gateway.networking.k8s.io/v1)")
    tls_secret: str = Field("autoglm-gateway-tls", pattern=DNS_NAME, max_length=253,
                            description="kubernetes.io/tls Secret in deploy.namespace with the host's certificate "
                            "(cert-manager's, or `kubectl create secret tls NAME --cert=... --key=...`)")
    class_name: str | None = Field(None, pattern=DNS_NAME, max_length=253,
                                   description="ingress: the IngressClass (None: the cluster's default); "
                                   "gateway-api: the GatewayClass of the rendered Gateway (required)")

    @model_validator(mode="after")
    def _gateway_api_needs_a_class(self) -> IngressSettings:
        if self.host and self.api == "gateway-api" and not self.class_name:
            raise ValueError("deploy.ingress.api='gateway-api' renders a Gateway, which names its GatewayClass: set "
                             "deploy.ingress.class_name (`kubectl get gatewayclass` lists them)")
        return self


class ResourceSettings(Section):
    """How the Triton container's resources follow what loadtest measured at the deployed serving config
    (``deploy/resources.py``); without a measurement the overlay's defaults stay."""

    memory_headroom: float = Field(1.5, ge=1.0, le=10.0, description="memory request and limit = the peak RSS "
                                   "loadtest measured for Triton's processes x this")
    cpu_limit_headroom: float = Field(1.5, ge=1.0, le=10.0, description="cpu overlay: cpu limit = the CPU Triton "
                                      "used at the measured capacity x this (the request is the CPU at the "
                                      "autoscaler's throughput target)")


class DeploySettings(Section):
    """What ``autoglm deploy render`` renders: the environment, where images live, the cluster's namespaces,
    the tune workers, the autoscaling rules and how the gateway is reached and scraped."""

    env: Literal["cpu", "gpu"] = Field("cpu", description="cpu or gpu (the gpu overlay asks for one GPU per pod)")
    registry: str = Field("localhost:5000", pattern=r"^[A-Za-z0-9][A-Za-z0-9.-]*(:[0-9]+)?(/[a-z0-9._-]+)*$",
                          description="where the gateway, model and tune images live, e.g. ghcr.io/acme")
    namespace: str = Field("autoglm", pattern=DNS_LABEL,
                           description="Kubernetes namespace of the stack")
    monitoring_namespace: str = Field("monitoring", pattern=DNS_LABEL,
                                      description="namespace of Prometheus and prometheus-adapter")
    tune_workers: int = Field(0, ge=0, description="tune workers sharing one PostgreSQL study (an Indexed Job); "
                              "0 renders no tune/ tree")
    tune_trials: int | None = Field(None, ge=1, description="trials in that study; None: the run's tune.n_trials")
    external_db: bool = Field(False, description="the tune Secret's url points outside the cluster: no PostgreSQL "
                              "StatefulSet")
    api_keys_file: Path | None = Field(None, description="'name:sha256' lines for the gateway; None: the run's "
                                       "earlier keys, else a new key printed once")
    autoscale: Table = Field(default_factory=dict, description="autoscaling rule overrides on top of "
                                      "serve.autoscale_rules, e.g. {max_instances = 8}")
    kustomize: bool = Field(True, description="check the rendered trees with `kubectl kustomize` where kubectl "
                            "exists")
    autoscaler: Literal["hpa", "keda"] = Field(
        "hpa", description="what scales Triton: hpa (autoscaling/v2 on prometheus-adapter's custom metrics) or keda "
        "(a KEDA ScaledObject querying Prometheus); both from the same rules, never both at once")
    prometheus_url: str | None = Field(
        None, pattern=r"^https?://[^\s]+$", description="the Prometheus KEDA queries (deploy.autoscaler='keda'); None: "
        "the Prometheus Operator's http://prometheus-operated.<monitoring_namespace>.svc:9090")
    monitors: bool = Field(True, description="render a ServiceMonitor (gateway) and a PodMonitor (Triton) for the "
                           "Prometheus Operator beside the prometheus.io annotations; false where its CRDs are absent")
    monitor_labels: dict[str, str] = Field(
        default_factory=dict, description="labels on them that Prometheus' serviceMonitorSelector and "
        "podMonitorSelector match, e.g. {release = 'kube-prometheus-stack'}")
    ingress: IngressSettings = Field(default_factory=IngressSettings)
    triton_image: str | None = Field(
        None, pattern=r"^[a-z0-9][a-z0-9./_:-]*:[A-Za-z0-9_][A-Za-z0-9._-]*$", description="the Triton server image the "
        "overlay runs, with its tag, "
        "e.g. nvcr.io/nvidia/tritonserver:25.11-py3; None: 24.10-py3 for cpu (the server version tested here), a "
        "current release for gpu (deploy.release.TRITON_IMAGES)")
    allow_capacity_mismatch: bool = Field(False, description="use loadtest's capacity even when it was measured on "
                                          "another repository flavour or device kind than the overlay serves (the "
                                          "capacity source says so); false: the default capacity instead")
    resources: ResourceSettings = Field(default_factory=ResourceSettings)

    @model_validator(mode="after")
    def _tune_options_need_workers(self) -> DeploySettings:
        if not self.tune_workers and (self.tune_trials is not None or self.external_db):
            raise ValueError("deploy.tune_trials and deploy.external_db shape the tune workers' Job: set "
                             "deploy.tune_workers (--tune-workers N) too, or drop them")
        return self


_config_file: ContextVar[Path | None] = ContextVar("autoglm_config_file", default=None)


class _TomlSource(PydanticBaseSettingsSource):
    """The config file: the lowest-priority source (env and flags override it)."""

    def get_field_value(self, field, field_name):  # pragma: no cover - unused, __call__ does the work
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = _config_file.get()
        return read_config_file(path) if path else {}


class Settings(BaseSettings):
    """The whole resolved configuration of a run."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_DELIMITER, extra="forbid", validate_assignment=True
    )

    run: RunSettings = Field(default_factory=RunSettings)
    task: TaskSettings = Field(default_factory=TaskSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    measure: MeasureSettings = Field(default_factory=MeasureSettings)
    tune: TuneSettings = Field(default_factory=TuneSettings)
    compress: CompressSettings = Field(default_factory=CompressSettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)
    loadtest: LoadtestSettings = Field(default_factory=LoadtestSettings)
    deploy: DeploySettings = Field(default_factory=DeploySettings)

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        return (init_settings, env_settings, _TomlSource(settings_cls))

    def section(self, name: str) -> dict[str, Any]:
        """One section as plain JSON data (what a stage's manifest records)."""
        return self.model_dump(mode="json")[name]

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True)

    def save(self, path: Path) -> Path:
        """Write the resolved config; it loads back with ``load_settings(path)``."""
        from autoglm.artifacts import write_atomic

        write_atomic(path, (self.to_json() + "\n").encode())
        return path


def read_config_file(path: Path | str) -> dict[str, Any]:
    """Parse a TOML (or a saved JSON) config file into nested dicts."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist: pass an existing file to --config")
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text())
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid {path.suffix[1:].upper() or 'TOML'}: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read ({exc.strerror}): check its permissions") from None


def parse_overrides(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["train.lr=3e-4", "task.name=charlm"]`` -> nested dict; values are TOML literals, else strings."""
    tree: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"flag '--set {pair}' is not of the form section.key=value (e.g. train.lr=3e-4)")
        value = toml_value(raw)
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"flag '--set {pair}' conflicts with another --set for '{part}'")
        node[parts[-1]] = value
    return tree


def load_settings(config: Path | str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Settings:
    """Resolve the config: file, then environment, then ``--set`` overrides (highest)."""
    _reject_unknown_env()
    token = _config_file.set(Path(config) if config else None)
    try:
        return Settings(**parse_overrides(overrides))
    except ValidationError as exc:
        raise ConfigError(_explain(exc, config)) from None
    except SettingsError as exc:  # an environment variable that does not parse (a list not written as JSON)
        raise ConfigError(f"{exc}; fix: write lists and tables in AUTOGLM_ variables as JSON, e.g. "
                          "AUTOGLM_MEASURE__BATCH_SIZES='[1, 32]'") from None
    finally:
        _config_file.reset(token)


def _reject_unknown_env() -> None:
    """pydantic-settings ignores unknown top-level variables; a typo there would silently do nothing."""
    sections = {name.upper() for name in Settings.model_fields}
    for var in os.environ:
        if var.startswith(ENV_PREFIX) and var[len(ENV_PREFIX):].split(ENV_DELIMITER)[0] not in sections:
            raise ConfigError(f"unknown environment variable {var}: AUTOGLM_ variables are "
                              f"AUTOGLM_<SECTION>__<KEY> with SECTION one of {sorted(sections)}")


def _explain(exc: ValidationError, config: Path | str | None) -> str:
    lines = ["invalid configuration:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"  - unknown key '{loc}'{_suggest(err['loc'])}")
            continue
        got = f" (got {err['input']!r})" if not isinstance(err.get("input"), dict) else ""
        msg = err["msg"].removeprefix("Value error, ")
        env = ENV_PREFIX + ENV_DELIMITER.join(str(p) for p in err["loc"]).upper()
        fix = f"set {loc} in {config or 'the config file'}, {env}, or --set {loc}=..." if loc else ""
        lines.append(f"  - {loc}: {msg}{got}; fix: {fix}" if loc else f"  - {msg}")
    return "\n".join(lines)


def _suggest(loc: tuple) -> str:
    model: type[BaseModel] = Settings
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return ""
        model = field.annotation
    known = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    where = ".".join(str(p) for p in loc[:-1])
    hint = f"; did you mean '{where + '.' if where else ''}{close[0]}'?" if close else ""
    return f"{hint} (known in {where or 'the top level'}: {', '.join(known)})"
