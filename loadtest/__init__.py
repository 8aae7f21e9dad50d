"""loadtest: locust load tests of the served models, the serving-config sweep and the release report.

    from loadtest import loadtest_run
    manifest, exit_code = loadtest_run(settings)   # settings.loadtest says what to run; 0: the SLO gate passed

or ``autoglm loadtest --run R [--sweep | --tune]`` against the stack ``autoglm serve --run R`` started
(``--rollback`` undoes the config ``--tune`` wrote into the repository).

The package stays light to import (names resolve on first use): the locust process imports
``loadtest.locustfiles`` and ``loadtest.latency`` and must not pull in the pipeline.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LoadSpec": "loadtest.runner", "run_window": "loadtest.runner",
    "ServingConfig": "loadtest.control", "ModelControl": "loadtest.control",
    "pareto_front": "loadtest.front", "recommend": "loadtest.front",
    "Slo": "loadtest.latency", "loadtest_run": "loadtest.stage", "write_release_page": "loadtest.release",
    "capacity_record": "loadtest.writeback", "write_back": "loadtest.writeback", "rollback": "loadtest.writeback",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'loadtest' has no attribute {name!r}")
