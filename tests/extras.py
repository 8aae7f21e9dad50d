"""pyproject.toml's extras, and every distribution installing them brings in (read from installed metadata)."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"


def norm(name: str) -> str:
    """A distribution name as PyPI compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(*extras: str) -> list[str]:
    """The core's dependencies and those of ``extras``; the project's own extras they name are expanded here,
    from pyproject.toml (the installed autoglm metadata may be older)."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    found, todo, seen = list(project["dependencies"]), list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for spec in project["optional-dependencies"][extra]:
            requirement = Requirement(spec)
            if norm(requirement.name) == norm(project["name"]):
                todo += requirement.extras
            else:
                found.append(spec)
    return found


def closure(specs: list[str]) -> set[str]:
    """Every distribution (normalized name) that installing ``specs`` brings in."""
    seen: set[str] = set()
    todo = [(Requirement(r).name, frozenset(Requirement(r).extras)) for r in specs]
    while todo:
        name, extras = todo.pop()
        key = norm(name)
        if key in seen and not extras:
            continue
        seen.add(key)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue  # an optional dependency not installed here
        for spec in requires:
            req = Requirement(spec)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
                todo.append((req.name, frozenset(req.extras)))
    return seen
