"""Locustfiles, one User per scenario, and load shapes; run by :mod:`loadtest.runner` in its own process.

Scenarios: ``task_endpoint.py`` (the gateway's task endpoints), ``v2_infer.py`` (KServe v2 infer
through the gateway), ``triton_direct.py`` (the same v2 requests straight to Triton, to measure the
gateway's overhead), ``generate_stream.py`` (streaming generation: time to first token, inter-token).
Shapes: steady (no shape file: ``--users`` from the start), ``shape_step.py``, ``shape_spike.py``.
Nothing here is imported by the pipeline.
"""

from pathlib import Path

DIRECTORY = Path(__file__).parent
SCENARIOS = {"task": "task_endpoint.py", "v2": "v2_infer.py", "triton": "triton_direct.py",
             "generate": "generate_stream.py"}
SHAPES = {"steady": None, "step": "shape_step.py", "spike": "shape_spike.py"}
BEARER_ENV = "AUTOGLM_LOADTEST_BEARER"  # loadtest.api_key, handed to the locust process in its environment
