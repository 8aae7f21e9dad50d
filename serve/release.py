"""Canary, promote and roll back model versions of a run's Triton repository, on disk and in a running serve.

The repository's ``config.pbtxt`` serves the stable version (:mod:`autoglm.versions`). ``autoglm serve --canary V``
loads V beside it through Triton's model control (a load with a config override whose ``version_policy`` names
both) and writes the gateway's routing file (:mod:`serve.gateway.canary`). Switching a version never drops a
request: the new version is loaded first, the routing file moves traffic (every worker sees it within
:data:`~serve.gateway.canary.POLL_S`), and only after :data:`SWITCH_WAIT_S` is the old version unloaded (Triton
finishes what it is running). A version whose files do not match the hashes its lineage recorded is refused.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoglm.artifacts import RunDir
from autoglm.config import Settings
from autoglm.errors import AutoGLMError, ConfigError
from autoglm.local_http import DIRECT, answers_ok
from autoglm.releases import checked, commit, render_configs
from autoglm.versions import check_version, version_dirs
from serve.gateway.canary import POLL_S, Routing, Split, read_routing, splits, write_routing

log = logging.getLogger("serve.release")
SWITCH_WAIT_S = 4 * POLL_S + 0.2  # routing written -> every worker routes by it -> the old version may go
PROMOTE, ROLLBACK = "release promote", "release rollback"


class TritonControl:
    """The model control API of a Triton started with ``--model-control-mode=explicit``."""

    def __init__(self, url: str, timeout_s: float = 120.0):
        self.url, self.timeout_s = url.rstrip("/"), timeout_s

    def config(self, model: str) -> dict[str, Any]:
        with DIRECT.open(f"{self.url}/v2/models/{model}/config", timeout=10) as resp:
            return json.loads(resp.read())

    def serve_versions(self, model: str, versions: list[int], knobs: dict[str, Any] | None = None) -> None:
        """Load ``model`` serving exactly ``versions`` (and ``knobs``, the serving settings of a release): the
        running config with its version policy (and knobs) replaced, applied in place; versions left out unload
        once their requests are done."""
        config = self.config(model)
        config["version_policy"] = {"specific": {"versions": sorted(set(versions))}}
        if knobs and "dynamic_batching" in config:
            config["max_batch_size"] = knobs["max_batch_size"]
            batching = config["dynamic_batching"]
            batching["max_queue_delay_microseconds"] = knobs["max_queue_delay_us"]
            batching["preferred_batch_size"] = list(knobs["preferred_batch_sizes"]) or [knobs["max_batch_size"]]
            for group in config.get("instance_group", []):
                group["count"] = knobs["instances"]
        body = json.dumps({"parameters": {"config": json.dumps(config)}}).encode()
        request = urllib.request.Request(f"{self.url}/v2/repository/models/{model}/load", data=body, method="POST")
        try:
            DIRECT.open(request, timeout=self.timeout_s).close()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:300]
            raise AutoGLMError(f"Triton could not load {model} versions {versions}: {detail}") from None

    def ready(self, model: str, version: int) -> bool:
        return answers_ok(f"{self.url}/v2/models/{model}/versions/{version}/ready")


@dataclass
class Stack:
    """A running ``autoglm serve`` of the run, as its ``serve/serving.json`` describes it."""

    triton: TritonControl
    routing: Path
    models: list[str]
    gateway_metrics: str

    @classmethod
    def find(cls, run: RunDir) -> Stack | None:
        """The run's serving stack if its Triton answers; None when nothing serves the run."""
        path = run.stage_dir("serve") / "serving.json"
        if not path.is_file():
            return None
        info = json.loads(path.read_text())
        if "routing" not in info or not answers_ok(f"{info['urls']['triton']}/v2/health/live"):
            return None
        return cls(TritonControl(info["urls"]["triton"]), Path(info["routing"]), info["models"],
                   info["urls"]["metrics"])

    def switch(self, new: dict[str, Split], weight: float, knobs: dict[str, Any] | None = None, **extra) -> None:
        """Move the models to ``new`` (stable and canary versions) without dropping a request: load what is new
        beside what serves, route by the new split, wait for every worker to follow, then unload the rest.
        From before the load until after the unload the routing says ``settling``: every request names its
        version meanwhile (gRPC messages too, see :mod:`serve.gateway.canary`)."""
        state = read_routing(self.routing)
        old = splits(state)
        if not Routing.moving_in(state):  # the workers start naming versions before a second one loads
            write_routing(self.routing, old, float(state.get("weight", 0.0)), settling=True)
            time.sleep(SWITCH_WAIT_S)
        for model, split in new.items():
            before = old.get(model)
            serving = {before.stable, before.canary} - {None} if before else set()
            wanted = {split.stable, split.canary} - {None}
            if wanted - serving:
                self.triton.serve_versions(model, sorted(serving | wanted))
        write_routing(self.routing, {**old, **new}, weight, settling=True, **extra)
        time.sleep(SWITCH_WAIT_S)
        for model, split in new.items():
            self.triton.serve_versions(model, sorted({split.stable, split.canary} - {None}), knobs)
        write_routing(self.routing, {**old, **new}, weight, settling=False)  # one version per model again


