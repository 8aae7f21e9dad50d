"""The deploy stage: a run's artifacts rendered for Kubernetes (kustomize) and docker-compose.

    from deploy import render_run
    render_run(settings)   # settings.deploy (env, tune workers, ...) -> runs/<run>/deploy/out/<env>/

Reads the model repository (``repository/task.json`` and manifest) and, when complete, loadtest's
measured capacity; renders the autoscaling rules of ``autoglm.autoscaling`` as HPA behavior and targets, and
Triton's resource requests and limits from the CPU and memory loadtest measured there (``deploy.resources``).
"""

from deploy.capacity import Capacity, Target
from deploy.release import Images, Release, read_release
from deploy.render import render_run
from deploy.scaling import adapter_config, hpa_behavior, hpa_metrics

__all__ = ["Capacity", "Images", "Release", "Target", "adapter_config", "hpa_behavior", "hpa_metrics",
           "read_release", "render_run"]
