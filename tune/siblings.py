"""Compression siblings: the best trained model served every searched way, for the cost of compressing it.

Trained checkpoints are cached by everything that shapes training (:func:`tune.objective.training_key`),
so a trial that repeats a finished trial's model and training knobs with other compression knobs never
retrains: it costs an export, the compression, scoring and timing. When a trial completes with the best
metric so far, its siblings are queued: the same trained model under each searched quantization mode with
pruning off, leaving out a mode whose variant fine-tunes (QAT: a sibling would cost a training, not a
compression; pruning also costs metric). The sampler still draws them as trials. The front then holds the best
trained model uncompressed (the top metric) and quantized (cheaper to serve) at a fraction of a trial's cost, instead of
whichever one compression setting the sampler happened to draw for it. Siblings are sampled, charged and
recorded like any trial; their ``sibling_of`` attribute names the trial they repeat.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from autoglm.tasks import Knob
from tune import attributes as attrs

MODE, RATIO = "quantize.mode", "prune.ratio"


def sibling_params(params: Mapping[str, Any], space: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``params`` under every searched quantization mode that does not fine-tune (not quantize.mode 'qat'), with
    pruning off, except ``params`` itself."""
    from compress import fine_tunes

    mode = space.get(MODE)
    modes = [m for m in mode.choices if not fine_tunes({"quantize": {"mode": m}})] \
        if isinstance(mode, Knob) and mode.choices else [params.get(MODE)]
    ratio = space.get(RATIO)
    off = {RATIO: 0.0} if isinstance(ratio, Knob) and ratio.low is not None and ratio.low <= 0.0 else {}
    siblings = []
    for m in modes:
        sibling = {**params, **off, **({MODE: m} if isinstance(mode, Knob) else {})}
        if sibling != dict(params) and sibling not in siblings:
            siblings.append(sibling)
    return siblings


class CompressionSiblings:
    """``study.optimize`` callback: queue a new best trial's compression siblings (see the module)."""

    def __init__(self, space: Mapping[str, Any], direction: str, room: Callable[[Any], int] | None = None):
        """``room(study)``: trials the study will still run (None: no bound), so that none is left queued."""
        self.space, self.maximize, self.room = space, direction == "maximize", room
        self.searched = any(isinstance(space.get(k), Knob) for k in (MODE, RATIO))

    def __call__(self, study, trial) -> None:
        import optuna

        complete = optuna.trial.TrialState.COMPLETE
        if not self.searched or trial.state != complete or attrs.SIBLING_OF.on(trial):
            return
        # the task's metric as recorded (it need not be an objective, nor the first one)
        metrics = [attrs.metric(t) for t in study.get_trials(deepcopy=False, states=(complete,))
                   if attrs.OBJECTIVES.on(t)]
        if not metrics or attrs.metric(trial) != (max if self.maximize else min)(metrics):
            return
        siblings = sibling_params(trial.params, self.space)
        if self.room is not None:
            queued = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))
            siblings = siblings[:max(0, self.room(study) - queued)]
        for params in siblings:
            study.enqueue_trial(params, user_attrs=attrs.SIBLING_OF.tag(trial.number), skip_if_exists=True)
