"""The async gateway in front of Triton: ``create_app(settings)`` builds one worker's ASGI app."""

from serve.gateway.app import create_app
from serve.gateway.catalog import TaskCatalog
from serve.gateway.deps import get_gateway
from serve.gateway.worker import Gateway

__all__ = ["Gateway", "TaskCatalog", "create_app", "get_gateway"]
