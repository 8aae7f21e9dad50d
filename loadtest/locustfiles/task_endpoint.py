"""Scenario ``task``: the gateway's task endpoints with validation-set requests.

digits: ``POST /v1/models/<model>:predict`` with raw 8x8 images; charlm: ``:generate`` and ``:score``
with validation text. The mix is whatever the payload file holds (the runner draws it).
"""

from loadtest.locustfiles.common import PayloadUser


class TaskEndpointUser(PayloadUser):
    scenario = "task"
