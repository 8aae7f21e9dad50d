"""Import heavy libraries on first use, with an error that names what to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from autoglm.errors import MissingExtraError


def require(module: str, extra: str | None = None, purpose: str = "") -> ModuleType:
    """Import ``module`` or raise MissingExtraError telling how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        hint = f"pip install 'autoglm[{extra}]'" if extra else f"pip install {module.split('.')[0]}"
        why = f" (needed for {purpose})" if purpose else ""
        raise MissingExtraError(f"{module} is not importable{why}: {exc}. Install it with: {hint}") from exc
