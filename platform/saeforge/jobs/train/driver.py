"""The driver of one training run: validate, feed activations to Ray Train, evaluate, track.

Validation (`validate.plan_train`) runs before Ray starts or MLflow records anything. Then: an
MLflow run, the activation dataset (producer actors over the contexts still to train; made
whole into the object store first on a local Ray, streamed on a cluster: `--stream`), one
TorchTrainer from the shared factory, the core evaluation (and any extra suites) of the final
checkpoint's SAE on held-out text with the whole model, and the registry: the final SAE is logged
once, as the registered pyfunc model, and becomes `champion` if it beats the current one.

With several hooks (`--layer 3,6,9`) the producers run the model once, to the deepest hook, and
emit every hook's activations; one worker group trains one SAE per hook side by side on them;
one clean pass of the evaluation serves every SAE; each SAE is logged in an MLflow run of its
own, registered under its own name and judged for `champion` on its own. The k runs are siblings,
not children of a parent run: each sits in its hook's experiment (`saeforge/<model>/<hook>`),
exactly where a one-hook run of that hook would be, so every run, comparison and champion of a
hook is found in one place; they share the run's name and each names the others (tag
`saeforge.hook_runs`).

The MLflow runs end FINISHED, KILLED (Ctrl-C, or SIGTERM: `ray job stop`, a scheduler) or FAILED
(anything raised), never left RUNNING by a driver that got to say so.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict

from saeforge.core import sae_files
from saeforge.core.eval_suites.runner import build_context, run_local
from saeforge.core.evaluation import evaluate_hooks
from saeforge.core.model import load_whole_model
from saeforge.core.sae_files import SAE_DIR
from saeforge.jobs.arguments import TrainArgs
from saeforge.jobs.data.activation_stream import forward_counter, forwards, materialize
from saeforge.jobs.plan import Contexts, RunPlan, TrackingTarget
from saeforge.jobs.runtime import progress_board
from saeforge.jobs.runtime.failures import run_failed
from saeforge.jobs.runtime.ray_cluster import plan_resources, produce_first, ray_driver
from saeforge.jobs.runtime.storage import local_checkpoint
from saeforge.jobs.tracking import mlflow_runs, registry, store
from saeforge.jobs.train import checkpoints
from saeforge.jobs.train.trainer import fit, make_trainer
from saeforge.jobs.validate import plan_train


def train_on_ray(plan: RunPlan, contexts: Contexts, name: str, show=None, counter=None):
    """Producers -> object store -> TorchTrainer workers. Returns Ray Train's Result. `show`
    prints the driver's and rank 0's progress lines as they come; the producers count their
    forwards in `counter` (a `forward_counter`; a new one when none is given). With
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
        counter = counter if counter is not None else forward_counter()
        if show is None:
            return _fit_on_ray(plan, contexts, name, lambda line: None, counter)
        with progress_board.printed(f"saeforge-progress-{name}", show) as board:
            return _fit_on_ray(dataclasses.replace(plan, progress_board=board), contexts, name, show, counter)
    except (ray.exceptions.RayError, ray.train.TrainingFailedError) as err:
        raise run_failed(err, plan.args.max_failures) from err


def _fit_on_ray(plan: RunPlan, contexts: Contexts, name: str, show, counter):
    from saeforge.jobs.data.corpus_stream import plan_dataset  # imports Ray Data: once a run starts

    dataset = plan_dataset(plan, contexts.train, counter=counter)
    if plan.resources.produce_first:
        show(f"saeforge: making the activations of {len(contexts.train)} contexts first, then training on them...")
        started = time.time()
        dataset, _, _ = materialize(dataset, counter, len(contexts.train), show)
        show(f"saeforge: activations ready in {time.time() - started:.0f}s")
    return fit(make_trainer(plan, dataset, name=name, storage=plan.args.storage))


def activation_bytes(plan: RunPlan, n_contexts: int) -> int:
    """What the run's activations take in the object store (float32, every hook)."""
    return n_contexts * plan.stream.context_size * plan.variant.d_in * 4 * len(plan.stream.hooks)


def run_params(plan: RunPlan) -> dict:
    """What a run logs as its params: every argument, every variant config field (`sae.*`), the
    run's length; a run of several hooks adds the hook whose SAE the MLflow run holds."""
    params = {
        **{k: v for k, v in asdict(plan.args).items() if k != "overrides"},
        **{f"sae.{k}": v for k, v in plan.variant.to_dict().items()},
        "total_steps": plan.loop.total_steps,
        "contexts_per_step": plan.stream.contexts_per_step,
        "producer_precision": plan.stream.precision,
    }
    if len(plan.stream.hooks) > 1:
        params["hooks"] = ",".join(h.name for h in plan.stream.hooks)
    return params


