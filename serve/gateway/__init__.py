"""The async gateway in front of Triton: ``create_app(settings)`` builds one worker's ASGI app."""

from serve.gateway.app import create_app
from serve.gateway.core import Gateway, TaskCatalog
from serve.gateway.deps import get_gateway

__all__ = ["Gateway", "TaskCatalog", "create_app", "get_gateway"]
