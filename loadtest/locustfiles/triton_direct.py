"""Scenario ``triton``: the v2 scenario's requests sent straight to Triton (``--host`` is Triton's HTTP URL).

The same bodies as ``v2_infer.py``, so the difference between the two is the gateway's overhead.
"""

from loadtest.locustfiles.common import PayloadUser


class TritonDirectUser(PayloadUser):
    scenario = "v2"  # the same request list; only the host differs
