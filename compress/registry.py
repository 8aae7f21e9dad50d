"""The compression passes and the variants they make, each registered once by its module in ``compress/passes``.

A :class:`Pass` declares its searchable knobs, their defaults read from its section of compress's config (so a
number lives in the config model alone), and where it can run; a :class:`VariantSpec` names the passes a variant
applies, the trial knobs that select it, whether it needs calibration data, and how it builds. Config checks
(:func:`check_settings`), tune's search space (:func:`knobs`) and a trial's variant (:func:`variant_for`) all
ask this registry, so a new variant is one new module under ``compress/passes`` (Olive registers its passes the
same way: each declares its config and search defaults, and the engine gathers them).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin

from pydantic import BaseModel, ValidationError

from autoglm.config import CompressSettings, Settings
from autoglm.errors import ConfigError
from autoglm.tasks.base import Knob, Task

if TYPE_CHECKING:
    from compress.variants import Variant, VariantBuilder

Build = Callable[["VariantBuilder", str], "Variant"]


def _everywhere() -> tuple[bool, str]:
    return True, ""


def _any_model(task: Task, model: Any) -> tuple[bool, str]:
    return True, ""


@dataclass(frozen=True)
class Pass:
    """One compression pass that variants apply, and its knobs (tune searches them as ``<name>.<knob>``).

    ``searched``: the knobs in tune's presets; the others join a space that compresses when ``tune.space`` names
    them. ``opt_in``: choices of a searched knob that the presets leave out (``tune.space`` brings them in).
    ``switch``: the knob whose default turns the pass off in a trial. ``selects``: switch values that only select
    variants, naming no value of the pass's config section (quantize.mode 'qat': the qat variants read
    compress.qat). ``untrained``: config values that build the pass's graph without its training (a trial's probe
    times the graph, not its weights); a pass with them fine-tunes. ``available()``: whether it can run on this
    host, and why not (a variant applying it is then skipped with that reason, never faked). ``applies(task, model)``:
    whether it can transform this task's model, and why not (GPT-2's Conv1D MLP cannot be pruned): its variants are
    then skipped with that reason, and tune fixes its switch off."""

    name: str
    knobs: Mapping[str, Knob] = field(default_factory=dict)
    searched: tuple[str, ...] = ()
    opt_in: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    switch: str | None = None
    selects: tuple[Any, ...] = ()
    untrained: Mapping[str, Any] = field(default_factory=dict)
    available: Callable[[], tuple[bool, str]] = _everywhere
    applies: Callable[[Task, Any], tuple[bool, str]] = _any_model

    def __post_init__(self) -> None:
        unknown = {*self.searched, *self.opt_in, *([self.switch] if self.switch else [])} - set(self.knobs)
        if unknown:
            raise ValueError(f"pass {self.name!r}: {sorted(unknown)} are not among its knobs {sorted(self.knobs)}")
        strays = {v for key, values in self.opt_in.items() for v in values if v not in self.knobs[key].choices} | {
            v for v in self.selects if not self.switch or v not in self.knobs[self.switch].choices}
        if strays:
            raise ValueError(f"pass {self.name!r}: {sorted(map(str, strays))} are not among its knobs' choices")

    @property
    def section(self) -> type[BaseModel] | None:
        """Its section of compress's config (``compress.<name>``), which a trial's knob values go into; None for a
        pass without one (its switch then only selects its variants)."""
        info = CompressSettings.model_fields.get(self.name)
        kind = info.annotation if info else None
        return kind if isinstance(kind, type) and issubclass(kind, BaseModel) else None

    def on(self, values: Mapping[str, Any]) -> bool:
        """Whether a trial's ``values`` of this pass's knobs switch it on (a pass without a switch never is)."""
        if self.switch is None:
            return False
        off = self.knobs[self.switch].default
        return values.get(self.switch, off) != off

    def configures(self, key: str, value: Any) -> bool:
        """Whether a trial's ``value`` of knob ``key`` goes into the pass's config section: not a switch that is
        off or only selects variants (the config keeps its own value, which none of the trial's passes reads)."""
        return key != self.switch or (self.on({key: value}) and value not in self.selects)

    def searched_knob(self, key: str) -> Knob:
        """Knob ``key`` as tune's presets search it: without its opt-in choices."""
        knob, held = self.knobs[key], self.opt_in.get(key, ())
        return replace(knob, choices=tuple(c for c in knob.choices if c not in held)) if held else knob


@dataclass(frozen=True)
class VariantSpec:
    """One name ``compress.variants`` may list: the passes it applies, in order, and how it builds.

    ``tuned``: a trial's knobs may select it, namely when the passes they switch on are exactly its passes that have
    a switch, at one of ``modes``' values where it names some (int8-static: quantize.mode 'static'). ``calibrates``:
    whether building it under a config needs calibration batches."""

    name: str
    build: Build
    passes: tuple[str, ...]
    modes: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    tuned: bool = False
    calibrates: bool | Callable[[CompressSettings], bool] = False

    @property
    def fine_tunes(self) -> bool:
        """Whether building it trains the model further (a pass it applies has training to skip)."""
        return any(passes()[p].untrained for p in self.passes)

    def needs_calibration(self, cfg: CompressSettings) -> bool:
        return self.calibrates(cfg) if callable(self.calibrates) else self.calibrates


_PASSES: dict[str, Pass] = {}
_VARIANTS: dict[str, VariantSpec] = {}
_loaded = False


def register(item: Pass | VariantSpec) -> Pass | VariantSpec:
    """Add a pass, or a variant of registered passes; a name is registered once."""
    table = _PASSES if isinstance(item, Pass) else _VARIANTS
    if item.name in table:
        raise ValueError(f"{type(item).__name__} {item.name!r} is registered twice")
    if isinstance(item, VariantSpec):
        missing = [p for p in (*item.passes, *item.modes) if p not in _PASSES]
        if missing:
            raise ValueError(f"variant {item.name!r} applies passes {missing} that are not registered")
    table[item.name] = item
    return item


def variant(name: str, *, passes: tuple[str, ...], modes: Mapping[str, tuple[Any, ...]] | None = None,
            tuned: bool = False,
            calibrates: bool | Callable[[CompressSettings], bool] = False) -> Callable[[Build], Build]:
    """Decorator: register ``build(builder, name) -> Variant`` as variant ``name`` (see :class:`VariantSpec`)."""

    def decorate(build: Build) -> Build:
        register(VariantSpec(name, build, tuple(passes), dict(modes or {}), tuned, calibrates))
        return build

    return decorate


def setting(section: type[BaseModel], name: str, **search: Any) -> Knob:
    """A knob over setting ``name`` of a config section, its default the config's; a Literal or bool setting is
    searched over its values, a number over ``search``'s range (low, high, log, step)."""
    info = section.model_fields[name]
    kind = info.annotation
    if get_origin(kind) is Literal:
        return Knob("categorical", info.default, choices=get_args(kind), **search)
    if kind is bool:
        return Knob("categorical", info.default, choices=(True, False), **search)
    return Knob("int" if kind is int else "float", info.default, **search)


def _load() -> None:
    """Import the modules of ``compress.passes`` once, in name order: the order of :func:`variant_names` and of
    the knobs tune samples."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import compress.passes as package

    for name in sorted(m.name for m in pkgutil.iter_modules(package.__path__)):
        importlib.import_module(f"{package.__name__}.{name}")


def passes() -> dict[str, Pass]:
    """Every registered pass, by name."""
    _load()
    return dict(_PASSES)


def variants() -> dict[str, VariantSpec]:
    """Every registered variant, by name."""
    _load()
    return dict(_VARIANTS)


def variant_names() -> list[str]:
    """The names ``compress.variants`` may list."""
    return list(variants())


def variant_spec(name: str) -> VariantSpec:
    """The registered variant ``name``; ConfigError listing the known ones otherwise."""
    known = variants()
    if name not in known:
        raise ConfigError(_unknown([name]))
    return known[name]


def _unknown(names: list[str]) -> str:
    return f"unknown variant(s) {names}: choose from {variant_names()}"


def check_settings(settings: Settings) -> None:
    """Refuse ``compress.variants`` that names no registered variant, or needs calibration data the config does
    not give; ConfigError naming the fix. Called where compress and tune resolve their settings."""
    cfg, known = settings.compress, variants()
    unknown = [v for v in cfg.variants if v not in known]
    if unknown:
        raise ConfigError(_unknown(unknown))
    if cfg.quantize.calibration_batches == 0 and any(known[v].needs_calibration(cfg) for v in cfg.variants):
        raise ConfigError("static INT8 needs calibration data: set compress.quantize.calibration_batches > 0, "
                          "or compress.quantize.mode = 'dynamic' for int8 and pruned-int8")


def knobs(searched_only: bool = False) -> dict[str, Knob]:
    """Every pass's knobs as ``<pass>.<knob>`` (``searched_only``: those in tune's presets, as they search them),
    for tune's space."""
    return {f"{p.name}.{key}": p.searched_knob(key) if searched_only else knob for p in passes().values()
            for key, knob in p.knobs.items() if not searched_only or key in p.searched}


