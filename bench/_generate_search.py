"""The charlm ``:generate`` half of the loadtest search benchmark: the generation model's own knobs.

One charlm model (nanoGPT's CPU shakespeare_char architecture, 4L/4H/128d, context 64, briefly trained: speed
does not depend on the weights) is compressed with its decode graphs and served by the bundled Triton behind
the gateway, as ``bench generate`` serves it. Every request streams (``stream: true``) a greedy continuation of a
64-char validation prompt, 64 new characters (``bench generate``'s workload). ``loadtest --tune``'s study code
searches the generation model's knobs (decode slots, stream interval, how the decode step's idle threads wait,
instances: :mod:`loadtest.generate_space`) with its default sampler, random and the grid, the same number of
windows each; capacity is tokens/s per instance within a streaming SLO (p95 time to first token and p95
inter-token latency), energy J/token. ``--generate-dev`` serves a development model instead (:data:`DEV_TASK`), on
which the samplers are compared (:mod:`bench._sampler_choice`).
"""

from __future__ import annotations

import json
from pathlib import Path

from bench._serving_search import Search, replicates

SLO_TTFT_MS = 200.0  # a reply that starts within a fifth of a second reads as immediate
SLO_ITL_MS = 20.0  # 50 tokens/s per stream: faster than anyone reads
PROMPT_CHARS, NEW_TOKENS = 64, 64  # bench generate's workload


def _space(quick: bool):
    """The knob ranges every method searches: decode slots 4..64, the stream interval 0..20 ms (5 ms steps), the
    spinning modes of ``loadtest.tune``'s default and 1..2 instances (one with ``quick``); its grid (the ranges'
    ends, every mode and instance count) is 16 configs (8 with ``quick``)."""
    from autoglm.config import LoadtestTuneSettings

    return LoadtestTuneSettings(max_sequences=(4, 64), stream_interval_ms=(0, 20), stream_interval_step_ms=5,
                                instances=(1, 1) if quick else (1, 2), users=24, steps=3, step_s=2.0,
                                startup_trials=4, verify_s=4 if quick else 8,
                                replicates=replicates())


DEV_TASK = "json"
"""The development serving task (``--generate-dev``): the pool's charlm on its JSON corpus, at the pool's smaller
shape (2 layers x 64; :mod:`bench.pool`, a development task there too)."""


def release(workdir: Path, quick: bool, dev: bool = False):
    """Train and compress the charlm model with its generation model; the settings on free ports. ``dev``: the
    development serving task's model (:data:`DEV_TASK`) instead of the one the goals are judged on."""
    from autoglm.config import load_settings
    from autoglm.train import train_run
    from compress.stage import compress_run
    from serve import on_free_ports

    brief = ["train.max_steps=60", "train.eval_every=1000", "train.eval_batches=4", "compress.variants=['fp32']",
             "compress.exporter='legacy'", "measure.repeats=3", "measure.batch_sizes=[1]"]
    if dev:
        from bench.pool import POOL

        settings = POOL[DEV_TASK].settings(0, workdir, ["run.name=bench", *brief])
    else:
        settings = load_settings(Path(__file__).resolve().parents[1] / "configs" / "charlm.toml", [
            f"run.root='{workdir / 'runs'}'", f"run.cache_dir='{workdir / 'cache'}'", "run.name=bench", *brief])
    train_run(settings, progress=False)
    compress_run(settings, progress=False)
    return on_free_ports(settings)


def _payloads(settings, task_info: dict, path: Path) -> Path:
    """Streaming :generate bodies: 32 validation prompts of PROMPT_CHARS characters, NEW_TOKENS new, greedy."""
    from autoglm.tasks import get_task
    from compress.decode import prompts
    from loadtest.payloads import GENERATE, write_payloads

    task = get_task(settings)
    task.prepare()
    bodies = [{"path": GENERATE, "body": {"prompt": "".join(task.vocab[i] for i in p), "max_new_tokens": NEW_TOKENS,
                                          "temperature": 0, "stream": True}}
              for p in prompts(task, task_info["model_args"], 32, PROMPT_CHARS)]
    return write_payloads(path, {"task": task_info["task"], "per_request": 1, "scenarios": {"generate": bodies},
                                 "unavailable": {}})


class GenerateSearch(Search):
    """The studies over the generation model's knobs: one stack (Triton and the gateway), one payload file."""

    capacity, energy, unit = "capacity_per_instance_tps", "j_per_token", "tokens/s"

    def __init__(self, settings, serving, workdir: Path, quick: bool):
        from autoglm.artifacts import RunDir
        from loadtest.control import LiveModels, ModelControl
        from loadtest.energy_join import EnergySource
        from loadtest.generate_space import StreamSlo
        from loadtest.study import Window

        self.workdir, self.quick, self.tune = workdir, quick, _space(quick)
        run = RunDir(settings.run.root, settings.run.name)
        self.task_info = json.loads((run.stage_dir("repository") / "task.json").read_text())
        self.model = self.task_info["generate"]
        self.models = [self.model]
        payloads = _payloads(settings, self.task_info, workdir / "payloads.json")
        energy = EnergySource(settings.measure.energy, settings.measure.watts_per_core,
                              urls=(serving.gateway.url, serving.triton_url))
        self.slo = StreamSlo.of(SLO_TTFT_MS, SLO_ITL_MS, 0.01)
        self.window = Window("generate", serving.gateway.url, payloads, serving.triton_metrics_url, energy, self.slo,
                             self.tune.users, self.tune.steps, self.tune.step_s, 0.5)
        self.live = LiveModels(ModelControl(serving.triton_url))
        self.baseline = self.space(self.tune).baseline_params(self.live.base(self.model))

    def space(self, tune):
        from loadtest.generate_space import GenerateSpace

        return GenerateSpace.from_settings(tune, self.model)

    def label(self, row: dict | None) -> str:
        if not row:
            return "—"
        p = row["params"]
        return (f"{p['max_sequences']} slots, interval {p['stream_interval_ms']:g} ms, spinning "
                f"{p['intra_op_spinning']}, ×{p['instances']}")

    def verified_note(self, verified: dict) -> str:
        return (f"{verified['users']} users, TTFT p95 {verified['ttft_p95_ms']:.0f} ms, inter-token p95 "
                f"{verified['itl_p95_ms']:.2f} ms")

    def notes(self, windows: int) -> list[str]:
        t = self.tune
        return [f"knobs of {self.model}: decode slots {list(t.max_sequences)} (log scale), stream interval "
                f"{list(t.stream_interval_ms)} ms ({t.stream_interval_step_ms} ms steps), the decode step's idle "
                f"threads {list(t.intra_op_spinning)} (compress.generate.intra_op_spinning), instances "
                f"{list(t.instances)}; the grid is both ends of each range, every mode and instance count "
                f"({windows - 1} configs); the decode precision is not a knob (compress publishes one generation "
                "model)",
                f"every method starts at the baseline (the repository's config: {self.baseline}); a window is one "
                f"step ladder {t.users // t.steps}..{t.users} streaming users through the gateway, {t.step_s:g} s a "
                f"step, each request a {PROMPT_CHARS}-char prompt and {NEW_TOKENS} new tokens (greedy); capacity = "
                f"the best step's tokens/s within TTFT p95 <= {SLO_TTFT_MS:g} ms, inter-token p95 <= "
                f"{SLO_ITL_MS:g} ms and 1% errors, per instance, steps out of order pooled"]
