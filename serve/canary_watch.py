"""Automatic rollback: ``autoglm release watch`` compares a running canary with the stable version and withdraws a
canary that does worse.

Every ``serve.canary.check_every_s`` it scrapes the gateway's ``/metrics`` (the whole gateway's, however many
workers) for the per-version counters (:mod:`serve.gateway.metrics`) and compares the last ``window_s``: once
each side has ``min_requests``, a canary whose 5xx fraction exceeds the stable's by more than ``error_margin``, or
whose p95 exceeds the stable's by more than ``p95_margin`` of it and ``p95_slack_ms``, is rolled back
(:func:`serve.release.rollback`): logged, counted in ``autoglm_release_auto_rollbacks_total`` on the gateway's
``/metrics`` and recorded in the routing file, and the command exits :data:`ROLLED_BACK` — a CI job running
``autoglm release watch --for 600`` fails on a bad canary. It exits 0 when the canary is promoted or withdrawn
by hand, or was healthy for the whole ``--for``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from autoglm.config import CanarySettings
from autoglm.local_http import DIRECT
from serve.gateway.canary import CANARY, STABLE, read_routing, splits
from serve.signals import bucket_quantile

log = logging.getLogger("serve.release")
ROLLED_BACK = 3  # the exit code of a watch that rolled its canary back


@dataclass(frozen=True)
class Totals:
    """One role's cumulative figures in a scrape: requests, 5xx answers, latency buckets (seconds -> count)."""

    requests: float = 0.0
    errors: float = 0.0
    buckets: tuple[tuple[float, float], ...] = ()

    def since(self, earlier: Totals) -> Window:
        before = dict(earlier.buckets)
        p95 = bucket_quantile({b: n - before.get(b, 0.0) for b, n in self.buckets}, 0.95)
        return Window(self.requests - earlier.requests, self.errors - earlier.errors,
                      None if p95 is None else p95 * 1000)


@dataclass(frozen=True)
class Window:
    """One role's figures over the window."""

    requests: float
    errors: float
    p95_ms: float | None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


def verdict(stable: Window, canary: Window, rules: CanarySettings) -> str | None:
    """Why the canary must be rolled back, or None (healthy, or too few requests yet to judge)."""
    if stable.requests < rules.min_requests or canary.requests < rules.min_requests:
        return None
    if canary.error_rate - stable.error_rate > rules.error_margin:
        return (f"canary 5xx {canary.error_rate:.1%} of {canary.requests:.0f} requests vs stable "
                f"{stable.error_rate:.1%} (margin {rules.error_margin:.1%})")
    if canary.p95_ms is not None and stable.p95_ms is not None:
        excess = canary.p95_ms - stable.p95_ms
        if excess > stable.p95_ms * rules.p95_margin and excess > rules.p95_slack_ms:
            return (f"canary p95 {canary.p95_ms:.1f} ms vs stable {stable.p95_ms:.1f} ms (margin "
                    f"{rules.p95_margin:.0%} and {rules.p95_slack_ms:g} ms)")
    return None


def role_totals(text: str) -> dict[str, Totals]:
    """Per-role totals (stable, canary) summed over models, from the gateway's metrics text."""
    found: dict[str, dict] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            role = s.labels.get("role")
            if role not in (STABLE, CANARY):
                continue
            acc = found.setdefault(role, {"requests": 0.0, "errors": 0.0, "buckets": {}})
            if s.name == "autoglm_gateway_version_requests_total":
                acc["requests"] += s.value
            elif s.name == "autoglm_gateway_version_errors_total":
                acc["errors"] += s.value
            elif s.name == "autoglm_gateway_version_request_seconds_bucket":
                le = float(s.labels["le"])
                acc["buckets"][le] = acc["buckets"].get(le, 0.0) + s.value
    return {role: Totals(a["requests"], a["errors"], tuple(sorted(a["buckets"].items()))) for role, a in found.items()}


class CanaryWatch:
    """Scrapes and judges; :meth:`check` returns the rollback reason once there is one."""

    def __init__(self, metrics_url: str, rules: CanarySettings, clock: Callable[[], float] = time.monotonic,
                 fetch: Callable[[], str] | None = None):
        self.url, self.rules, self.clock = metrics_url, rules, clock
        self.fetch = fetch or self._fetch
        self.history: deque[tuple[float, dict[str, Totals]]] = deque()

    def _fetch(self) -> str:
        with DIRECT.open(self.url, timeout=5) as resp:
            return resp.read().decode()

    def check(self) -> str | None:
        now, totals = self.clock(), role_totals(self.fetch())
        self.history.append((now, totals))
        while len(self.history) > 1 and self.history[1][0] <= now - self.rules.window_s:
            self.history.popleft()  # keep one scrape at (or before) the window's start
        start = self.history[0][1]
        windows = {role: totals.get(role, Totals()).since(start.get(role, Totals())) for role in (STABLE, CANARY)}
        return verdict(windows[STABLE], windows[CANARY], self.rules)


def watch(run, stack, rules: CanarySettings, duration_s: float | None = None,
          sleep: Callable[[float], None] = time.sleep) -> int:
    """Watch the stack's canary until it is rolled back (:data:`ROLLED_BACK`), promoted or withdrawn (0), or
    ``duration_s`` passes with the canary healthy (0)."""
    from serve.release import rollback

    judge = CanaryWatch(stack.gateway_metrics, rules)
    started = time.monotonic()
    while True:
        state = read_routing(stack.routing)
        canaries = {m: s.canary for m, s in splits(state).items() if s.canary is not None}
        if not canaries:
            print("release watch: no canary is served (promoted or withdrawn)")
            return 0
        reason = judge.check()
        if reason is not None:
            record = {"at": time.time(), "versions": sorted(set(canaries.values())), "reason": reason}
            log.warning("canary rolled back automatically: %s", reason)
            rollback(run, stack, auto_rollbacks=[*state.get("auto_rollbacks", []), record])
            print(f"release watch: canary version {record['versions']} rolled back: {reason}")
            return ROLLED_BACK
        if duration_s is not None and time.monotonic() - started >= duration_s:
            print(f"release watch: canary {sorted(set(canaries.values()))} healthy for {duration_s:g} s")
            return 0
        sleep(rules.check_every_s)
