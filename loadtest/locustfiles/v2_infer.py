"""Scenario ``v2``: KServe v2 ``POST /v2/models/<model>/infer`` (JSON tensors) through the gateway."""

from loadtest.locustfiles.common import PayloadUser


class V2InferUser(PayloadUser):
    scenario = "v2"
