"""GPUs are asked for explicitly (`--gpus-per-producer`, `--gpus-per-worker`) or by a rule that
lets an autoscaler add GPU nodes: what each actor asks Ray for, and the TorchTrainer and Ray Data
requests built from it. Ray is not started: these are the requests, not their scheduling (no GPU
is lent to the test machines)."""

import dataclasses

import pytest

from conftest import tiny_args
from saeforge.jobs.runtime.ray_cluster import LARGE_MODEL_PARAMS, gpus_each


@pytest.mark.parametrize(
    ("cluster_gpus", "kwargs", "want"),
    [
        (0, {}, (0.0, 0.0)),  # a small model on a CPU machine
        (0, {"large_model": True}, (0.0, 0.0)),  # large, but a private local Ray: nothing to ask an autoscaler
        (0, {"large_model": True, "on_cluster": True}, (1.0, 1.0)),  # min_workers 0: ask, so GPU nodes come
        (0, {"on_cluster": True}, (0.0, 0.0)),  # a small model stays on CPU
        (4, {}, (1.0, 1.0)),  # a whole GPU for each of 1 producer + 1 worker
        (1, {}, (0.5, 0.5)),  # one GPU shared
        (0, {"per_producer": 1.0, "per_worker": 0.25}, (1.0, 0.25)),  # explicit requests stand
        (8, {"per_worker": 0.0}, (1.0, 0.0)),  # workers on CPU by request, producers auto
    ],
)
def test_gpus_each_actor_asks_for(cluster_gpus, kwargs, want):
    assert gpus_each(1, 1, cluster_gpus, **kwargs) == want


def test_the_plan_knows_a_large_model_and_the_trainer_asks_for_what_it_says(tmp_path):
    from transformers import Gemma2Config

    from saeforge.jobs.plan import Resources
    from saeforge.jobs.train.trainer import make_trainer
    from saeforge.jobs.validate import parameter_count, plan_train

    gemma2_2b = Gemma2Config(
        vocab_size=256000,
        hidden_size=2304,
        num_hidden_layers=26,
        intermediate_size=9216,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
    )
    assert 2.5e9 < parameter_count(gemma2_2b) < 2.7e9 and parameter_count(gemma2_2b) >= LARGE_MODEL_PARAMS
    plan, _ = plan_train(tiny_args(tmp_path, tokens=4000))
    assert 0 < plan.model_params < LARGE_MODEL_PARAMS
    plan = dataclasses.replace(plan, resources=Resources(gpus_per_producer=1.0, gpus_per_worker=0.5))
    scaling = make_trainer(plan, None, name="gpu-request", storage="/tmp/unused").scaling_config
    assert scaling.use_gpu and scaling.resources_per_worker == {"CPU": 1, "GPU": 0.5}
    plan = dataclasses.replace(plan, resources=Resources(gpus_per_worker=2.0))
    scaling = make_trainer(plan, None, name="gpu-request", storage="/tmp/unused").scaling_config
    assert scaling.resources_per_worker == {"CPU": 1, "GPU": 2.0}


def test_the_trainer_asks_for_the_workers_custom_resources(tmp_path):
    """--worker-resources reach the workers' ScalingConfig (the producers' reach map_batches: the
    multi-node test checks where both ran)."""
    from saeforge.jobs.plan import Resources
    from saeforge.jobs.train.trainer import make_trainer
    from saeforge.jobs.validate import plan_train

    plan, _ = plan_train(tiny_args(tmp_path, tokens=4000))
    plan = dataclasses.replace(plan, resources=Resources(worker_resources={"trainer": 1.0}))
    scaling = make_trainer(plan, None, name="resource-request", storage="/tmp/unused").scaling_config
    assert scaling.resources_per_worker == {"CPU": 1, "trainer": 1.0}
