"""A missing library is reported with the extra that installs it, and every extra named does install it."""

import ast
import functools
import sys
from importlib import metadata
from pathlib import Path

import pytest

from autoglm._lazy import EXTRAS, extra_for, require
from autoglm.errors import MissingExtraError
from tests.extras import closure, norm, requirements

ROOT = Path(__file__).parents[2]
PACKAGES = ("autoglm", "tune", "compress", "serve", "loadtest", "deploy", "bench")


@functools.cache
def _owners() -> dict[str, list[str]]:
    return metadata.packages_distributions()


@functools.cache
def _installed_by(extra: str) -> frozenset[str]:
    return frozenset(closure(requirements(extra)))


def _installs(extra: str, module: str) -> bool:
    owners = _owners().get(module.split(".")[0], [])
    assert owners, f"{module} is not installed here, so its extra cannot be checked"
    return any(norm(owner) in _installed_by(extra) for owner in owners)


@pytest.mark.parametrize("module", sorted(EXTRAS))
def test_the_extra_named_for_each_module_installs_it(module):
    assert _installs(EXTRAS[module], module), f"pyproject.toml's [{EXTRAS[module]}] does not bring {module}"


def _require_calls():
    """(file, module, extra) of every ``require("module", ...)`` with a literal module name in the code."""
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "require" and node.args \
                        and isinstance(node.args[0], ast.Constant):
                    given = node.args[1] if len(node.args) > 1 else next(
                        (k.value for k in node.keywords if k.arg == "extra"), None)
                    extra = given.value if isinstance(given, ast.Constant) else None
                    yield str(path.relative_to(ROOT)), node.args[0].value, extra


def test_every_call_site_names_an_extra_that_installs_its_module():
    calls = list(_require_calls())
    assert len(calls) > 10  # the scan finds the call sites
    wrong = [(path, module, extra or extra_for(module)) for path, module, extra in calls
             if not (extra or extra_for(module)) or not _installs(extra or extra_for(module), module)]
    assert wrong == []


def test_a_missing_module_names_its_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # makes `import optuna` raise ImportError

    with pytest.raises(MissingExtraError, match=r"optuna is not importable \(needed for tuning\).*"
                                                r"pip install 'autoglm\[tune\]'"):
        require("optuna", purpose="tuning")
    assert extra_for("google.protobuf.text_format") == "compress" and extra_for("google.auth") is None
    with pytest.raises(MissingExtraError, match=r"Install it with: pip install no_such_module_here$"):
        require("no_such_module_here.sub")
