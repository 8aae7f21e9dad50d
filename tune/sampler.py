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

import math
import warnings
from typing import Any

from autoglm._lazy import require
from autoglm.errors import ConfigError
from tune import attributes as attrs

optuna = require("optuna", None, "tuning")


def startup_of(name: str | None, n_objectives: int, startup_trials: int | None = None) -> int:
    """Trials ``name``'s sampler draws before it models (:func:`make_sampler`'s rule; NSGA-II, random and a
    sampler object: ``tune.startup_trials``, else max(4, 2 x objectives))."""
    return startup_trials or (4 if name == "gp" else max(4, 2 * n_objectives))


def make_sampler(name: str, seed: int, n_objectives: int, startup_trials: int | None = None):
    """TPE (multivariate, constant liar for parallel workers), NSGA-II, random or GP.

    ``startup_trials``: trials drawn at random before TPE or GP models (None: max(4, 2 x objectives) for
    TPE, 4 for GP); placed trials (warm start, compression siblings) come on top (:class:`DrawnStartup`).
    """
    samplers = optuna.samplers
    startup = startup_of(name, n_objectives, startup_trials)
    if name == "tpe":
        with warnings.catch_warnings():  # `group` is marked experimental; it is what makes multivariate TPE
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # work with conditional knobs
            return DrawnStartup(samplers.TPESampler(multivariate=True, group=True, constant_liar=True, seed=seed,
                                                    n_startup_trials=startup), startup, seed)
    if name == "nsga2":
        return samplers.NSGAIISampler(seed=seed, population_size=8)
    if name == "random":
        return samplers.RandomSampler(seed=seed)
    if name == "gp":
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


class Narrowing(optuna.samplers.BaseSampler):
    """The ``adaptive`` search space: once ``startup`` drawn trials have finished, each numeric knob is drawn
    from the span of the best completed trials (the first ``top`` fraction of them by Pareto rank, at least two),
    widened by ``margin`` of that span (of the knob's whole range at least, so one value does not collapse it)
    and clipped to the knob's range. Log knobs narrow in log space; a step stays on its grid.

    The study's distributions stay the preset's (TPE's search space keeps one shape); only what ``sampler`` is
    asked to draw from narrows. A value ``sampler`` drew jointly (TPE's multivariate groups ignore the ranges
    they are given) that falls outside the narrowed range is drawn again, on its own, inside it.
    """

    def __init__(self, sampler, startup: int, top: float = 0.25, margin: float = 0.25):
        self.sampler, self.startup, self.top, self.margin = sampler, startup, top, margin
        self._ranges: dict[int, dict[str, tuple[float, float]]] = {}  # per running trial, decided as it starts

    def ranges(self, study) -> dict[str, tuple[float, float]]:
        """Knob name -> (low, high) a trial starting now draws from; empty during the start-up."""
        complete = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                    if t.values is not None]
        if drawn_trials(study) < self.startup or len(complete) < 2:
            return {}
        signs = [-1.0 if d == optuna.study.StudyDirection.MAXIMIZE else 1.0 for d in study.directions]
        from tune.early_stop import pareto_fronts

        ranked = [complete[i] for front in pareto_fronts([[s * v for s, v in zip(signs, t.values, strict=True)]
                                                          for t in complete]) for i in front]
        best = ranked[:max(2, math.ceil(self.top * len(complete)))]
        out = {}
        for name, dist in best[0].distributions.items():
            if isinstance(dist, optuna.distributions.FloatDistribution | optuna.distributions.IntDistribution):
                values = [t.params[name] for t in best if name in t.params]
                out[name] = self._span(values, dist)
        return out

    def _span(self, values, dist) -> tuple[float, float]:
        scale = (math.log, math.exp) if dist.log else (float, float)
        low, high = scale[0](dist.low), scale[0](dist.high)
        inner = [scale[0](v) for v in values]
        pad = max(self.margin * (max(inner) - min(inner)), 0.1 * (high - low))
        lo, hi = scale[1](max(low, min(inner) - pad)), scale[1](min(high, max(inner) + pad))
        step = dist.step if not dist.log else (1 if isinstance(dist, optuna.distributions.IntDistribution)
                                               else None)
        if step:  # outward onto the grid
            lo = dist.low + math.floor((lo - dist.low) / step + 1e-9) * step
            hi = min(dist.high, dist.low + math.ceil((hi - dist.low) / step - 1e-9) * step)
        return max(dist.low, lo), min(dist.high, hi)

    def _narrowed(self, trial, name: str, dist):
        span = self._ranges.get(trial.number, {}).get(name)
        numeric = optuna.distributions.FloatDistribution | optuna.distributions.IntDistribution
        if span is None or not isinstance(dist, numeric):
            return dist
        low, high = max(span[0], dist.low), min(span[1], dist.high)
        if low > high:
            return dist
        if isinstance(dist, optuna.distributions.IntDistribution):
            return optuna.distributions.IntDistribution(round(low), round(high), log=dist.log, step=dist.step)
        return optuna.distributions.FloatDistribution(low, high, log=dist.log, step=dist.step)

    def infer_relative_search_space(self, study, trial) -> dict[str, Any]:
        return self.sampler.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space) -> dict[str, Any]:
        drawn = self.sampler.sample_relative(study, trial, search_space)
        kept = {}
        for name, value in drawn.items():
            dist = search_space.get(name)
            narrowed = self._narrowed(trial, name, dist) if dist is not None else None
            # a knob left as it is (categorical, or no span yet) holds what was drawn from it; a narrowed one is
            # checked by its bounds (the value was drawn on the same step grid)
            if narrowed is None or narrowed is dist or narrowed.low <= value <= narrowed.high:
                kept[name] = value  # else: Optuna asks sample_independent for it, with the narrowed range
        return kept

    def sample_independent(self, study, trial, param_name, param_distribution) -> Any:
        return self.sampler.sample_independent(study, trial, param_name,
                                               self._narrowed(trial, param_name, param_distribution))

    def before_trial(self, study, trial) -> None:
        self._ranges[trial.number] = self.ranges(study)
        self.sampler.before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self._ranges.pop(trial.number, None)
        self.sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.sampler.reseed_rng()


