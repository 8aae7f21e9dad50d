"""``python -m serve`` / ``autoglm serve --run R``: serve a run's model repository until signalled.

Verifies the repository against its manifest, starts Triton (bundled, on 127.0.0.1; or uses
``serve.triton_url``), loads the models, starts the gateway, prints the URLs, and on SIGINT/SIGTERM
stops everything (gateway first, then Triton), leaving no process or shared memory behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence

from pydantic import ValidationError

from autoglm.cli import add_common_args, print_config, run_main, settings_from_args
from autoglm.errors import ConfigError, validation_problems

BUILT = True


def _parser() -> argparse.ArgumentParser:
    parser = add_common_args(argparse.ArgumentParser(prog="autoglm serve", description=__doc__.splitlines()[0]))
    parser.add_argument("-g", "--gateway", action="append", default=[], metavar="KEY=VALUE",
                        help="shorthand for --set serve.gateway.KEY=VALUE, e.g. -g max_in_flight=64")
    parser.add_argument("--api-keys-file", help="serve.gateway.api_keys_file: 'name:sha256' lines; required "
                        "beyond loopback")
    parser.add_argument("--new-api-key", metavar="NAME", help="print a fresh API key and its key-file line, exit")
    parser.add_argument("--workers", type=int, help="serve.gateway.workers: gateway worker processes (default 1)")
    parser.add_argument("--models", help="serve.models: comma-separated variants or model names (default: all)")
    parser.add_argument("--flavour", choices=["python", "native"],
                        help="serve.flavour: python for the bundled Triton, native for the NGC container")
    parser.add_argument("--autoscale", action="store_true", help="serve.autoscale: run the local autoscaler")
    parser.add_argument("-a", "--autoscale-set", action="append", default=[], metavar="KEY=VALUE",
                        help="shorthand for --set serve.autoscale_rules.KEY=VALUE, e.g. -a max_instances=3 "
                        "(implies --autoscale)")
    parser.add_argument("--control-port", type=int, help="serve.control_port: supervisor/autoscaler metrics "
                        "(0: off)")
    return parser


def _serve_overrides(args) -> list[str]:
    """The serving flags as ``--set`` overrides of ``serve``: the resolved config then holds them."""
    flags = [f"serve.gateway.{pair}" for pair in args.gateway]
    if args.models:
        flags.append(f"serve.models={json.dumps([m for m in args.models.split(',') if m])}")
    if args.flavour:
        flags.append(f"serve.flavour={json.dumps(args.flavour)}")
    if args.autoscale or args.autoscale_set:
        flags.append("serve.autoscale=true")
    flags += [f"serve.autoscale_rules.{pair}" for pair in args.autoscale_set]
    if args.control_port is not None:
        flags.append(f"serve.control_port={args.control_port}")
    if args.workers is not None:  # 0 must reach the settings' check, not fall back to the config's
        flags.append(f"serve.gateway.workers={args.workers}")
    if args.api_keys_file:
        flags.append(f"serve.gateway.api_keys_file={json.dumps(args.api_keys_file)}")
    return flags


def resolve(args: argparse.Namespace):
    """(settings, gateway settings) from the parsed flags; the serving flags become ``serve`` overrides."""
    from autoglm.autoscaling import rules_from
    from serve.settings import GatewaySettings

    args.overrides = [*args.overrides, *_serve_overrides(args)]
    settings = settings_from_args(args)
    rules_from(settings.serve.autoscale_rules)  # refused here, before anything starts
    try:
        return settings, GatewaySettings.from_settings(settings)
    except ValidationError as exc:
        raise ConfigError(f"invalid gateway settings: {validation_problems(exc)}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.new_api_key:
        from autoglm.gateway_spec import hash_api_key, new_api_key

        key = new_api_key()
        print(f"API key for {args.new_api_key} (shown once; give it to the client):\n  {key}\n"
              f"line for --api-keys-file:\n  {args.new_api_key}:{hash_api_key(key)}")
        return 0
    settings, gateway = resolve(args)
    if args.dry_run:
        print_config(settings)
        print(gateway.model_dump_json(indent=2, exclude={"api_keys"}))
        return 0

    from serve.runner import start_serving

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a closed terminal must not orphan Triton
        signal.signal(sig, lambda *_: stop.set())
    serving = start_serving(settings, gateway)
    try:
        width = max(map(len, serving.urls()))
        lines = [f"  {name:<{width}}  {url}" for name, url in serving.urls().items()]
        print(f"serving {', '.join(serving.models)} from {serving.run.path}\n" + "\n".join(lines) +
              "\nCtrl-C or SIGTERM stops.", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        print("stopping: gateway, then Triton", flush=True)
        serving.stop()
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