def check_knob(name: str, value: Any, where: str) -> None:
    """Refuse a value of knob ``name`` (``prune.ratio``) that its pass's config section refuses, a switch's off
    value aside; ``where`` names the setting in the message."""
    group, _, key = name.partition(".")
    found = passes()[group]
    if found.section is None or not found.configures(key, value):
        return
    try:
        found.section.model_validate({key: value})
    except ValidationError as exc:
        raise ConfigError(f"{where}={value!r} is invalid: {exc.errors()[0]['msg'].lower()} (as compress.{name})") \
            from None


def variant_for(params: Mapping[str, Mapping[str, Any]]) -> str:
    """The variant a trial's knobs describe, e.g. ``{"quantize": {"mode": "static"}, "prune": {"ratio": 0.0}}`` ->
    ``int8-static``: the tuned variant whose switched passes are those the knobs switch on."""
    table = passes()
    on = {name for name, p in table.items() if p.on(params.get(name, {}))}
    found = [spec.name for spec in variants().values()
             if spec.tuned and {p for p in spec.passes if table[p].switch} == on
             and all(params.get(p, {}).get(table[p].switch) in values for p, values in spec.modes.items())]
    if len(found) > 1:
        raise ConfigError(f"variants {found} both match the knobs {dict(params)}: give them distinct modes")
    if found:
        return found[0]
    offs = ", ".join(f'"{n}.{table[n].switch}" = {table[n].knobs[table[n].switch].default!r}' for n in sorted(on))
    raise ConfigError(f"no compress variant applies the passes {sorted(on)} together: switch one off in "
                      f"tune.space ({offs})")


