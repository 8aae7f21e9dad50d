"""The gateway's way in from outside: an Ingress, or a Gateway API Gateway and HTTPRoute, TLS from a Secret.

Rendered only when ``deploy.ingress.host`` is set. Both terminate TLS with the certificate of the
``kubernetes.io/tls`` Secret ``deploy.ingress.tls_secret`` (cert-manager's, or one made by hand) and
send HTTP to the gateway Service's ``http`` port; gRPC stays in-cluster (its routing is controller-
specific: a GRPCRoute or an annotation).
"""

from __future__ import annotations

from typing import Any

from deploy.k8s.serving import GATEWAY_PORT, meta

GATEWAY_API = "gateway.networking.k8s.io/v1"
NAME = "autoglm-gateway"


def ingress(host: str, tls_secret: str, class_name: str | None) -> list[dict[str, Any]]:
    """A networking.k8s.io/v1 Ingress for ``host`` (the cluster's default IngressClass when ``class_name`` is None)."""
    backend = {"service": {"name": NAME, "port": {"name": "http"}}}
    spec: dict[str, Any] = {"ingressClassName": class_name} if class_name else {}
    spec |= {"tls": [{"hosts": [host], "secretName": tls_secret}],
             "rules": [{"host": host, "http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": backend}]}}]}
    return [{"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": meta(NAME, "gateway"), "spec": spec}]


def gateway_api(host: str, tls_secret: str, class_name: str) -> list[dict[str, Any]]:
    """A Gateway with one HTTPS listener for ``host`` (TLS terminated there) and the HTTPRoute attached to it."""
    listener = {"name": "https", "hostname": host, "port": 443, "protocol": "HTTPS",
                "tls": {"mode": "Terminate", "certificateRefs": [{"kind": "Secret", "name": tls_secret}]},
                "allowedRoutes": {"namespaces": {"from": "Same"}}}
    gateway = {"apiVersion": GATEWAY_API, "kind": "Gateway", "metadata": meta(NAME, "gateway"),
               "spec": {"gatewayClassName": class_name, "listeners": [listener]}}
    route = {"apiVersion": GATEWAY_API, "kind": "HTTPRoute", "metadata": meta(NAME, "gateway"),
             "spec": {"parentRefs": [{"name": NAME, "sectionName": "https"}], "hostnames": [host],
                      "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                                 "backendRefs": [{"name": NAME, "port": GATEWAY_PORT}]}]}}
    return [gateway, route]


def entry(settings) -> list[dict[str, Any]]:
    """What ``deploy.ingress`` (:class:`autoglm.config.IngressSettings`) asks for: nothing without a host."""
    if not settings.host:
        return []
    if settings.api == "gateway-api":
        return gateway_api(settings.host, settings.tls_secret, settings.class_name)
    return ingress(settings.host, settings.tls_secret, settings.class_name)
