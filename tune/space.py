"""The joint search space: the task's architecture and training knobs plus compress's pass knobs.

Knobs are declared next to what they tune (``Task.model_space``/``train_space``, each compress pass's
registered knobs: :func:`compress.knobs`); this module only gathers them under dotted names (``model.n_layer``,
``train.lr``, ``quantize.mode``, ``prune.ratio``), applies a preset and the user's overrides, and samples them with
Optuna, define-by-run: a knob conditional on another (``Knob.when``: ``train.momentum`` on ``train.optimizer =
"sgd"``) is sampled only in the trials where it applies. Presets:

- ``default``: architecture + training + compression, the joint search AutoGLM is for;
- ``training``: architecture + training only (compression off), the classic hyperparameter search;
- ``compression``: compression settings for the task's default architecture and training;
- ``adaptive`` (alias ``adaptive-v2``, the article's name): the ``default`` knobs, whose numeric ranges narrow
  around the best completed trials once the sampler's start-up trials have finished (:class:`tune.sampler.Narrowing`).
"""

from __future__ import annotations

import logging
import math
import tomllib
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from autoglm.errors import ConfigError
from autoglm.tasks import Knob, Task

log = logging.getLogger(__name__)
PRESETS = ("default", "training", "compression", "adaptive")
ALIASES = {"adaptive-v2": "adaptive"}  # the AutoGLM article's name for the adaptive space


def is_adaptive(preset: Any) -> bool:
    """Whether ``preset`` (``tune.search_space``) narrows its ranges as the study learns."""
    return isinstance(preset, str) and ALIASES.get(preset, preset) == "adaptive"


def _compress_knobs(every: bool = False) -> dict[str, Knob]:
    """The compression knobs the passes search by default (INT8's mode, the pruning ratio), or ``every`` knob
    they declare: the others keep compress's config unless tune.space names them, which adds them to a preset
    that compresses."""
    from compress import knobs

    return knobs(searched_only=not every)


def _loop_knobs(task: Task) -> dict[str, Knob]:
    """The training loop's own knobs (optimizer, schedule, feedback) the task does not search itself: no preset
    searches them; tune.space naming one adds it to a preset that trains (its conditional knobs come along)."""
    from autoglm.tasks.training import LOOP_SPACE

    return {f"train.{k}": v for k, v in LOOP_SPACE.items() if k not in task.train_space}


def _parent(name: str, knob: Any) -> str | None:
    """The dotted name of the knob ``name`` is conditional on (same group), or None."""
    if not isinstance(knob, Knob) or knob.when is None:
        return None
    return f"{name.partition('.')[0]}.{knob.when[0]}"


def with_conditionals(space: Mapping[str, Any], addable: Mapping[str, Knob]) -> dict[str, Any]:
    """``space`` plus each knob of ``addable`` conditional on a knob in it (``Knob.when``), every knob after the
    one it depends on (``suggest`` samples in order): searching ``train.optimizer`` searches ``train.momentum``
    in the trials that draw ``sgd``."""
    included = dict(space)
    grown = True
    while grown:
        children = {k: v for k, v in addable.items() if k not in included and _parent(k, v) in included
                    # searched parent, or one fixed at a value the knob applies to
                    and (isinstance(included[_parent(k, v)], Knob) or v.active(included[_parent(k, v)]))}
        included.update(children)
        grown = bool(children)
    out: dict[str, Any] = {}

    def place(name: str) -> None:
        parent = _parent(name, included[name])
        if parent in included and parent not in out:
            place(parent)
        out[name] = included[name]

    for name in included:
        if name not in out:
            place(name)
    return out


