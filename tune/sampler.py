"""Samplers: TPE (default), NSGA-II, random or GP, and a random start-up that counts only drawn trials.

Optuna's TPE and GP draw their first ``n_startup_trials`` at random and model from then on, counting every
finished trial. This tuner also *places* trials: a study's warm start and the compression siblings of its
best model (see tune.siblings), which repeat one trained model under other compression settings. A
warm-started study thus has three finished trials after its first model, all one point of the architecture
and training space, and TPE would start modelling from them: its "good" group is that one point, so it
samples next to it and the search stays where the prior put it. :class:`DrawnStartup` counts only the trials
the sampler drew, so the start-up explores the space besides the placed ones; the model then learns from
all of them.
"""

from __future__ import annotations

import warnings
from typing import Any

from autoglm._lazy import require
from autoglm.errors import ConfigError
from tune import attributes as attrs

optuna = require("optuna", None, "tuning")


def make_sampler(name: str, seed: int, n_objectives: int, startup_trials: int | None = None):
    """TPE (multivariate, constant liar for parallel workers), NSGA-II, random or GP.

    ``startup_trials``: trials drawn at random before TPE or GP models (None: max(4, 2 x objectives) for
    TPE, 4 for GP); placed trials (warm start, compression siblings) come on top (:class:`DrawnStartup`).
    """
    samplers = optuna.samplers
    if name == "tpe":
        startup = startup_trials or max(4, 2 * n_objectives)
        with warnings.catch_warnings():  # `group` is marked experimental; it is what makes multivariate TPE
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # work with conditional knobs
            return DrawnStartup(samplers.TPESampler(multivariate=True, group=True, constant_liar=True, seed=seed,
                                                    n_startup_trials=startup), startup, seed)
    if name == "nsga2":
        return samplers.NSGAIISampler(seed=seed, population_size=8)
    if name == "random":
        return samplers.RandomSampler(seed=seed)
    if name == "gp":
        startup = startup_trials or 4
        return DrawnStartup(samplers.GPSampler(seed=seed, n_startup_trials=startup, warn_independent_sampling=False),
                            startup, seed)
    raise ConfigError(f"tune.sampler={name!r} is unknown: use tpe, nsga2, random or gp")


def drawn_trials(study) -> int:
    """Finished (complete or stopped) trials that the sampler drew, not the tuner placed."""
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return sum(not attrs.placed(t) for t in study.get_trials(deepcopy=False, states=finished))


class DrawnStartup(optuna.samplers.BaseSampler):
    """``model`` (TPE or GP) once ``startup`` drawn trials have finished; random draws until then.

    The model keeps its own ``n_startup_trials`` equal to ``startup``: it counts every finished trial, so it is
    past its own start-up whenever this one is, and never models from fewer trials than it was told.
    """

    def __init__(self, model, startup: int, seed: int | None = None):
        self.model, self.startup = model, startup
        self.random = optuna.samplers.RandomSampler(seed=seed)
        # trial number -> whether it is drawn at random, decided once as it starts: one read of the study's
        # trials per trial, not one per parameter, and every parameter of a trial drawn the same way
        self._random: dict[int, bool] = {}

    def exploring(self, study) -> bool:
        """Whether the start-up still runs: fewer than ``startup`` drawn trials have finished."""
        return drawn_trials(study) < self.startup

    def _drawn_at_random(self, study, trial) -> bool:
        at_random = self._random.get(trial.number)
        return self.exploring(study) if at_random is None else at_random

    def infer_relative_search_space(self, study, trial) -> dict[str, Any]:
        return {} if self._drawn_at_random(study, trial) else self.model.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space) -> dict[str, Any]:
        return self.model.sample_relative(study, trial, search_space) if search_space else {}

    def sample_independent(self, study, trial, param_name, param_distribution) -> Any:
        chosen = self.random if self._drawn_at_random(study, trial) else self.model
        return chosen.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self._random[trial.number] = self.exploring(study)
        self.model.before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self._random.pop(trial.number, None)
        self.model.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.model.reseed_rng()
        self.random.reseed_rng()
