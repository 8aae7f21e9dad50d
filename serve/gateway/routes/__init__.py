"""FastAPI routers, one per resource: KServe v2 metadata, task endpoints, operations."""
