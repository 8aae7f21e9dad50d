"""AutoGLM's shared core: config, run artifacts, tasks, measurement and the umbrella CLI.

Stages (``tune``, ``compress``, ``serve``, ``loadtest``, ``deploy``) build on this package; it never
imports them.
"""

__version__ = "0.1.0"