def routing_models(repo: Path, served: list[str], version: int) -> list[str]:
    """The served models that have ``version``: the generation model too (``:generate``, ``:score`` and the
    OpenAI routes follow the same split as inference)."""
    have = {d.parent.name for d in version_dirs(repo, version, served)}
    return sorted(m for m in served if m in have)


def start_canary(run: RunDir, stack: Stack, version: int, weight: float) -> dict[str, Split]:
    """Serve ``version`` beside the stable one for ``weight`` percent of requests (after checking its files)."""
    _, repo, _, lineage = checked(run)
    check_version(repo, lineage, version)
    stable = lineage["stable"]
    if version == stable:
        raise ConfigError(f"version {version} is the stable version already: canary another one (versions: "
                          f"{', '.join(sorted(lineage['versions'], key=int))})")
    models = routing_models(repo, stack.models, version)
    if not models:
        raise ConfigError(f"no served model has version {version}: canary a version compress or a write-back made")
    new = {m: Split(stable, version) for m in models}
    stack.switch(new, weight, canary_started=time.time())
    log.warning("canary: version %d takes %g%% of %s (stable %d)", version, weight, ", ".join(models), stable)
    return new


def restore_canary(triton: TritonControl, routing: Path) -> None:
    """Load the routing file's canaries again (after a Triton restart, which loads the stable versions from disk);
    a failure is logged: the stable versions serve meanwhile, and the canary's requests fail until it is withdrawn."""
    for model, split in splits(read_routing(routing)).items():
        if split.canary is not None:
            try:
                triton.serve_versions(model, [split.stable, split.canary])
            except (AutoGLMError, OSError) as exc:
                log.error("canary: version %d of %s not restored after Triton's restart (%s): withdraw it with "
                          "`autoglm release rollback`", split.canary, model, exc)


def promote(run: RunDir, version: int, stack: Stack | None = None, by: str = PROMOTE, **why: Any) -> dict[str, Any]:
    """Make ``version`` the stable one: in the running stack first (when there is one), then on disk."""
    manifest, repo, task_info, lineage = checked(run)
    record = check_version(repo, lineage, version)
    triton = {**manifest.config["triton"], **record["triton"]}
    render_configs(repo, task_info, triton, version)  # an impossible config is refused before anything moves
    previous = lineage["stable"]
    if stack is not None:
        models = routing_models(repo, stack.models, version)
        missing = sorted(set(stack.models) - set(models))
        if missing:
            raise ConfigError(f"version {version} has no {', '.join(missing)}: serve only the models it has "
                              f"(--models) or promote a version that has them")
        stack.switch({m: Split(version) for m in models}, 0.0, triton)
    changed = commit(run, manifest, repo, task_info, lineage, triton, record["recommended"], version, by,
                     previous=previous, **why)
    return {"stable": version, "previous": previous, "changed": changed, "live": stack is not None}


