"""``python -m deploy`` / ``autoglm deploy [render]``: render a run's deployment (Kubernetes, compose)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from autoglm.cli import add_common_args, print_config, run_main, settings_from_args


def _parser() -> argparse.ArgumentParser:
    parser = add_common_args(argparse.ArgumentParser(prog="autoglm deploy", description=__doc__.splitlines()[0]))
    parser.add_argument("command", nargs="?", default="render", help="render (the default and only command)")
    parser.add_argument("--env", help="deploy.env: cpu or gpu")
    parser.add_argument("--registry", help="deploy.registry: where the gateway, model and tune images live")
    parser.add_argument("--namespace", help="deploy.namespace: Kubernetes namespace of the stack")
    parser.add_argument("--monitoring-namespace", help="deploy.monitoring_namespace: namespace of Prometheus and "
                        "prometheus-adapter (NetworkPolicy, adapter rules)")
    parser.add_argument("--tune-workers", type=int, metavar="N", help="deploy.tune_workers: also render k8s/tune, "
                        "an Indexed Job of N tune workers on one PostgreSQL study")
    parser.add_argument("--tune-trials", type=int, metavar="N", help="deploy.tune_trials: trials in that study "
                        "(default: tune.n_trials)")
    parser.add_argument("--external-db", action="store_true", help="deploy.external_db: tune workers use the "
                        "database in Secret autoglm-tune-db; no PostgreSQL StatefulSet")
    parser.add_argument("--api-keys-file", help="deploy.api_keys_file: 'name:sha256' lines for the gateway "
                        "(default: the run's earlier keys, else a new key printed once)")
    parser.add_argument("-a", "--autoscale-set", action="append", default=[], metavar="KEY=VALUE",
                        help="deploy.autoscale.KEY: an autoscaling rule for the cluster, over serve.autoscale_rules")
    parser.add_argument("--no-kustomize", action="store_true", help="deploy.kustomize = false")
    return parser


def _deploy_overrides(args) -> list[str]:
    """The flags as ``--set deploy.*`` overrides: the resolved config then holds them."""
    values = {"env": args.env, "registry": args.registry, "namespace": args.namespace,
              "monitoring_namespace": args.monitoring_namespace, "tune_workers": args.tune_workers,
              "tune_trials": args.tune_trials, "external_db": args.external_db or None,
              "api_keys_file": args.api_keys_file, "kustomize": False if args.no_kustomize else None}
    flags = [f"deploy.{key}={json.dumps(value)}" for key, value in values.items() if value is not None]
    return flags + [f"deploy.autoscale.{pair}" for pair in args.autoscale_set]


def main(argv: Sequence[str] | None = None) -> int:
    from autoglm.errors import ConfigError

    args = _parser().parse_args(argv)
    if args.command != "render":
        raise ConfigError(f"unknown deploy command '{args.command}': use `autoglm deploy render` (or just "
                          "`autoglm deploy`)")
    args.overrides = [*args.overrides, *_deploy_overrides(args)]
    settings = settings_from_args(args)
    if args.dry_run:
        print_config(settings)
        return 0
    from deploy.render import render_run

    render_run(settings, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
