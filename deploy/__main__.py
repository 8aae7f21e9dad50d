"""``python -m deploy`` / ``autoglm deploy [render]``: render a run's deployment (Kubernetes, compose)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from autoglm.cli import add_common_args, print_config, run_main, settings_from_args

BUILT = True


def _parser() -> argparse.ArgumentParser:
    parser = add_common_args(argparse.ArgumentParser(prog="autoglm deploy", description=__doc__.splitlines()[0]))
    parser.add_argument("command", nargs="?", default="render", help="render (the default and only command)")
    parser.add_argument("--env", help="cpu or gpu (default: deploy.env from the config)")
    parser.add_argument("--registry", default="localhost:5000", help="where the gateway, model and tune images live")
    parser.add_argument("--namespace", default="autoglm", help="Kubernetes namespace of the stack")
    parser.add_argument("--monitoring-namespace", default="monitoring",
                        help="namespace of Prometheus and prometheus-adapter (NetworkPolicy, adapter rules)")
    parser.add_argument("--tune-workers", type=int, default=0, metavar="N",
                        help="also render k8s/tune: an Indexed Job of N tune workers on one PostgreSQL study")
    parser.add_argument("--tune-trials", type=int, metavar="N", help="trials in that study (default: tune.n_trials)")
    parser.add_argument("--external-db", action="store_true",
                        help="tune workers use the database in Secret autoglm-tune-db; no PostgreSQL StatefulSet")
    parser.add_argument("--api-keys-file", type=Path, help="'name:sha256' lines for the gateway (default: the "
                        "run's earlier keys, else a new key printed once)")
    parser.add_argument("-a", "--autoscale-set", action="append", default=[], metavar="KEY=VALUE",
                        help="autoscaling rule, as for `autoglm serve -a`, e.g. -a max_instances=8")
    parser.add_argument("--no-kustomize", action="store_true", help="do not run `kubectl kustomize`")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from autoglm.errors import ConfigError

    args = _parser().parse_args(argv)
    if args.command != "render":
        raise ConfigError(f"unknown deploy command '{args.command}': use `autoglm deploy render` (or just "
                          "`autoglm deploy`)")
    settings = settings_from_args(args)
    if args.dry_run:
        print_config(settings)
        return 0
    from deploy.render import DeployOptions, render_run

    options = DeployOptions(env=args.env or settings.deploy.env, registry=args.registry, namespace=args.namespace,
                            monitoring_namespace=args.monitoring_namespace, tune_workers=args.tune_workers,
                            tune_trials=args.tune_trials, external_db=args.external_db,
                            api_keys_file=args.api_keys_file, autoscale=tuple(args.autoscale_set),
                            kustomize=not args.no_kustomize)
    render_run(settings, options, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
