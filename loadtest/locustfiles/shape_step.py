"""Step load: ``--users`` reached in ``--shape-steps`` equal steps spread over ``--run-time``.

Each step is reported as its own phase ("users=N"), so one run traces latency against concurrency.
"""

from locust import LoadTestShape

from loadtest.locustfiles.common import set_phase


class StepShape(LoadTestShape):
    use_common_options = True  # reads --users, --spawn-rate and --run-time instead of ignoring them

    def tick(self):
        opts = self.runner.environment.parsed_options
        elapsed, total, steps = self.get_run_time(), opts.run_time, max(1, opts.shape_steps)
        if elapsed >= total:
            return None
        step = min(int(elapsed * steps / total), steps - 1)
        users = max(1, round(opts.num_users * (step + 1) / steps))
        set_phase(f"users={users}")
        return users, opts.spawn_rate
