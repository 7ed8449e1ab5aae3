"""What a search (`saeforge tune`) and a study (`saeforge study`) share: one model pass for all
their SAEs, the parent MLflow run, and what each trial needs beside its own training.

A sweep's driver validates, connects Ray, then `open_sweep` opens the store and the experiment
and makes the activations once; its trials are Tune functions that each train an SAE on them,
ask Tune for `trial_resources`, evaluate with the process's `eval_model` and log their result
as a child run of the sweep's `parent_run`, which ends KILLED with its unfinished children when
the sweep is interrupted (Ctrl-C, or SIGTERM under `ray_cluster.ray_driver`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Iterator

from saeforge.core.model import ModelSpec, load_tokenizer, load_whole_model
from saeforge.jobs.data.activation_cache import SharedActivations, shared_activations
from saeforge.jobs.plan import Contexts, RunPlan, TrackingTarget
from saeforge.jobs.runtime.ray_cluster import cores, plan_resources
from saeforge.jobs.tracking import mlflow_runs, store

TRAINER_TRIAL_CPU = 0.1  # a trial that fits a TorchTrainer: its own process mostly waits on its workers


def open_sweep(plan: RunPlan, contexts: Contexts, cache: str, progress=print) -> tuple[RunPlan, SharedActivations]:
    """Once the sweep's inputs are valid and Ray is connected: open the MLflow store and the
    hook's experiment, make the shared activations (or read the activation `cache`). Returns the
    plan with its resources and tracking target, and the activations."""
    uri = store.use_store()
    experiment_id = store.ensure_experiment(store.experiment_name(plan.stream.model.short_name, plan.hook.name), uri)
    # Trials report their metrics only at their end (tune: the early-stopping score only while
    # they train): Tune must not insist on every metric in every report.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # Ctrl-C raises KeyboardInterrupt, as in `saeforge train`: Tune's own handler would end the
    # sweep quietly and use its trials so far as if it had finished.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    resources = plan_resources(plan, concurrent=False, workers=1)
    plan = dataclasses.replace(plan, resources=resources, tracking=TrackingTarget(uri, experiment_id))
    return plan, shared_activations(plan, contexts, cache, progress)


def trial_concurrency(args) -> tuple[int, int, float]:
    """(max concurrent trials, torch threads per train worker, GPUs per worker) from the cluster's
    resources. A local Ray declares more logical CPUs than the machine has cores: there the
    cores decide."""
    import ray

    resources = ray.cluster_resources()
    logical = resources.get("CPU", 1.0)
    alive = [n for n in ray.nodes() if n.get("Alive")]
    physical = min(logical, cores()) if len(alive) <= 1 else logical
    n = max(1, min(int(physical // args.workers), int(logical // (args.workers + TRAINER_TRIAL_CPU))))
    gpus = resources.get("GPU", 0.0)
    if gpus:  # a whole GPU per train worker where there are enough, else one trial sharing them
        n = min(n, max(1, int(gpus // args.workers)))
    if args.max_concurrent:
        n = args.max_concurrent
    threads = max(1, int(physical // (n * args.workers)))
    gpu_per_worker = (1.0 if gpus >= n * args.workers else gpus / (n * args.workers)) if gpus else 0.0
    return n, threads, gpu_per_worker


def with_trial_share(plan: RunPlan, concurrency: tuple[int, int, float]) -> RunPlan:
    """The plan whose workers take one trial's share of the machine (`trial_concurrency`)."""
    _, threads, gpus = concurrency
    resources = dataclasses.replace(plan.resources, worker_threads=threads, gpus_per_worker=gpus)
    return dataclasses.replace(plan, resources=resources)


def trial_resources(plan: RunPlan, in_process: bool = True) -> dict:
    """What one trial asks Tune for: a trial that trains in its own process asks for a worker's
    resources; one that fits a TorchTrainer only for its own process (its workers ask for theirs)."""
    return plan.resources.per_worker() if in_process else {"CPU": TRAINER_TRIAL_CPU}


@functools.lru_cache(maxsize=1)
def eval_model(spec: ModelSpec):
    """(whole model, tokenizer) for evaluation, loaded once per trial process: Tune runs the
    trials of a sweep one after another in the same actor processes."""
    return load_whole_model(spec), load_tokenizer(spec)


@contextlib.contextmanager
def parent_run(plan: RunPlan, name: str, tags: dict, params: dict, acts: SharedActivations) -> Iterator[str]:
    """The sweep's MLflow run, active while the block runs, with its params and what making the
    activations cost; yields its id. Ctrl-C or SIGTERM inside: it and its trials' unfinished
    runs end KILLED (not FAILED, mlflow.start_run's own exit, nor RUNNING)."""
    import mlflow

    uri, experiment_id = plan.tracking.uri, plan.tracking.experiment_id
    with mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=tags) as parent:
        try:
            mlflow.log_params(mlflow_runs.safe_params(params))
            mlflow.log_metrics(acts.log_dict())
            yield parent.info.run_id
        except (KeyboardInterrupt, SystemExit):
            for child in mlflow_runs.child_runs(uri, experiment_id, parent.info.run_id):
                if child.info.status == "RUNNING":
                    mlflow_runs.close_run(uri, child.info.run_id, "KILLED", {mlflow_runs.STATUS_TAG: "interrupted"})
            mlflow.end_run("KILLED")
            raise
