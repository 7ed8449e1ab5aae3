"""The one trainer factory: a TorchTrainer over the activation stream, shared by `saeforge train`
and every Tune trial (Ray's Train V2 pattern: the trial is a Tune function that fits one)."""

from __future__ import annotations

from pathlib import Path

from saeforge.jobs.data.activation_stream import worker_dataset
from saeforge.jobs.plan import RunPlan
from saeforge.jobs.runtime.storage import storage_path
from saeforge.jobs.train.worker import worker_loop


def make_trainer(
    plan: RunPlan, dataset, *, name: str, storage: str | Path, callbacks: tuple = (), num_to_keep: int = 2
):
    """A TorchTrainer whose workers run `worker_loop` on `dataset` with the whole plan."""
    import ray.train
    from ray.train.torch import TorchTrainer

    res = plan.resources
    dataset, data_config = worker_dataset(dataset, plan.stream)
    return TorchTrainer(
        train_loop_per_worker=worker_loop,
        train_loop_config={"plan": plan},
        scaling_config=ray.train.ScalingConfig(
            num_workers=plan.stream.workers, use_gpu=res.gpus_per_worker > 0, resources_per_worker=res.per_worker()
        ),
        datasets={"train": dataset},
        dataset_config=data_config,
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path(storage),
            callbacks=list(callbacks),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=num_to_keep),
            # a lost worker: the group restarts from the latest checkpoint (worker_loop skips what it trained)
            failure_config=ray.train.FailureConfig(max_failures=plan.args.max_failures),
        ),
    )


def fit(trainer):
    """Fit and return Ray Train's Result (its checkpoint is the final one), raising a failure."""
    result = trainer.fit()
    if result.error:
        raise result.error
    return result
