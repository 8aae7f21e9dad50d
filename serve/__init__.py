"""The serve stage: a supervised Triton behind an async gateway, with autoscaling rules.

    from serve import start_serving
    with start_serving(settings) as serving:   # verified repository -> Triton -> gateway
        print(serving.urls())

``create_app(GatewaySettings(...))`` builds one gateway worker's ASGI app on its own.
"""

from serve.autoscale import Autoscaler, RulesEngine, TritonActuator
from serve.gateway import create_app
from serve.runner import Serving, on_free_ports, start_serving
from serve.settings import GatewaySettings
from serve.supervisor import GatewayProcess, Supervisor
from serve.triton import TritonServer, free_port, free_ports

__all__ = ["Autoscaler", "GatewayProcess", "GatewaySettings", "RulesEngine", "Serving", "Supervisor",
           "TritonActuator", "TritonServer", "create_app", "free_port", "free_ports", "on_free_ports", "start_serving"]
