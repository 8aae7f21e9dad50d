"""Transferable priors: a small portfolio of configurations a new study tries first, expressed relative to the task.

A warm start names absolute values (2 layers at lr 4e-3) that mean something only on the task they were found
on. A portfolio entry says instead "twice the configured learning rate, half the schedule, half the width": it
applies to any task, a user's own included, through the task's configured run (``task.model``, ``train``) and
the roles its knobs declare (``Knob.role``: ``"width"`` or ``"depth"``). A new study queues the first
``tune.portfolio_size`` entries after ``tune.warm_start`` (if any); each is an ordinary trial, judged by the
rungs like the others, so a poor prior costs one rung, not a whole schedule (auto-sklearn 2.0's portfolio
successive halving). The entries are learned from development studies (:func:`from_params` turns their best
trials into entries) and shipped as ``tune/portfolio.json`` with a provenance naming the tasks and the command.

Scaling rules (:func:`to_params`), each applied only where the task's search space has the knob:

- ``width_mult`` multiplies every ``role="width"`` model knob, ``depth_mult`` every ``role="depth"`` one;
- ``lr_mult`` multiplies ``train.lr``, then divided by the realized width ratio (lr ∝ 1/width, the rule muP gives
  Adam's hidden layers): halving the width doubles the learning rate, so ``lr_mult`` says how far an entry
  departs from that rule, not from the task's raw value;
- ``steps_frac`` multiplies ``train.max_steps``, ``batch_mult`` ``train.batch_size`` (nearest choice);
- ``warmup_frac``, ``weight_decay`` and ``knobs`` (dotted name -> value: ``quantize.mode``, ``train.optimizer``)
  are taken as they are.

Every value is then clipped into the searched range (:func:`tune.space.warm_start_params`), so an entry is a
point the sampler could have drawn.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from autoglm.artifacts import write_atomic
from autoglm.errors import ConfigError
from autoglm.tasks import Knob, Task

BUILTIN = Path(__file__).with_name("portfolio.json")
OFF = ("off", "none", "")
WIDTH_LR_EXPONENT = 1.0  # lr ∝ width^-1
_RELATIVE = ("lr_mult", "steps_frac", "width_mult", "depth_mult", "batch_mult")  # > 0, multiplies a configured value
_ABSOLUTE = ("warmup_frac", "weight_decay")  # TrainSettings fields with no scale: taken as they are
# train knobs the relative fields own: from_params never copies them into ``knobs``
_OWNED = {"train.lr", "train.max_steps", "train.batch_size", "train.warmup_frac", "train.weight_decay"}


@dataclass(frozen=True)
class PortfolioEntry:
    """One configuration relative to a task; a field left None keeps the task's configured value."""

    lr_mult: float | None = None
    steps_frac: float | None = None
    width_mult: float | None = None
    depth_mult: float | None = None
    batch_mult: float | None = None
    warmup_frac: float | None = None
    weight_decay: float | None = None
    knobs: dict[str, Any] = field(default_factory=dict)  # dotted knob name -> value, taken where the space has it
    source: str = ""  # where it comes from: a development study's trial, or the rule that set it

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "portfolio entry") -> PortfolioEntry:
        """An entry from its JSON form, every field checked (the error names the field and the fix)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where} must be an object such as {{\"lr_mult\": 2.0}}, not {data!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {unknown}; known are {sorted(known)}")
        for name in (*_RELATIVE, *_ABSOLUTE):
            value = data.get(name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ConfigError(f"{where}: {name}={value!r} must be a finite number")
            if name in _RELATIVE and value <= 0:
                raise ConfigError(f"{where}: {name}={value!r} multiplies a configured value: use a number > 0")
            if name in _ABSOLUTE and value < 0:
                raise ConfigError(f"{where}: {name}={value!r} must be >= 0")
        knobs = data.get("knobs", {})
        if not isinstance(knobs, Mapping) or not all(isinstance(k, str) and "." in k for k in knobs):
            raise ConfigError(f"{where}: knobs must map dotted knob names to values, e.g. "
                              "{\"quantize.mode\": \"static\"}")
        source = data.get("source", "")
        if not isinstance(source, str):
            raise ConfigError(f"{where}: source must be text")
        return cls(**{n: data.get(n) for n in (*_RELATIVE, *_ABSOLUTE)}, knobs=dict(knobs), source=source)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: fields left None and an empty ``knobs``/``source`` are omitted."""
        return {k: v for k, v in asdict(self).items() if v not in (None, {}, "")}


