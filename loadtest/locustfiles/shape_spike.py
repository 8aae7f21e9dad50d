"""Spike load: a quarter of ``--users`` for 40% of ``--run-time``, all of them for 20%, then back.

Phases "before", "spike" and "after" show how latency reacts to the burst and whether it recovers.
"""

from locust import LoadTestShape

from loadtest.locustfiles.common import set_phase


class SpikeShape(LoadTestShape):
    use_common_options = True  # reads --users, --spawn-rate and --run-time instead of ignoring them

    def tick(self):
        opts = self.runner.environment.parsed_options
        elapsed, total = self.get_run_time(), opts.run_time
        if elapsed >= total:
            return None
        base = max(1, opts.num_users // 4)
        phase = "before" if elapsed < 0.4 * total else "spike" if elapsed < 0.6 * total else "after"
        set_phase(phase)
        # The spike arrives at once: spawning it at --spawn-rate would turn it into a ramp.
        return (opts.num_users, max(opts.spawn_rate, opts.num_users)) if phase == "spike" else (base, opts.spawn_rate)