class MetricShare(optuna.samplers.BaseSampler):
    """A share of the trials drawn after the start-up proposed for the task metric alone, served uncompressed.

    A multi-objective TPE splits its trials into "good" and "bad" by Pareto rank, so once the front holds a few
    cheap compressed points it spreads its proposals along the whole front; the metric's end of it gets no more
    than its share of a handful of trials, and the best metric stalls where a single-objective search keeps
    improving it. ParEGO draws a random scalarization per proposal; this sampler keeps the one weight that the
    front's other end lacks: every ``1/share``-th drawn trial after the start-up comes from a single-objective
    TPE fitted to the metric of every completed trial (its own study in memory, rebuilt per proposal), with the
    compression knobs off. Compression cannot raise the trained model's metric, and the best model's
    compressed variants come from :mod:`tune.siblings` for the cost of compressing it. Such a trial records
    ``proposed_for = "metric"``, and the rungs judge it on the metric alone (:class:`tune.early_stop.RungCallback`):
    served uncompressed, it would otherwise be stopped for the latency it never meant to save. The other trials
    are ``sampler``'s. Queued trials (warm start, portfolio, siblings) are never re-proposed.
    """

    def __init__(self, sampler, share: float, startup: int, seed: int | None = None, metric_index: int = 0,
                 off: dict[str, Any] | None = None):
        self.sampler, self.share, self.startup, self.seed = sampler, share, startup, seed
        self.metric_index, self.off = metric_index, dict(off or {})
        self._mirrors: dict[int, Any] = {}  # trial number -> its proposal (a trial of the metric-only study)

    def focused(self, study, trial) -> bool:
        """Whether ``trial`` is proposed for the metric alone: the share's turn among the drawn trials after the
        start-up (the i-th one when ceil((i + 1) x share) > ceil(i x share), so the first one is)."""
        if self.share <= 0 or "fixed_params" in trial.system_attrs:  # queued: its point is set
            return False
        i = drawn_trials(study) - self.startup
        return i >= 0 and math.ceil((i + 1) * self.share) > math.ceil(i * self.share)

    def _proposal(self, study, trial):
        """A trial of a single-objective study holding every completed trial's params and metric."""
        direction = study.directions[self.metric_index].name.lower()
        mirror = optuna.create_study(direction=direction, sampler=optuna.samplers.TPESampler(
            seed=None if self.seed is None else self.seed + trial.number, n_startup_trials=self.startup))
        done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        mirror.add_trials([optuna.trial.create_trial(params=t.params, distributions=t.distributions,
                                                     value=t.values[self.metric_index])
                           for t in done if t.values is not None and math.isfinite(t.values[self.metric_index])])
        return mirror.ask()

    def _off(self, name: str, dist) -> tuple[bool, Any]:
        value = self.off.get(name)
        if name not in self.off:
            return False, None
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            return value in dist.choices, value
        return dist.low <= value <= dist.high, value

    def infer_relative_search_space(self, study, trial) -> dict[str, Any]:
        return {} if trial.number in self._mirrors else self.sampler.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space) -> dict[str, Any]:
        return self.sampler.sample_relative(study, trial, search_space) if search_space else {}

    def sample_independent(self, study, trial, param_name, param_distribution) -> Any:
        proposal = self._mirrors.get(trial.number)
        if proposal is None:
            return self.sampler.sample_independent(study, trial, param_name, param_distribution)
        is_off, value = self._off(param_name, param_distribution)
        if is_off:
            return value
        try:
            return _suggest(proposal, param_name, param_distribution)
        except ValueError:  # a range that changed since earlier trials: the mirror refuses it, the sampler draws
            return self.sampler.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        if self.focused(study, trial):
            self._mirrors[trial.number] = self._proposal(study, trial)
            # recorded on the trial (the rungs then judge it on the metric alone, tune.early_stop); a sampler
            # holds a frozen trial here, so through the storage, as Optuna's own samplers record theirs
            study._storage.set_trial_user_attr(trial._trial_id, attrs.PROPOSED_FOR.key, "metric")
        self.sampler.before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self._mirrors.pop(trial.number, None)
        self.sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.sampler.reseed_rng()


def _suggest(trial, name: str, dist) -> Any:
    """``dist``'s value for ``name`` from ``trial`` (Optuna's public suggest API, so the trial's sampler draws it)."""
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return trial.suggest_categorical(name, list(dist.choices))
    if isinstance(dist, optuna.distributions.IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