def build_space(task: Task, preset: str | Mapping[str, Any] = "default",
                overrides: Mapping[str, Any] | None = None) -> dict[str, Knob | Any]:
    """Dotted name -> Knob (searched) or a plain value (fixed). ``preset`` may be a name, a TOML path or a dict."""
    arch = {f"model.{k}": v for k, v in task.model_space.items()}
    train = {f"train.{k}": v for k, v in task.train_space.items()}
    loop = _loop_knobs(task)
    if isinstance(preset, Mapping):
        space, extra = {**arch, **train, **_compress_knobs()}, dict(preset)
        space = {k: v for k, v in space.items() if k in extra} if extra.pop("only", False) else space
        overrides = {**extra, **(overrides or {})}
    elif isinstance(preset, str) and preset.endswith(".toml"):
        path = Path(preset)
        if not path.is_file():
            raise ConfigError(f"tune.search_space={preset} does not exist: give a preset {list(PRESETS)} or a file")
        try:
            table = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"tune.search_space={preset} is not valid TOML ({exc}): write one knob per line, "
                              'e.g. "train.lr" = {low = 1e-4, high = 1e-2, log = true}') from None
        return build_space(task, table, overrides)
    elif ALIASES.get(preset, preset) in ("default", "adaptive"):
        space = {**arch, **train, **_compress_knobs()}
    elif preset == "training":
        space = {**arch, **train}
    elif preset == "compression":
        space = _compress_knobs()
    else:
        raise ConfigError(f"unknown search space preset '{preset}': use one of {list(PRESETS)} or a .toml file")
    every = _compress_knobs(every=True)
    compresses = any(name in every for name in space)
    trains = any(name.startswith("train.") for name in space) or preset == "training"
    addable = {k: v for k, v in every.items() if k not in space} if compresses else {}
    addable |= {k: v for k, v in loop.items() if k not in space} if trains else {}
    out = apply_overrides(space, overrides or {}, addable, {**arch, **train, **loop, **every})
    return with_conditionals(out, addable)


def without_inapplicable(task: Task, space: Mapping[str, Any], model_args: Mapping[str, Any]) -> dict[str, Any]:
    """``space`` with the switch of each pass that cannot transform the task's model fixed off (GPT-2's Conv1D MLP
    and ``prune.ratio``), one warning line each: a trial switching it on would only build a skipped variant."""
    from compress.registry import inapplicable, passes

    switches = {f"{p.name}.{p.switch}": p for p in passes().values() if p.switch}
    searched = [name for name, knob in space.items() if name in switches and isinstance(knob, Knob)]
    if not searched:
        return dict(space)
    reasons = inapplicable(task, task.build_model(model_args))
    out = dict(space)
    for name in searched:
        found = switches[name]
        if found.name in reasons:
            out[name] = found.knobs[found.switch].default
            log.warning("tune: %s fixed at %r (not searched): %s", name, out[name], reasons[found.name])
    return out


def with_shared_schedule(space: Mapping[str, Any]) -> dict[str, Any]:
    """``space`` with a searched ``train.max_steps`` fixed at its range's longest (``tune.early_stop.shared_schedule``).

    The learning rate follows each trial's own ``max_steps``, so at one step a shorter schedule has decayed
    further and looks better without being the better configuration. With one schedule for all, the steps a
    trial trains are successive halving's resource: the rungs stop the poor trials early and compare like with
    like, as Hyperband and ASHA do.
    """
    out = dict(space)
    knob = out.get("train.max_steps")
    if isinstance(knob, Knob):
        out["train.max_steps"] = int(knob.high)
    return out


