"""``python -m deploy`` / ``autoglm deploy [render]``: render a run's deployment (Kubernetes, compose)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from autoglm.cli import Flag, build_parser, run_main, run_stage
from autoglm.errors import ConfigError

FLAGS = {
    "--env": Flag("deploy.env", "cpu or gpu"),
    "--registry": Flag("deploy.registry", "where the gateway, model and tune images live"),
    "--triton-image": Flag("deploy.triton_image", "the Triton server image, with its tag (default: per --env)"),
    "--namespace": Flag("deploy.namespace", "Kubernetes namespace of the stack"),
    "--monitoring-namespace": Flag("deploy.monitoring_namespace", "namespace of Prometheus and prometheus-adapter "
                                   "(NetworkPolicy, adapter rules)"),
    "--tune-workers": Flag("deploy.tune_workers", "also render k8s/tune, an Indexed Job of N tune workers on one "
                           "PostgreSQL study", type=int, metavar="N"),
    "--tune-trials": Flag("deploy.tune_trials", "trials in that study (default: tune.n_trials)", type=int,
                          metavar="N"),
    "--external-db": Flag("deploy.external_db", "tune workers use the database in Secret autoglm-tune-db; no "
                          "PostgreSQL StatefulSet", switch=True),
    "--api-keys-file": Flag("deploy.api_keys_file", "'name:sha256' lines for the gateway (default: the run's "
                            "earlier keys, else a new key printed once)"),
    "--no-kustomize": Flag("deploy.kustomize", "do not check the rendered trees with kubectl kustomize",
                           switch=False),
    "--autoscaler": Flag("deploy.autoscaler", "what scales Triton: hpa or keda (a ScaledObject on the same rules)",
                         choices=("hpa", "keda")),
    "--ingress-host": Flag("deploy.ingress.host", "render an Ingress (or with deploy.ingress.api='gateway-api' a "
                           "Gateway and HTTPRoute) for this host, TLS from Secret deploy.ingress.tls_secret"),
    "--use-capacity-anyway": Flag("deploy.allow_capacity_mismatch", "take loadtest's capacity even when it was "
                                  "measured on another flavour or device kind than the overlay serves", switch=True),
    "--autoscale-set": Flag("deploy.autoscale", "an autoscaling rule for the cluster, over serve.autoscale_rules",
                            short="-a", pairs=True),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser("autoglm deploy", __doc__, FLAGS)
    parser.add_argument("command", nargs="?", default="render", help="render (the default and only command)")
    args = parser.parse_args(argv)
    if args.command != "render":
        raise ConfigError(f"unknown deploy command '{args.command}': use `autoglm deploy render` (or just "
                          "`autoglm deploy`)")
    return run_stage(args, "deploy.render:render_run", FLAGS)


if __name__ == "__main__":
    sys.exit(run_main(main))