def apply_knobs(cfg: CompressSettings, params: Mapping[str, Mapping[str, Any]]) -> CompressSettings:
    """``cfg`` with a trial's knob values in their passes' sections. A switch left off keeps the config's value:
    none of the trial's passes reads it."""
    update = {}
    for p in passes().values():
        values = {k: v for k, v in params.get(p.name, {}).items() if p.configures(k, v)}
        if values and p.section is not None:
            update[p.name] = getattr(cfg, p.name).model_copy(update=values)
    return cfg.model_copy(update=update)


def variant_settings(name: str, cfg: CompressSettings) -> dict[str, Any]:
    """What compress needs to rebuild variant ``name`` over a run's config: its name and the config sections of
    the passes it applies."""
    spec = variant_spec(name)
    return {"variants": [name], **{p.name: getattr(cfg, p.name).model_dump(mode="json") for p in passes().values()
                                   if p.name in spec.passes and p.section is not None}}


def fine_tunes(params: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether the variant a trial's knobs describe trains the model further (pruning, QAT)."""
    return variant_spec(variant_for(params)).fine_tunes


def untrained_settings(cfg: CompressSettings) -> CompressSettings:
    """``cfg`` with every pass's training skipped: the same graphs, not their trained weights (a trial's probe)."""
    return cfg.model_copy(update={p.name: getattr(cfg, p.name).model_copy(update=p.untrained)
                                  for p in passes().values() if p.untrained and p.section is not None})


def inapplicable(task: Task, model: Any) -> dict[str, str]:
    """The passes that cannot transform ``task``'s ``model`` (see :attr:`Pass.applies`), each with the reason."""
    found = {name: p.applies(task, model) for name, p in passes().items()}
    return {name: reason for name, (ok, reason) in found.items() if not ok}