def apply_overrides(space: dict[str, Any], overrides: Mapping[str, Any], addable: Mapping[str, Knob] | None = None,
                    everything: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A dict override changes a knob's range; a plain value fixes the knob (it is then not searched).

    ``addable``: knobs outside ``space`` that an override may bring in (the compression passes' other knobs);
    ``everything``: every knob of the task and the passes, to tell a misplaced knob from a misspelt one."""
    out, space = dict(space), {**space, **(addable or {})}
    for name, value in overrides.items():
        if name not in space:
            raise ConfigError(_unknown(name, value, space, everything or space))
        if name not in out:
            out[name] = space[name]
        if isinstance(value, Mapping):
            unknown = set(value) - {"low", "high", "log", "step", "choices"}
            if unknown:
                raise ConfigError(f"tune.space.{name}: unknown field(s) {sorted(unknown)}; use low, high, log, "
                                  "step or choices")
            knob = out[name] if isinstance(out[name], Knob) else Knob("float", out[name])
            changes = dict(value)
            ranged = sorted(set(changes) & {"low", "high", "log", "step"})
            if knob.kind == "categorical" and ranged and "choices" not in changes:
                raise ConfigError(f"tune.space.{name} takes choices, not {ranged}: e.g. {{choices = "
                                  f"{_toml_list(knob.choices)}}}")
            if "choices" in changes and not isinstance(changes["choices"], list | tuple):
                raise ConfigError(f"tune.space.{name}.choices must be a list, e.g. [64, 128] (got "
                                  f"{changes['choices']!r})")
            if "choices" in changes:
                changes = {"choices": tuple(changes["choices"]), "kind": "categorical"}
            out[name] = _checked(name, replace(knob, **changes))
            ends = out[name].choices if out[name].kind == "categorical" else (out[name].low, out[name].high)
        else:
            out[name], ends = value, (value,)
        if isinstance(space[name], Knob):
            # valid where the knob can take it, not only what a preset searches (opt-in: quantize.mode 'qat')
            knob = (everything or space).get(name, space[name])
            for end in ends:
                _check_value(name, knob if isinstance(knob, Knob) else space[name], end)
    return out


def _unknown(name: str, value: Any, space: Mapping[str, Any], everything: Mapping[str, Any]) -> str:
    """Why ``name`` is not a knob here, and the fix."""
    if isinstance(value, Mapping) and any(f"{name}.{key}" in everything for key in value):
        key = next(k for k in value if f"{name}.{k}" in everything)
        return (f"tune.space: '{name}' is not a knob, but '{name}.{key}' is: TOML reads an unquoted dotted key as "
                f'a table, so quote the knob\'s name, e.g. "{name}.{key}" = ...')
    if name in everything:
        return (f"tune.space: knob '{name}' is not in this search space (tune.search_space): the 'training' preset "
                "searches no compression and 'compression' no architecture or training; use 'default' for both")
    return f"tune.space: unknown knob '{name}'; known knobs are {sorted(space)}"


def _toml_list(values) -> str:
    return "[" + ", ".join(str(v).lower() if isinstance(v, bool) else repr(v).replace("'", '"') for v in values) + "]"


def _check_value(name: str, knob: Knob, value: Any) -> None:
    """A fixed value or a range end must be valid where it goes (a trial would otherwise run with it:
    a batch size of 0 trains on empty batches)."""
    knob.check(f"tune.space.{name}", value)
    group, _, key = name.partition(".")
    if name in _compress_knobs(every=True):
        from compress import check_knob

        check_knob(name, value, f"tune.space.{name}")
    if group == "train":
        from pydantic import ValidationError

        from autoglm.config import TrainSettings

        try:
            TrainSettings.model_validate({key: value})
        except ValidationError as exc:
            # the field's own errors: a rule across fields (adaptive_batch needs feedback_every) is the trial's
            errors = [e for e in exc.errors() if e["loc"][:1] == (key,)]
            if errors:
                raise ConfigError(f"tune.space.{name}={value!r} is invalid: {errors[0]['msg'].lower()} "
                                  f"(as train.{key})") from None


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _checked(name: str, knob: Knob) -> Knob:
    """A range Optuna can sample: numbers where numbers go, low <= high, a positive step, a boolean log."""
    where = f"tune.space.{name}"
    if not isinstance(knob.log, bool):
        raise ConfigError(f"{where}: log must be true or false (got {knob.log!r})")
    if knob.kind == "categorical":
        if not knob.choices:
            raise ConfigError(f"{where}: choices must not be empty")
        return knob
    for field in ("low", "high"):
        value = getattr(knob, field)
        if value is not None and not _number(value):
            raise ConfigError(f"{where}: {field} must be a number, not {value!r} (write 1e-4, not \"1e-4\")")
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"{where}: {field} must be finite (got {value}): a range needs two ends")
    if knob.step is not None and (not _number(knob.step) or knob.step <= 0):
        raise ConfigError(f"{where}: step must be a positive number (got {knob.step!r})")
    if knob.kind == "int" and knob.log and knob.step not in (None, 1):
        raise ConfigError(f"{where}: a log range of integers takes no step (got step={knob.step})")
    if knob.low is None or knob.high is None or knob.low > knob.high:
        raise ConfigError(f"{where}: need low <= high (got low={knob.low}, high={knob.high})")
    if knob.log and knob.low <= 0:
        raise ConfigError(f"{where}: a log range needs low > 0 (got {knob.low})")
    return knob


def _active(name: str, knob: Knob, params: Mapping[str, Any], space: Mapping[str, Any]) -> bool:
    """Whether a knob is sampled, given ``params`` drawn or fixed so far: yes when it is unconditional or its parent
    is outside ``space`` (the configured value applies), else when the parent's value is one it applies to (a
    parent itself not drawn: no)."""
    parent = _parent(name, knob)
    if parent is None or parent not in space:
        return True
    return parent in params and knob.active(params[parent])


def suggest(trial, space: Mapping[str, Any]) -> dict[str, Any]:
    """Sample every searched knob with Optuna's define-by-run API; fixed values pass through. A conditional knob
    (``Knob.when``) is sampled only when its parent, sampled before it, took a value it applies to."""
    params = {}
    for name, knob in space.items():
        if not isinstance(knob, Knob):
            params[name] = knob
        elif not _active(name, knob, params, space):
            continue
        elif knob.kind == "categorical":
            params[name] = trial.suggest_categorical(name, list(knob.choices))
        elif knob.kind == "int":
            params[name] = trial.suggest_int(name, int(knob.low), int(knob.high), log=knob.log,
                                             step=int(knob.step or 1))
        else:
            params[name] = trial.suggest_float(name, knob.low, knob.high, log=knob.log,
                                               step=None if knob.log else knob.step)
    return params


def warm_start_params(task: Task, settings, space: Mapping[str, Any],
                      extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The run's own configuration as a point of ``space``: the first trial a warm-started study runs.

    Searched ``model.*``/``train.*`` knobs take the configured values (``task.model``, ``train``), the
    compression knobs their defaults (off), ``extra`` overrides either (e.g. ``{"quantize.mode": "static"}``:
    start from the compression a release would use); knobs this space does not search are skipped. Values
    outside a searched range are clipped into it (a shipped 600-step schedule becomes the range's longest),
    so the point is one the sampler could draw.
    """
    known = {**build_space(task, "default"), **space}
    unknown = sorted(set(extra or {}) - set(known))
    if unknown:
        raise ConfigError(f"tune.warm_start: unknown knob(s) {unknown}; known knobs are {sorted(known)}")
    model = task.check_model_args(settings.task.model)
    params: dict[str, Any] = {}
    fixed = {name: value for name, value in space.items() if not isinstance(value, Knob)}
    for name, knob in space.items():
        if not isinstance(knob, Knob) or not _active(name, knob, fixed | params, space):
            continue
        group, _, key = name.partition(".")
        if extra and name in extra:
            value = extra[name]
        elif group == "model":
            value = model.get(key, knob.default)
        elif group == "train":
            value = getattr(settings.train, key, knob.default)
        else:
            value = knob.default
        params[name] = _into(name, knob, value)
    return params


def _into(name: str, knob: Knob, value: Any) -> Any:
    """``value`` moved into ``knob``'s range: clipped, on its step; numeric choices take the nearest."""
    if knob.kind == "categorical":
        if value in knob.choices:
            return value
        if isinstance(value, int | float) and all(isinstance(c, int | float) for c in knob.choices):
            return min(knob.choices, key=lambda c: abs(c - value))
        raise ConfigError(f"tune.warm_start: {name}={value!r} is not among the searched {list(knob.choices)}")
    if not _number(value):
        raise ConfigError(f"tune.warm_start: {name}={value!r} must be a number within {knob.low}..{knob.high}")
    value = min(max(value, knob.low), knob.high)
    if knob.step and not knob.log:
        value = knob.low + round((value - knob.low) / knob.step) * knob.step
        value = min(value, knob.high)
    return int(round(value)) if knob.kind == "int" else float(value)


def compression_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The compression knobs among ``params`` (the others are the task's)."""
    every = _compress_knobs(every=True)
    return {name: value for name, value in params.items() if name in every}


def split_params(params: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"model.n_layer": 2, "train.lr": 1e-3}`` -> ``{"model": {"n_layer": 2}, "train": {"lr": 1e-3}}``."""
    groups: dict[str, dict[str, Any]] = {"model": {}, "train": {}}  # and one per compression pass searched
    for name, value in params.items():
        group, _, key = name.partition(".")
        groups.setdefault(group, {})[key] = value
    return groups
