"""The private local Ray a run starts (`ray_cluster.connect_ray`)."""

import os

from saeforge.jobs.runtime.ray_cluster import TRAIN_HEALTH_CHECK_ENV, TRAIN_HEALTH_CHECK_S


def test_the_local_rays_processes_inherit_ray_trains_health_check_interval(ray_session):
    """Set before `ray.init`, the interval reaches every process the raylet starts, Ray Train's
    controller among them (it notices the end of training at its next check: 2 s by default).
    Set after, or not at all, the workers would not have it."""
    ray = ray_session

    @ray.remote(num_cpus=0)
    def seen() -> str | None:
        return os.environ.get(TRAIN_HEALTH_CHECK_ENV)

    assert ray.get(seen.remote()) == TRAIN_HEALTH_CHECK_S