class Phases:
    """Wall time of each phase of a run, for the summary and MLflow (`time/<phase>_s`)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.time()

    def done(self, phase: str) -> float:
        """End `phase` now (a phase done again, e.g. once per hook, adds up); its seconds this time."""
        now = time.time()
        seconds, self._last = now - self._last, now
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds
        return seconds


def run_train(args: TrainArgs, progress=print) -> dict:
    """The whole `saeforge train`: returns a summary dict (also printed by the CLI). With several
    hooks (`--layer 3,6,9`) one model pass trains one SAE per hook, each evaluated, logged in an
    MLflow run of its own and registered under its own name; the summary lists every hook's
    result under "hooks" (a one-hook run also has its result at the top)."""
    started = time.time()
    phases = Phases()
    plan, contexts = plan_train(args, progress)
    phases.done("plan")  # the model prepared the first time, the corpus counted
    progress(run_line(plan, len(contexts.train)))
    uri = store.use_store()
    model_name = plan.stream.model.short_name
    experiments = [store.ensure_experiment(store.experiment_name(model_name, h.name), uri) for h in plan.stream.hooks]
    with ray_driver(plan.args.address):
        phases.done("ray_start")
        run_ids = open_runs(plan, uri, experiments)
        one = len(run_ids) == 1
        tracking = TrackingTarget(uri, experiments[0], run_ids[0] if one else "", hook_run_ids=() if one else run_ids)
        plan = dataclasses.replace(plan, tracking=tracking)
        status = "FAILED"
        try:
            summary = train_evaluate_register(plan, contexts, started, progress, phases)
            status = "FINISHED"
        except (KeyboardInterrupt, SystemExit):
            status = "KILLED"
            raise
        finally:
            close_runs(uri, run_ids, status)
    seconds = time.time() - started
    return {**summary, "tracking_uri": store.redact(uri), "seconds": seconds, "phase_seconds": phases.seconds}


def run_line(plan: RunPlan, n_contexts: int) -> str:
    """The line that says what the run will do."""
    args, hooks = plan.args, plan.stream.hooks
    what = (
        f"{args.variant} SAE (d_sae {plan.variant.d_sae}) on {plan.hook.name}"
        if len(hooks) == 1
        else f"{len(hooks)} {args.variant} SAEs (d_sae {plan.variant.d_sae}), one per hook of "
        f"{', '.join(h.name for h in hooks)}, from one model pass"
    )
    return (
        f"saeforge: {what} of {args.model}, {plan.loop.total_steps} steps of {plan.stream.contexts_per_step} contexts "
        f"({n_contexts} contexts to train), {args.producers} producer(s) computing in "
        f"{plan.stream.precision}, {args.workers} worker(s)"
    )


def open_runs(plan: RunPlan, uri: str, experiments: list[str]) -> list[str]:
    """Each hook's MLflow run, RUNNING: a resumed run's own (it goes on logging into them), else
    new ones named after the run, with their params."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    if plan.tracking.run_id or plan.tracking.hook_run_ids:
        for run_id in plan.run_ids:
            client.update_run(run_id, status="RUNNING")
        return list(plan.run_ids)
    run_ids = [mlflow_runs.start_run(uri, experiment_id, plan.name) for experiment_id in experiments]
    for run_id in run_ids:
        mlflow_runs.log_to_run(uri, run_id, params=run_params(plan))
    if len(run_ids) > 1:  # each run names its siblings of the same model pass
        siblings = json.dumps({h.name: run_id for h, run_id in zip(plan.stream.hooks, run_ids)})
        for run_id in run_ids:
            client.set_tag(run_id, mlflow_runs.HOOK_RUNS_TAG, siblings)
    return run_ids


def close_runs(uri: str, run_ids: list[str], status: str) -> None:
    """End the runs still RUNNING (every run when the whole run failed or was killed) with `status`."""
    import mlflow
    from mlflow.tracking import MlflowClient

    if mlflow.active_run() is not None:
        mlflow.end_run(status)
    client = MlflowClient(uri)
    for run_id in run_ids:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status)


