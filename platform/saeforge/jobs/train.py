"""The driver of one training run: validate, feed activations to Ray Train, evaluate, track.

Validation (`validate.plan_train`) runs before Ray starts or MLflow records anything. Then: an
MLflow run, the activation dataset (producer actors over the contexts still to train; made
whole into the object store first on a local Ray, streamed on a cluster: `--stream`), one
TorchTrainer from the shared factory, the core evaluation (and any extra suites) of the final
checkpoint's SAE on held-out text with the whole model, and the registry: the final SAE is logged
once, as the registered pyfunc model, and becomes `champion` if it beats the current one.

The MLflow run ends FINISHED, KILLED (Ctrl-C, or SIGTERM: `ray job stop`, a scheduler) or FAILED
(anything raised), never left RUNNING by a driver that got to say so.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict

from saeforge.core import sae_files
from saeforge.core.eval_suites.runner import build_context, run_local
from saeforge.core.evaluation import evaluate_core
from saeforge.core.model import compute_device, load_model
from saeforge.core.sae_files import SAE_DIR
from saeforge.jobs import progress_board, tracking
from saeforge.jobs.activation_stream import materialize
from saeforge.jobs.arguments import TrainArgs
from saeforge.jobs.failures import run_failed
from saeforge.jobs.plan import Contexts, RunPlan, TrackingTarget
from saeforge.jobs.ray_cluster import connect_ray, plan_resources, produce_first, sigterm_interrupts
from saeforge.jobs.storage import local_checkpoint
from saeforge.jobs.trainer import fit, make_trainer
from saeforge.jobs.validate import plan_train


def train_on_ray(plan: RunPlan, contexts: Contexts, name: str, show=None):
    """Producers -> object store -> TorchTrainer workers. Returns Ray Train's Result. `show`
    prints the driver's and rank 0's progress lines as they come. With
    `plan.resources.produce_first` every activation is made before the trainer starts (same
    rows, same order), else the trainer reads them as the producers make them.

    Lost workers and producers are restarted up to `--max-failures` times (trainer.make_trainer,
    activation_stream.activation_dataset); past that, or on an error in training itself, this
    raises RunFailed with one line (the Ray error chained)."""
    import ray.data
    import ray.exceptions
    import ray.train

    ray.data.DataContext.get_current().enable_progress_bars = False  # our own progress lines instead
    try:
        if show is None:
            return _fit_on_ray(plan, contexts, name, lambda line: None)
        with progress_board.printed(f"saeforge-progress-{name}", show) as board:
            return _fit_on_ray(dataclasses.replace(plan, progress_board=board), contexts, name, show)
    except (ray.exceptions.RayError, ray.train.TrainingFailedError) as err:
        raise run_failed(err, plan.args.max_failures) from err


def _fit_on_ray(plan: RunPlan, contexts: Contexts, name: str, show):
    from saeforge.jobs.corpus_stream import plan_dataset  # imports Ray Data: only once a run starts

    if not plan.resources.produce_first:
        return fit(make_trainer(plan, plan_dataset(plan, contexts.train), name=name, storage=plan.args.storage))
    show(f"saeforge: making the activations of {len(contexts.train)} contexts first, then training on them...")
    started = time.time()
    dataset, _, _ = materialize(plan_dataset(plan, contexts.train, count=True), len(contexts.train), show)
    show(f"saeforge: activations ready in {time.time() - started:.0f}s")
    return fit(make_trainer(plan, dataset, name=name, storage=plan.args.storage))


def activation_bytes(plan: RunPlan, n_contexts: int) -> int:
    """What the run's activations take in the object store (float32, every hook)."""
    return n_contexts * plan.stream.context_size * plan.variant.d_in * 4 * len(plan.stream.hooks)


def log_params(plan: RunPlan) -> None:
    import mlflow

    mlflow.log_params(
        {
            **{k: v for k, v in asdict(plan.args).items() if k != "overrides"},
            **{f"sae.{k}": v for k, v in plan.variant.to_dict().items()},
            "total_steps": plan.loop.total_steps,
            "contexts_per_step": plan.stream.contexts_per_step,
            "producer_precision": plan.stream.precision,
        }
    )


