"""Random draws in the second half of a Bayesian serving study (``loadtest.tune.late_random``).

A Bayesian sampler spends a short study near the front it models first, the capacity end for a batching
model; the other end of the front (the lowest J/request) comes from draws spread over the knobs, which random
search makes and a model rarely does. Here the model proposes every trial of the study's first half, so what
the study finds by then is the model's own, and in the second half ``share`` of the trials, evenly spaced, are
random draws (the model still learns from them).
"""

from __future__ import annotations

from typing import Any

from autoglm._lazy import require


def late_draws(model, seed: int | None, n_trials: int, share: float):
    """``model`` (a Bayesian Optuna sampler) with ``share`` of the trials after the first ``n_trials // 2`` drawn
    at random instead; ``model`` itself where ``share`` is 0."""
    if not share:
        return model
    optuna = require("optuna", purpose="loadtest --tune")

    class LateDraws(optuna.samplers.BaseSampler):
        def __init__(self) -> None:
            self.model, self.random = model, optuna.samplers.RandomSampler(seed=seed)

        def pick(self, trial):
            return self.random if is_late_draw(trial.number, n_trials, share) else self.model

        def infer_relative_search_space(self, study, trial) -> dict[str, Any]:
            chosen = self.pick(trial)
            return {} if chosen is self.random else chosen.infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space) -> dict[str, Any]:
            return self.model.sample_relative(study, trial, search_space) if search_space else {}

        def sample_independent(self, study, trial, param_name, param_distribution) -> Any:
            return self.pick(trial).sample_independent(study, trial, param_name, param_distribution)

        def before_trial(self, study, trial) -> None:
            self.model.before_trial(study, trial)

        def after_trial(self, study, trial, state, values) -> None:
            self.model.after_trial(study, trial, state, values)

        def reseed_rng(self) -> None:
            self.model.reseed_rng()
            self.random.reseed_rng()

    return LateDraws()


def is_late_draw(number: int, n_trials: int, share: float) -> bool:
    """Whether trial ``number`` (0: the first) is drawn at random: in the second half, ``share`` of the trials,
    evenly spaced (each whose index in that half crosses the next multiple of 1 / share)."""
    k = number - n_trials // 2
    return k >= 0 and int((k + 1) * share) > int(k * share)