def train_evaluate_register(plan: RunPlan, contexts: Contexts, started: float, progress, phases: Phases) -> dict:
    """Train on Ray, evaluate every hook's SAE (one clean pass for them all), then log, register
    and promote each in its own MLflow run."""
    concurrent = not produce_first(plan.args.stream, plan.args.address, activation_bytes(plan, len(contexts.train)))
    plan = dataclasses.replace(plan, resources=plan_resources(plan, concurrent=concurrent))
    counter = forward_counter()  # held while the producers count into it
    result = train_on_ray(plan, contexts, plan.name, show=progress, counter=counter)
    batches, forwarded = forwards(counter)
    phases.done("train")  # activations and SAE steps, with Ray Train's start-up
    checkpoint = local_checkpoint(result.checkpoint)  # downloaded when --storage is remote
    train_metrics = {
        "train_seconds": time.time() - started,
        "train_tokens_per_s": result.metrics["tokens_seen"] / max(result.metrics["train_seconds"], 1e-9),
    }
    failures = int(result.metrics.get("mlflow_failures", 0))
    if failures:
        progress(
            f"saeforge: warning: {failures} of the workers' MLflow logging calls failed "
            "(training went on; those curve points are missing)"
        )
    hooks = plan.stream.hooks
    folders = [checkpoint / sub for sub in checkpoints.hook_folders([h.name for h in hooks])]
    saes, model, evaluations = evaluate_saes(plan, contexts, folders, progress)
    phases.done("evaluate")
    shared = dict(phases.seconds)  # plan, ray_start, train, evaluate: every hook's
    summaries = []
    for hook, folder, sae, results in zip(hooks, folders, saes, evaluations):
        results["dead_fraction_train"] = result.metrics.get(
            f"dead_fraction/{hook.name}", result.metrics["dead_fraction"]
        )
        logged = log_and_register(plan.for_hook(hook), folder, sae, model, results, train_metrics, shared, progress)
        summaries.append(
            {**logged, "train_tokens_per_s": train_metrics["train_tokens_per_s"], "mlflow_failures": failures}
        )
        phases.done("register")
    summary = {
        "checkpoint": str(checkpoint),
        "train_tokens_per_s": train_metrics["train_tokens_per_s"],
        "mlflow_failures": failures,
        "producer_precision": plan.stream.precision,
        "activations": {"producer_batches": batches, "contexts_forwarded": forwarded},
        "hooks": summaries,
    }
    return {**summaries[0], **summary} if len(hooks) == 1 else summary


def evaluate_saes(plan: RunPlan, contexts: Contexts, folders: list, progress):
    """Each hook's final SAE (variant, cfg.json) from its checkpoint folder, the whole model, and
    the core evaluation of every SAE on the held-out contexts from one clean pass."""
    saes = [sae_files.load_sae(folder / SAE_DIR) for folder in folders]
    progress(f"saeforge: evaluating on {len(contexts.eval)} held-out contexts...")
    model = load_whole_model(plan.stream.model)
    evaluations = evaluate_hooks(
        model,
        [(variant, hook) for (variant, _), hook in zip(saes, plan.stream.hooks)],
        contexts.eval,
        list(plan.stream.special_ids),
        progress=lambda done, total: progress(f"  eval {done}/{total} contexts"),
        precision=plan.stream.precision,  # the model computes as the producers did
    )
    return saes, model, evaluations


def log_and_register(
    plan: RunPlan, folder, sae, model, results: dict, train_metrics: dict, shared: dict, progress
) -> dict:
    """One hook's SAE (`plan` is the hook's: `RunPlan.for_hook`) in its MLflow run: its evaluation,
    any extra suites, the logged and registered model, the champion decision, the phase times;
    then the run ends FINISHED. Returns the hook's summary."""
    import mlflow

    started = time.time()
    variant, cfg = sae
    hook, run_id = plan.hook, plan.tracking.run_id
    registered = registry.registered_model_name(plan.stream.model.short_name, hook.name, plan.variant_name)
    run = mlflow.start_run(run_id=run_id)
    eval_metrics = {k: v for k, v in results.items() if k != "dead_fraction_train"}
    mlflow.log_metrics({f"eval/{k}": v for k, v in mlflow_runs.finite(eval_metrics).items()})
    mlflow.log_metrics({**train_metrics, "train/dead_fraction_last_50k": results["dead_fraction_train"]})
    mlflow.log_dict(results, "eval/core.json")
    if plan.eval_suites:
        ctx = build_context(variant, cfg, model, dataset=plan.args.dataset)
        for suite, outcome in run_local(ctx, [s for s in plan.eval_suites if s != "core"], {}, progress).items():
            mlflow.log_metrics({f"eval/{suite}/{k}": v for k, v in mlflow_runs.finite(outcome.metrics).items()})
            mlflow.log_dict(outcome.to_dict(), f"eval/{suite}.json")
    version = registry.log_and_register(folder / SAE_DIR, registered)
    moved, reason = registry.promote_if_better(registered, version, results, plan.max_l0)
    mlflow.log_metrics({f"time/{k}_s": v for k, v in {**shared, "register": time.time() - started}.items()})
    mlflow.end_run("FINISHED")
    return {
        "hook": hook.name,
        "run_id": run_id,
        "experiment_id": run.info.experiment_id,
        "registered_model": registered,
        "version": version,
        "champion": moved,
        "champion_reason": reason,
        "checkpoint": str(folder),
        "metrics": results,
        "producer_precision": plan.stream.precision,
    }