def rollback(run: RunDir, stack: Stack | None = None, to: int | None = None, **why: Any) -> dict[str, Any]:
    """Undo the last release step: a running canary is withdrawn; else the stable version goes back to the one
    before it (or to ``to``)."""
    state = read_routing(stack.routing) if stack else {}
    canaries = {m: s for m, s in splits(state).items() if s.canary is not None}
    if canaries and to is None:
        stack.switch({m: Split(s.stable) for m, s in canaries.items()}, 0.0, **why)
        withdrawn = sorted({s.canary for s in canaries.values()})
        log.warning("canary: version %s withdrawn from %s", withdrawn, ", ".join(canaries))
        return {"withdrawn": withdrawn, "stable": sorted({s.stable for s in canaries.values()}), "live": True}
    lineage = checked(run)[3]
    if to is None:
        earlier = [h["version"] for h in lineage["history"] if h["version"] != lineage["stable"]
                   and str(h["version"]) in lineage["versions"]]
        if not earlier:
            raise AutoGLMError(f"nothing to roll back to: version {lineage['stable']} is the only version served so "
                               "far; publish another with `autoglm compress --force`")
        to = earlier[-1]
    return promote(run, to, stack, by=ROLLBACK, **why)


def release_run(settings: Settings, action: str, version: int | None = None) -> dict[str, Any]:
    """``autoglm release promote|rollback``: the run's running stack (if any) and its repository."""
    run = RunDir(settings.run.root, settings.run.name)
    stack = Stack.find(run)
    if action == "promote":
        return promote(run, version, stack)
    return rollback(run, stack, version)


def status(run: RunDir) -> dict[str, Any]:
    """The stable version, every version's lineage in short, and the running stack's split."""
    from autoglm.versions import load_lineage

    run.manifest("repository")  # a run compress has not completed: the error names `autoglm compress`
    lineage = load_lineage(run.stage_dir("repository"))
    stack = Stack.find(run)
    state = read_routing(stack.routing) if stack else {}
    return {"stable": lineage["stable"], "serving": state.get("models") if stack else None,
            "weight": state.get("weight"), "auto_rollbacks": state.get("auto_rollbacks", []),
            "versions": {v: {k: e.get(k) for k in ("source", "created", "parent", "trial", "recommended")}
                         for v, e in lineage["versions"].items()}}


def main(argv=None) -> int:
    """``autoglm release promote VERSION | rollback [--to VERSION] | watch [--for S] | status``."""
    from autoglm.cli import build_parser, settings_from_args

    parser = build_parser("autoglm release", __doc__, {})
    parser.add_argument("action", choices=["promote", "rollback", "watch", "status"],
                        help="promote VERSION to stable; roll back the canary (or the stable version); watch the "
                             "canary and roll it back automatically (exit 3); status")
    parser.add_argument("version", nargs="?", type=int, help="promote: the version to make stable")
    parser.add_argument("--to", type=int, help="rollback: the version to go back to (default: the one before)")
    parser.add_argument("--for", dest="duration", type=float, help="watch: stop after this many seconds, exit 0 if "
                        "the canary stayed healthy (default: until it is promoted, withdrawn or rolled back)")
    args = parser.parse_args(argv)
    settings = settings_from_args(args)
    if args.dry_run:
        from autoglm.cli import print_config

        print_config(settings)
        return 0
    run = RunDir(settings.run.root, settings.run.name)
    if args.action == "status":
        print(json.dumps(status(run), indent=2))
        return 0
    if args.action == "watch":
        from serve.canary_watch import watch

        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
        stack = Stack.find(run)
        if stack is None:
            raise AutoGLMError(f"nothing serves run {run.name}: start `autoglm serve --run {run.name} --canary N` "
                               "first")
        return watch(run, stack, settings.serve.canary, args.duration)
    if args.action == "promote" and args.version is None:
        raise ConfigError("promote needs the version: `autoglm release promote VERSION` (see `autoglm release "
                          "status`)")
    result = release_run(settings, args.action, args.version if args.action == "promote" else args.to)
    where = "the running stack and the repository" if result.get("live") else "the repository (nothing serves it)"
    if "withdrawn" in result:
        print(f"release: canary {result['withdrawn']} withdrawn; stable {result['stable']} takes all requests")
    else:
        print(f"release: version {result['stable']} is stable in {where} (was {result['previous']})")
    return 0


if __name__ == "__main__":
    import sys

    from autoglm.cli import run_main

    sys.exit(run_main(main))