class Phases:
    """Wall time of each phase of a run, for the summary and MLflow (`time/<phase>_s`)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.time()

    def done(self, phase: str) -> None:
        now = time.time()
        self.seconds[phase] = now - self._last
        self._last = now


def run_train(args: TrainArgs, progress=print) -> dict:
    """The whole `saeforge train`: returns a summary dict (also printed by the CLI)."""
    import mlflow

    started = time.time()
    phases = Phases()
    plan, contexts = plan_train(args, progress)
    phases.done("plan")  # the model prepared the first time, the corpus tokenised
    args = plan.args
    name = plan.name
    progress(
        f"saeforge: {args.variant} SAE (d_sae {plan.variant.d_sae}) on {plan.hook.name} of {args.model}, "
        f"{plan.loop.total_steps} steps of {plan.stream.contexts_per_step} contexts "
        f"({len(contexts.train)} contexts to train), {args.producers} producer(s) computing in "
        f"{plan.stream.precision}, {args.workers} worker(s)"
    )
    uri = tracking.use_store()
    experiment_id = tracking.ensure_experiment(
        tracking.experiment_name(plan.stream.model.short_name, plan.hook.name), uri
    )
    connect_ray(args.address)
    phases.done("ray_start")
    resumed_run = plan.tracking.run_id or None  # a resumed run goes on logging into its MLflow run
    run = mlflow.start_run(
        run_id=resumed_run, experiment_id=None if resumed_run else experiment_id, run_name=None if resumed_run else name
    )
    status = "FAILED"
    try:
        with sigterm_interrupts():  # after ray.init, which sets a handler of its own
            summary = train_evaluate_register(plan, contexts, uri, run, started, progress, phases)
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit):
        status = "KILLED"
        raise
    finally:
        mlflow.end_run(status)
    seconds = time.time() - started
    return {**summary, "tracking_uri": tracking.redact(uri), "seconds": seconds, "phase_seconds": phases.seconds}


def train_evaluate_register(
    plan: RunPlan, contexts: Contexts, uri: str, run, started: float, progress, phases: Phases
) -> dict:
    """Inside the run's MLflow run: train on Ray, evaluate, log, register, promote."""
    import mlflow

    args, resumed = plan.args, bool(plan.tracking.run_id)
    registered = tracking.registered_model_name(plan.stream.model.short_name, plan.hook.name, args.variant)
    plan = dataclasses.replace(
        plan,
        resources=plan_resources(
            plan, concurrent=not produce_first(args.stream, args.address, activation_bytes(plan, len(contexts.train)))
        ),
        tracking=TrackingTarget(uri, run.info.experiment_id, run.info.run_id, registered),
    )
    if not resumed:
        log_params(plan)
    result = train_on_ray(plan, contexts, plan.name, show=progress)
    phases.done("train")  # activations and SAE steps, with Ray Train's start-up
    checkpoint = local_checkpoint(result.checkpoint)  # downloaded when --storage is remote
    train_seconds = time.time() - started
    train_tokens_per_s = result.metrics["tokens_seen"] / max(result.metrics["train_seconds"], 1e-9)
    failures = int(result.metrics.get("mlflow_failures", 0))
    if failures:
        progress(
            f"saeforge: warning: {failures} of the workers' MLflow logging calls failed "
            "(training went on; those curve points are missing)"
        )

    sae_folder = checkpoint / SAE_DIR
    variant, cfg = sae_files.load_sae(sae_folder)
    progress(f"saeforge: evaluating on {len(contexts.eval)} held-out contexts...")
    device, dtype = compute_device()
    model = load_model(plan.stream.model, dtype=dtype, device=device)
    results = evaluate_core(
        model,
        variant,
        plan.hook,
        contexts.eval,
        list(plan.stream.special_ids),
        progress=lambda done, total: progress(f"  eval {done}/{total} contexts"),
    )
    mlflow.log_metrics({f"eval/{k}": v for k, v in tracking.finite(results).items()})
    results["dead_fraction_train"] = result.metrics["dead_fraction"]  # silent over the last 50k training tokens
    mlflow.log_metrics(
        {
            "train_seconds": train_seconds,
            "train_tokens_per_s": train_tokens_per_s,
            "train/dead_fraction_last_50k": results["dead_fraction_train"],
        }
    )
    mlflow.log_dict(results, "eval/core.json")
    phases.done("evaluate")
    if plan.eval_suites:
        ctx = build_context(variant, cfg, model, dataset=args.dataset)
        for suite, outcome in run_local(ctx, [s for s in plan.eval_suites if s != "core"], {}, progress).items():
            mlflow.log_metrics({f"eval/{suite}/{k}": v for k, v in tracking.finite(outcome.metrics).items()})
            mlflow.log_dict(outcome.to_dict(), f"eval/{suite}.json")
    version = tracking.log_and_register(sae_folder, registered)
    moved, reason = tracking.promote_if_better(registered, version, results, plan.max_l0)
    phases.done("register")
    mlflow.log_metrics({f"time/{k}_s": v for k, v in phases.seconds.items()})
    return {
        "run_id": run.info.run_id,
        "experiment_id": run.info.experiment_id,
        "registered_model": registered,
        "version": version,
        "champion": moved,
        "champion_reason": reason,
        "checkpoint": str(checkpoint),
        "metrics": results,
        "train_tokens_per_s": train_tokens_per_s,
        "mlflow_failures": failures,
        "producer_precision": plan.stream.precision,
    }
