"""``python -m serve`` / ``autoglm serve --run R``: serve a run's model repository until signalled.

Verifies the repository against its manifest, starts Triton (bundled, on 127.0.0.1; or uses
``serve.triton_url``), loads the models, starts the gateway, prints the URLs, and on SIGINT/SIGTERM
stops everything (gateway first, then Triton), leaving no process or shared memory behind.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Sequence

from autoglm.cli import Flag, build_parser, print_config, run_main, run_stage
from autoglm.config import Settings
from autoglm.errors import ConfigError, validation_problems

FLAGS = {  # in this order: --workers and --api-keys-file beat the same key given by -g
    "--gateway": Flag("serve.gateway", "a gateway setting, e.g. -g max_in_flight=64", short="-g", pairs=True),
    "--models": Flag("serve.models", "variants or model names to serve (default: all)", many=True),
    "--flavour": Flag("serve.flavour", "python for the bundled Triton, native for the NGC container",
                      choices=["python", "native"]),
    "--autoscale": Flag("serve.autoscale", "run the local autoscaler", switch=True),
    "--autoscale-set": Flag("serve.autoscale_rules", "an autoscaling rule, e.g. -a max_instances=3 (implies "
                            "--autoscale)", short="-a", pairs=True, implies=["serve.autoscale=true"]),
    "--control-port": Flag("serve.control_port", "supervisor/autoscaler metrics port (0: off)", type=int),
    "--workers": Flag("serve.gateway.workers", "gateway worker processes (default 1)", type=int),
    "--api-keys-file": Flag("serve.gateway.api_keys_file", "'name:sha256' lines; required beyond loopback"),
    "--tracing": Flag("serve.gateway.tracing", "OpenTelemetry traces of the gateway and Triton to "
                      "$OTEL_EXPORTER_OTLP_ENDPOINT (needs the otel extra)", switch=True),
    "--access-log": Flag("serve.gateway.access_log", "uvicorn's access log, a line per request", switch=True),
    "--canary": Flag("serve.canary.version", "serve this repository version beside the stable one for --weight "
                     "percent of requests (`autoglm release` promotes, rolls back or watches it)", type=int,
                     metavar="VERSION"),
    "--weight": Flag("serve.canary.weight", "percent of requests for the --canary version", type=float),
}


def gateway_settings(settings: Settings):
    """The gateway's settings from the resolved config; a ConfigError naming each bad one."""
    from pydantic import ValidationError

    from serve.settings import GatewaySettings

    try:
        return GatewaySettings.from_settings(settings)
    except ValidationError as exc:
        raise ConfigError(f"invalid gateway settings: {validation_problems(exc)}") from None


def check(settings: Settings) -> None:
    """Refuse bad autoscaling rules and gateway settings before anything starts."""
    from autoglm.autoscaling import rules_from

    rules_from(settings.serve.autoscale_rules)
    gateway_settings(settings)


def show(settings: Settings) -> None:
    """--dry-run: the resolved config, then the gateway's settings (API keys left out)."""
    print_config(settings)
    print(gateway_settings(settings).model_dump_json(indent=2, exclude={"api_keys"}))


def serve(settings: Settings, force: bool = False) -> int:
    """Serve until SIGINT, SIGTERM or SIGHUP, then stop the gateway and Triton."""
    from serve.runner import start_serving

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a closed terminal must not orphan Triton
        signal.signal(sig, lambda *_: stop.set())
    serving = start_serving(settings, gateway_settings(settings))
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser("autoglm serve", __doc__, FLAGS)
    parser.add_argument("--new-api-key", metavar="NAME", help="print a fresh API key and its key-file line, exit")
    args = parser.parse_args(argv)
    if args.new_api_key:
        from autoglm.gateway_spec import hash_api_key, new_api_key

        key = new_api_key()
        print(f"API key for {args.new_api_key} (shown once; give it to the client):\n  {key}\n"
              f"line for --api-keys-file:\n  {args.new_api_key}:{hash_api_key(key)}")
        return 0
    return run_stage(args, serve, FLAGS, check, show)


if __name__ == "__main__":
    sys.exit(run_main(main))
