"""Errors every stage raises for bad input. Each message names the fix; the CLI prints it without a traceback."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class AutoGLMError(Exception):
    """Base class: a problem the user can fix, reported as one clear message."""


class ConfigError(AutoGLMError, ValueError):
    """A config file, variable or flag is unknown, malformed or impossible."""


class DataError(AutoGLMError):
    """Task data is missing or malformed."""


class IntegrityError(AutoGLMError):
    """An artifact no longer matches the sha256 its manifest recorded."""


class MissingExtraError(AutoGLMError, ImportError):
    """An optional heavy library is not installed."""


def validation_problems(exc: ValidationError, whole: str = "") -> str:
    """pydantic's errors as ``key: message``, joined by "; " (the messages name the fix); ``whole`` labels the
    errors about the model as a whole (no key)."""
    parts = []
    for e in exc.errors():
        key = ".".join(map(str, e["loc"])) or whole
        parts.append(f"{key + ': ' if key else ''}{e['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)