@dataclass(frozen=True)
class Portfolio:
    """Ordered entries (the best first) and where they come from: ``provenance`` holds ``learned_from`` (task
    ids), ``method`` (how they were chosen) and ``command`` (what reproduces them)."""

    entries: tuple[PortfolioEntry, ...]
    provenance: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"provenance": self.provenance, "entries": [e.to_dict() for e in self.entries]}


def load_portfolio(path: str | Path | None = None) -> Portfolio:
    """The portfolio in ``path`` (None or ``"builtin"``: the shipped ``tune/portfolio.json``)."""
    path = BUILTIN if path is None or str(path) == "builtin" else Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"tune.portfolio={str(path)!r} does not exist: give 'builtin', 'off' or the path of a "
                          "portfolio JSON file (tune.portfolio.save_portfolio writes one)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"tune.portfolio={str(path)!r} is not valid JSON ({exc}): write "
                          '{"provenance": {...}, "entries": [{"lr_mult": 2.0}, ...]}') from None
    if not isinstance(data, Mapping) or not isinstance(data.get("entries"), list):
        raise ConfigError(f"tune.portfolio={str(path)!r} needs an \"entries\" list")
    provenance = data.get("provenance")
    if not isinstance(provenance, Mapping) or not {"learned_from", "method"} <= set(provenance) \
            or not isinstance(provenance["learned_from"], list):
        raise ConfigError(f"tune.portfolio={str(path)!r} needs a \"provenance\" with \"learned_from\" (the task ids, "
                          "a list, empty for hand-set rules) and \"method\"")
    entries = tuple(PortfolioEntry.from_dict(e, f"{path.name} entry {i}") for i, e in enumerate(data["entries"]))
    return Portfolio(entries, dict(provenance))


def configured_portfolio(tune) -> Portfolio | None:
    """The portfolio ``tune.portfolio`` names (TuneSettings), None when it is off."""
    if tune.portfolio is None or tune.portfolio.strip().lower() in OFF or not tune.portfolio_size:
        return None
    return load_portfolio(tune.portfolio)


def save_portfolio(portfolio: Portfolio, path: str | Path) -> Path:
    """Write ``portfolio`` as JSON (atomically: a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(portfolio.to_dict(), indent=2) + "\n").encode())
    return path


def roles(task: Task | type[Task], space: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Dotted model knob -> its role (``"width"``/``"depth"``), from ``space``'s knobs, else the task's."""
    knobs = {name: k for name, k in (space or {}).items() if isinstance(k, Knob)}
    knobs = {f"model.{k}": v for k, v in task.model_space.items()} | knobs
    return {name: k.role for name, k in knobs.items() if name.startswith("model.") and k.role}


def _configured(task: Task | type[Task], settings) -> dict[str, Any]:
    """The task's configured run as dotted knob values: ``task.model`` (defaults filled in) and ``train``."""
    model = {f"model.{k}": v for k, v in task.check_model_args(settings.task.model).items()}
    return model | {f"train.{k}": v for k, v in settings.train.model_dump().items()}


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def _ratio(params: Mapping[str, Any], configured: Mapping[str, Any], names) -> float | None:
    """Geometric mean of params/configured over ``names`` (None when no such knob is in ``params``)."""
    logs = [math.log(params[n] / configured[n]) for n in names
            if n in params and _positive(params[n]) and _positive(configured.get(n))]
    return math.exp(sum(logs) / len(logs)) if logs else None


