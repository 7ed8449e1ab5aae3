"""One Tune trial of a search: the Tune function that trains an SAE on the search's shared
activations, then evaluates it with the whole model and reports the objective.

The trial derives its plan from the search's plan once, from the sampled values, and trains with
the same loop as `saeforge train` (`train.worker.train_plan`), reporting every `report_every`
steps so ASHA can stop a bad trial early. A trial of one worker (the default) trains in its own
process, where a worker group would only add its start-up to a short trial
(docs/benchmarks.md#a-trial-in-its-own-process-against-a-torchtrainer-per-trial); a trial of several
(`--workers N`) fits a TorchTrainer (Ray's Train V2 pattern). Each trial is an MLflow child run
of the search.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from saeforge.core.batches import step_budget
from saeforge.core.evaluation import Baseline, baselines, evaluate_core
from saeforge.core.hooks import HookPoint
from saeforge.core.model import ModelSpec
from saeforge.core.sae_files import SAE_DIR, load_sae
from saeforge.core.training import LoopSettings
from saeforge.jobs.data.activation_stream import ID_COLUMN, MASK_COLUMN
from saeforge.jobs.plan import RunPlan
from saeforge.jobs.runtime.storage import local_checkpoint
from saeforge.jobs.sweep import eval_model
from saeforge.jobs.tracking import mlflow_runs
from saeforge.jobs.train.trainer import fit, make_trainer
from saeforge.jobs.train.worker import WorkerSession, in_process_device, train_plan
from saeforge.jobs.tune.search_space import EarlyStopping, TuneSpace
from saeforge.jobs.validate import variant_config

ES_SCORE = "early_stop_score"  # the intermediate metric ASHA reads


@dataclass
class TrialContext:
    """What every trial of one variant's search shares (sent once through tune.with_parameters)."""

    plan: RunPlan  # this variant's plan: its config holds the space's fixed values
    space: TuneSpace
    dataset: Any  # the materialised activations
    available_contexts: int
    eval_contexts: np.ndarray
    tokens_per_trial: int
    l0_max: float
    parent_run_id: str
    storage: str
    eval_reference: Baseline | None = None  # the zero-ablated losses of eval_contexts, once per search


def trial_plan(ctx: TrialContext, sampled: dict, run_id: str) -> RunPlan:
    """The trial's own plan: the sampled config, its step budget (the rule `saeforge train`
    follows), Tune's report cadence, its MLflow child run."""
    plan = ctx.plan
    cfg = variant_config(plan.variant_name, plan.variant.d_in, plan.variant.d_sae, {**ctx.space.fixed, **sampled})
    budget = step_budget(
        ctx.tokens_per_trial,
        cfg.batch_size,
        plan.stream.context_size,
        plan.stream.workers,
        available_contexts=ctx.available_contexts,
    )
    report_every = plan.loop.report_every
    return dataclasses.replace(
        plan,
        variant=cfg,
        stream=dataclasses.replace(plan.stream, contexts_per_step=budget.contexts_per_step),
        loop=LoopSettings(budget.total_steps, log_every=report_every, checkpoint_every=0, report_every=report_every),
        tracking=dataclasses.replace(plan.tracking, run_id=run_id),
    )


def with_early_stop_score(values: dict, stopping: EarlyStopping, l0_max: float) -> dict:
    """A training report with the score ASHA compares added: the early-stopping metric, worsened
    by how far the training L0 is above the search's L0 bound."""
    values = dict(values)
    if stopping.metric in values:
        over = max(0.0, values.get("l0", 0.0) / l0_max - 1) if l0_max else 0.0
        value = values[stopping.metric]
        values[ES_SCORE] = value - over if stopping.mode == "max" else value + over
    return values


def early_stop_callback(stopping: EarlyStopping, l0_max: float):
    from ray.tune.integration.ray_train import TuneReportCallback

    class EarlyStopScore(TuneReportCallback):
        """Forwards Ray Train reports to Tune with rank 0's `with_early_stop_score`."""

        def after_report(self, run_context, metrics, checkpoint):
            first = with_early_stop_score(metrics[0], stopping, l0_max)
            super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    return EarlyStopScore()


def trains_in_process(plan: RunPlan) -> bool:
    """Whether a trial of this plan trains in its Tune function's own process (one worker), or
    fits a TorchTrainer (several data-parallel workers)."""
    return plan.stream.workers == 1


def train_in_process(plan: RunPlan, dataset, stopping: EarlyStopping, l0_max: float) -> Path:
    """A one-worker trial's training in this process, reporting to Tune as its TorchTrainer
    would (the same loop, the same reports and early-stopping score, the final checkpoint
    persisted to the trial's storage by Tune); returns the final checkpoint as a local folder."""
    from ray import tune

    def report(values: dict, folder: Path | None) -> None:
        if folder is None:
            tune.report(with_early_stop_score(values, stopping, l0_max))
        else:
            tune.report(values, checkpoint=tune.Checkpoint.from_directory(folder))

    dataset.context.execution_options.preserve_order = True  # the order `step_batches` checks
    session = WorkerSession(0, 1, in_process_device(plan), None, report)
    train_plan(plan, dataset.iterator(), session)
    return local_checkpoint(tune.get_checkpoint())  # the final one: Tune's copy in the trial's storage


