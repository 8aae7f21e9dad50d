"""Errors every stage raises for bad input. Each message names the fix; the CLI prints it without a traceback."""


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