def to_params(entry: PortfolioEntry, task: Task, settings, space: Mapping[str, Any]) -> dict[str, Any]:
    """The concrete knob values ``entry`` means for this task: a point of ``space`` (searched knobs only, each
    clipped into its range), ready for ``study.enqueue_trial``."""
    from tune.space import warm_start_params

    configured = _configured(task, settings)
    searched = {n for n, k in space.items() if isinstance(k, Knob)}
    by_role = roles(task, space)
    extra: dict[str, Any] = {}
    for name, value in entry.knobs.items():
        knob = space.get(name)
        # a knob this task lacks, or a choice its space does not search: the configured value stays
        if name in searched and (knob.kind != "categorical" or value in knob.choices
                                 or all(_positive(c) for c in knob.choices) and _positive(value)):
            extra[name] = value
    for name, role in by_role.items():
        mult = entry.width_mult if role == "width" else entry.depth_mult
        if mult is not None and name in searched and _positive(configured.get(name)):
            scaled = configured[name] * mult
            extra[name] = scaled if space[name].kind == "float" else max(1, round(scaled))
    scalars = {"train.max_steps": entry.steps_frac, "train.batch_size": entry.batch_mult}
    for name, mult in scalars.items():
        if mult is not None and name in searched and _positive(configured.get(name)):
            extra[name] = max(1, round(configured[name] * mult))
    for name in _ABSOLUTE:
        if getattr(entry, name) is not None and f"train.{name}" in searched:
            extra[f"train.{name}"] = getattr(entry, name)
    params = warm_start_params(task, settings, space, extra)
    if "train.lr" in params:
        width = _ratio(params, configured, [n for n, r in by_role.items() if r == "width"]) or 1.0
        lr = configured["train.lr"] * (entry.lr_mult or 1.0) / width ** WIDTH_LR_EXPONENT
        params = warm_start_params(task, settings, space, extra | {"train.lr": lr})
    return params


def from_params(params: Mapping[str, Any], task: Task | type[Task], settings) -> PortfolioEntry:
    """The entry that :func:`to_params` turns back into ``params`` on this task (the inverse, up to the clipping):
    how a development study's good trial is expressed for tasks it was not found on. Model knobs without a role
    are specific to the task and are left out; other knobs go to ``knobs`` by name."""
    from tune.space import compression_params

    configured = _configured(task, settings)
    by_role = roles(task)
    width = _ratio(params, configured, [n for n, r in by_role.items() if r == "width"])
    depth = _ratio(params, configured, [n for n, r in by_role.items() if r == "depth"])

    def relative(name: str) -> float | None:
        return _ratio(params, configured, [name])

    lr = relative("train.lr")
    knobs = compression_params(params) | {n: v for n, v in params.items()
                                          if n.startswith("train.") and n not in _OWNED}
    return PortfolioEntry(
        lr_mult=None if lr is None else lr * (width or 1.0) ** WIDTH_LR_EXPONENT,
        steps_frac=relative("train.max_steps"), width_mult=width, depth_mult=depth,
        batch_mult=relative("train.batch_size"), warmup_frac=params.get("train.warmup_frac"),
        weight_decay=params.get("train.weight_decay"), knobs=knobs)


def portfolio_params(portfolio: Portfolio, task: Task, settings, space: Mapping[str, Any],
                     size: int) -> list[tuple[int, dict[str, Any]]]:
    """(entry index, params) for the first ``size`` entries, each distinct point once: on a task where an entry's
    changes do not apply (a fixed width, a knob it lacks) two entries can mean the same trial. None where the
    space searches nothing: there is no point to place."""
    out: list[tuple[int, dict[str, Any]]] = []
    for index, entry in enumerate(portfolio.entries[:size]):
        params = to_params(entry, task, settings, space)
        if params and all(params != p for _, p in out):
            out.append((index, params))
    return out