def train_trial(plan: RunPlan, ctx: TrialContext, trial_id: str) -> Path:
    """Train the trial's SAE on its hook's column of the shared activations, in this process or
    on a TorchTrainer's workers; returns its final checkpoint as a local folder."""
    columns = [ID_COLUMN, *(h.name for h in plan.stream.hooks), MASK_COLUMN]
    dataset = ctx.dataset.limit(plan.loop.total_steps * plan.stream.contexts_per_step).select_columns(columns)
    stopping = ctx.space.early_stopping
    if trains_in_process(plan):
        return train_in_process(plan, dataset, stopping, ctx.l0_max)
    callbacks = (early_stop_callback(stopping, ctx.l0_max),)
    trainer = make_trainer(plan, dataset, name=trial_id, storage=ctx.storage, num_to_keep=1, callbacks=callbacks)
    return local_checkpoint(fit(trainer).checkpoint)  # downloaded when the storage is remote


def zero_ablation(
    spec: ModelSpec,
    hooks: list[HookPoint],
    contexts: np.ndarray,
    special_ids: list[int],
    threads: int,
    precision: str = "float32",
) -> dict[HookPoint, Baseline]:
    """The SAE-independent part of a trial's evaluation (the held-out contexts' zero-ablated
    losses at each hook, from one clean pass), run once per search as a Ray task so every trial
    skips that forward pass and the search's driver never loads the full model."""
    import torch

    torch.set_num_threads(threads)
    return baselines(eval_model(spec)[0], hooks, contexts, special_ids, precision=precision)


def run_trial(config: dict, ctx: TrialContext | None = None) -> None:
    """The Tune function: train on the shared activations, evaluate, log, report."""
    import torch
    from ray import tune

    space, uri = ctx.space, ctx.plan.tracking.uri
    trial_id = tune.get_context().get_trial_id()
    tags = {mlflow_runs.TRIAL_TAG: trial_id, mlflow_runs.VARIANT_TAG: space.variant}
    plan = trial_plan(ctx, config, run_id="")
    params = {
        **{f"sae.{k}": v for k, v in plan.variant.to_dict().items()},
        "variant": space.variant,
        "total_steps": plan.loop.total_steps,
        "workers": plan.stream.workers,
    }
    # No terminal status is written on failure here: a trial that ASHA stops also raises, and its
    # actor can still run after tuner.fit() returns. The driver closes every unfinished child run
    # from Tune's own view of the trial (driver.close_unfinished).
    run_id = mlflow_runs.open_child_run(
        uri, ctx.plan.tracking.experiment_id, ctx.parent_run_id, f"{space.variant}-{trial_id}", tags, params
    )
    plan = dataclasses.replace(plan, tracking=dataclasses.replace(plan.tracking, run_id=run_id))
    started = time.time()
    checkpoint = train_trial(plan, ctx, trial_id)
    train_seconds = time.time() - started
    torch.set_num_threads(plan.resources.worker_threads)
    sae, _ = load_sae(checkpoint / SAE_DIR)
    model, _ = eval_model(plan.stream.model)
    special = list(plan.stream.special_ids)
    metrics = evaluate_core(
        model, sae, plan.hook, ctx.eval_contexts, special, reference=ctx.eval_reference, precision=plan.stream.precision
    )
    seconds = {"train_seconds": train_seconds, "eval_seconds": time.time() - started - train_seconds}
    report_trial(plan, space, metrics, seconds, checkpoint)


def report_trial(plan: RunPlan, space: TuneSpace, metrics: dict, seconds: dict, checkpoint: Path) -> None:
    """The trial's end: its evaluation and times in its child run (then FINISHED), and the final
    report to Tune, which the driver's rows are built from."""
    from ray import tune

    steps, final = plan.loop.total_steps, mlflow_runs.finite(metrics)
    objective = space.score(metrics) if not space.multi_objective else math.nan
    logged = {**{f"eval/{k}": v for k, v in final.items()}, **seconds, "objective": objective}
    tags = {"saeforge.checkpoint": str(checkpoint), mlflow_runs.STATUS_TAG: "completed"}
    mlflow_runs.finish_run(plan.tracking.uri, plan.tracking.run_id, logged, steps, tags)
    tune.report(
        {
            **final,
            **seconds,
            "objective": objective,
            "feasible": int(space.feasible(metrics)),
            "checkpoint_dir": str(checkpoint),
            "mlflow_run_id": plan.tracking.run_id,
            "step": steps,
            "trial_done": 1,
        }
    )
