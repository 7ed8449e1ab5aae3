"""The driver of `saeforge tune`: Ray Tune searches over each variant's tune space, one model pass
for every trial.

Validate everything (the shared `validate.plan_train`, the spaces), produce the activations once
(`shared_activations`; with several hooks, `--layer 3,6`, one model pass emits every hook's), run
one Tuner per variant and hook on them (each trial: `trial.run_trial`, on its hook's column), then
judge the trials, log the search to MLflow (a parent run in the hook's experiment, one child run
per trial, the table and the plot) and register the best under the hook's own name.
docs/tuning.md describes the tune-space format, the objective
and champion rule, early stopping and the activation cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import tempfile
import time
from pathlib import Path

import variants
from saeforge.core.batches import step_budget
from saeforge.core.evaluation import Baseline
from saeforge.core.hooks import HookPoint
from saeforge.core.reporting import pareto_front, plot_l0_vs_ce, write_csv
from saeforge.core.training import LoopSettings
from saeforge.errors import UserError
from saeforge.jobs.arguments import ClusterArgs, SaeSizeArgs, SourceArgs, TrainArgs, TuneArgs, check_ranges
from saeforge.jobs.data.activation_cache import SharedActivations, check_cache, shared_activations
from saeforge.jobs.plan import RunPlan, TrackingTarget
from saeforge.jobs.runtime.failures import one_line
from saeforge.jobs.runtime.ray_cluster import connect_ray, cores, plan_resources, sigterm_interrupts
from saeforge.jobs.runtime.storage import is_uri, storage_path
from saeforge.jobs.tracking import mlflow_runs, registry, store
from saeforge.jobs.tune import search_space
from saeforge.jobs.tune.search_space import TuneSpace
from saeforge.jobs.tune.trial import ES_SCORE, TrialContext, run_trial, trains_in_process, zero_ablation
from saeforge.jobs.validate import plan_train, variant_config

TRIAL_CPU = 0.1  # a TorchTrainer trial's own driver: it mostly waits on its workers ({"cpu": 0} is refused)


def variant_names(text: str) -> list[str]:
    """--variant: NAME, a comma-separated list, or all (derived from the registry)."""
    if text.strip() == "all":
        return variants.names()
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UserError("--variant: expected a variant name, a comma-separated list or 'all'")
    for name in names:
        if name not in variants.names():
            raise UserError(str(variants.UnknownVariant(name)))
    return list(dict.fromkeys(names))


def load_spaces(args: TuneArgs) -> list[TuneSpace]:
    names = variant_names(args.variant)
    if args.space and len(names) > 1:
        raise UserError("--space: expected one variant with a space file (a list or 'all' uses tune_spaces/NAME.yaml)")
    spaces = []
    for name in names:
        path = Path(args.space) if args.space else search_space.default_space_path(name)
        if not path.is_file():
            raise UserError(f"{path}: no tune space for variant '{name}' (pass --space FILE)")
        space = search_space.load(path, name)
        if args.objective == "pareto":
            space = space.as_pareto()
        elif args.objective == "single":
            space = space.as_single()
        if args.search_alg == "optuna" and space.has_grid:
            field_name = next(k for k, v in space.params.items() if v["sampler"] == "grid")
            raise UserError(
                f"{path}: params.{field_name}.sampler: expected a sampler Optuna can draw from "
                "(choice, uniform, loguniform, randint); grid needs --search-alg random"
            )
        spaces.append(space)
    return spaces


def trial_concurrency(args: TuneArgs) -> tuple[int, int, float]:
    """(max concurrent trials, torch threads per train worker, GPUs per worker) from the cluster's
    resources. A local Ray declares more logical CPUs than the machine has cores (NOTES-APIS.md):
    there the cores decide."""
    import ray

    resources = ray.cluster_resources()
    logical = resources.get("CPU", 1.0)
    alive = [n for n in ray.nodes() if n.get("Alive")]
    physical = min(logical, cores()) if len(alive) <= 1 else logical
    n = max(1, min(int(physical // args.workers), int(logical // (args.workers + TRIAL_CPU))))
    gpus = resources.get("GPU", 0.0)
    if gpus:  # a whole GPU per train worker where there are enough, else one trial sharing them
        n = min(n, max(1, int(gpus // args.workers)))
    if args.max_concurrent:
        n = args.max_concurrent
    threads = max(1, int(physical // (n * args.workers)))
    gpu_per_worker = (1.0 if gpus >= n * args.workers else gpus / (n * args.workers)) if gpus else 0.0
    return n, threads, gpu_per_worker


def trial_resources(plan: RunPlan) -> dict:
    """What one trial asks Tune for: a trial that trains in its own process asks for a train
    worker's resources; one that fits a TorchTrainer only for its driver (the workers ask for
    their own)."""
    if not trains_in_process(plan):
        return {"cpu": TRIAL_CPU}
    res = plan.resources
    return {"cpu": 1, **({"gpu": res.gpus_per_worker} if res.gpus_per_worker > 0 else {}), **res.worker_resources}


def cadence(args: TuneArgs, space: TuneSpace, plan: RunPlan) -> tuple[int, int, int]:
    """(report_every, grace_period, max_t) in training steps, from the smallest batch searched."""
    spec = space.params.get("batch_size")
    batch = int(min(spec["values"]) if "values" in spec else spec["low"]) if spec else plan.variant.batch_size
    steps = step_budget(args.tokens_per_trial, batch, plan.stream.context_size, plan.stream.workers).total_steps
    report_every = args.report_every or max(1, steps // 10)
    grace = args.grace_period or space.early_stopping.grace_period or max(report_every, steps // 4)
    return report_every, grace, max(steps, grace) * 4 + 1  # max_t past any trial's last step: ASHA never cuts the end


def make_scheduler(args: TuneArgs, space: TuneSpace, grace: int, max_t: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if args.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="step",
        metric=ES_SCORE,
        mode=space.early_stopping.mode,
        grace_period=grace,
        max_t=max_t,
        reduction_factor=space.early_stopping.reduction_factor,
    )


def make_search_alg(args: TuneArgs, space: TuneSpace, max_concurrent: int):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if args.search_alg == "random":  # Tune applies max_concurrent_trials only to the default generator
        return BasicVariantGenerator(random_state=args.seed, max_concurrent=max_concurrent)
    from ray.tune.search.optuna import OptunaSearch

    class FinalResultOptuna(OptunaSearch):
        """Optuna learns from a trial's final report only (the objective exists only after
        evaluation); a trial stopped early counts as pruned."""

        def on_trial_result(self, trial_id, result):
            return

        def on_trial_complete(self, trial_id, result=None, error=False):
            names = self.metric if isinstance(self.metric, list) else [self.metric]
            if result and not all(math.isfinite(result.get(m, math.nan)) for m in names):
                result = None
            super().on_trial_complete(trial_id, result, error)

    if space.multi_objective:
        return FinalResultOptuna(metric=list(space.metrics), mode=list(space.modes), seed=args.seed)
    return FinalResultOptuna(metric="objective", mode=space.modes[0], seed=args.seed)


def _trial_id(result, known: list[str]) -> str | None:
    """The trial's id: from its last report, else (a trial that died before reporting) from its
    folder's name, which Tune builds from the id."""
    if result.metrics and result.metrics.get("trial_id"):
        return result.metrics["trial_id"]
    name = Path(result.path).name if result.path else ""
    return next((trial_id for trial_id in known if f"_{trial_id}_" in name), None)


def trial_rows(grid, space: TuneSpace, ctx: TrialContext) -> list[dict]:
    """One row per trial (status, sampled values, final metrics); child runs of trials that were
    stopped early or died are closed with their status."""
    uri = ctx.plan.tracking.uri
    children = {
        r.data.tags.get(mlflow_runs.TRIAL_TAG): r
        for r in mlflow_runs.child_runs(uri, ctx.plan.tracking.experiment_id, ctx.parent_run_id)
    }
    rows = []
    for result in grid:
        m = result.metrics or {}
        trial_id = _trial_id(result, [k for k in children if k])
        run = children.get(trial_id)
        status = "failed" if result.error else "completed" if m.get("trial_done") else "early_stopped"
        row = {
            "trial_id": trial_id,
            "run_id": run.info.run_id if run else "",
            "status": status,
            **{k: (result.config or {}).get(k) for k in space.params},
        }
        for key in (
            "l0",
            "ce_loss_recovered",
            "explained_variance",
            "kl_div_sae",
            "dead_fraction",
            "objective",
            "train_seconds",
            "eval_seconds",
        ):
            row[key] = float(m[key]) if status == "completed" and key in m else math.nan
        row["step"] = m.get("step", 0)
        row["train_explained_variance"] = m.get("explained_variance", math.nan) if status != "completed" else math.nan
        row["feasible"] = status == "completed" and space.feasible(row)
        row["checkpoint_dir"] = m.get("checkpoint_dir", "")
        row["error"] = one_line(result.error) if result.error else ""
        rows.append(row)
        if run is not None and status != "completed":  # failed and stopped trials are closed here
            tags = {mlflow_runs.STATUS_TAG: status}
            if status == "early_stopped":
                tags["saeforge.stopped_at_step"] = str(row["step"])
            if row["error"]:
                tags["saeforge.error"] = row["error"][:4000]
            mlflow_runs.close_run(uri, run.info.run_id, "KILLED" if status == "early_stopped" else "FAILED", tags)
    done = [i for i, r in enumerate(rows) if r["status"] == "completed"]
    front = {done[j] for j in pareto_front([(rows[i]["l0"], rows[i]["ce_loss_recovered"]) for i in done])}
    for i, r in enumerate(rows):
        r["pareto"] = i in front
    return rows


@contextlib.contextmanager
def killed_on_interrupt(uri: str, experiment_id: str, parent_run_id: str):
    """Ctrl-C or SIGTERM (see `sigterm_interrupts`) inside: the search's MLflow run and its
    trials' unfinished runs end KILLED, not FAILED (mlflow.start_run's own exit) or RUNNING."""
    import mlflow

    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        for child in mlflow_runs.child_runs(uri, experiment_id, parent_run_id):
            if child.info.status == "RUNNING":
                mlflow_runs.close_run(uri, child.info.run_id, "KILLED", {mlflow_runs.STATUS_TAG: "interrupted"})
        mlflow.end_run("KILLED")
        raise


def register_best(best: dict, space: TuneSpace, plan: RunPlan, l0_max: float) -> tuple[str, int, bool, str]:
    """Register the search's best trial (its SAE, logged once in its child run); it becomes
    champion only when it met every constraint and beats the current champion."""
    from saeforge.core.sae_files import SAE_DIR

    name = registry.registered_model_name(plan.stream.model.short_name, plan.hook.name, space.variant)
    version = registry.log_and_register(Path(best["checkpoint_dir"]) / SAE_DIR, name, run_id=best["run_id"])
    if best["feasible"]:
        return (name, version, *registry.promote_if_better(name, version, best, l0_max))
    registry.tag_version(name, version, best)  # for the record, but not a champion candidate
    missed = [str(c) for c in space.constraints if c.violation(best) > 0]
    return name, version, False, f"no trial met the constraints ({', '.join(missed)}); this is the closest"


def search_variant(
    space: TuneSpace,
    base: RunPlan,
    acts: SharedActivations,
    eval_contexts,
    args: TuneArgs,
    *,
    concurrency: tuple[int, int, float],
    progress=print,
    verbose: int = 1,
    eval_reference: Baseline | None = None,
) -> dict:
    """One variant's search: a Tuner over its space on the shared activations, under a parent
    MLflow run; ends by registering the best trial's SAE. `eval_reference`: the zero-ablated
    losses of `eval_contexts` (`search_reference`), which every trial's evaluation reuses."""
    import mlflow
    from ray import tune

    n, threads, gpu_per_worker = concurrency
    cfg = variant_config(space.variant, base.variant.d_in, base.variant.d_sae, space.fixed)
    plan = dataclasses.replace(
        base,
        variant_name=space.variant,
        variant=cfg,
        resources=dataclasses.replace(base.resources, worker_threads=threads, gpus_per_worker=gpu_per_worker),
    )
    report_every, grace, max_t = cadence(args, space, plan)
    plan = dataclasses.replace(plan, loop=LoopSettings(1, log_every=report_every, report_every=report_every))
    l0_max = space.l0_max() or plan.max_l0
    search_name = f"{args.name or 'tune'}-{space.variant}-{plan.hook.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = storage_path(args.storage)  # a local folder made absolute, or a URI as given
    objective = (
        "pareto: " + ", ".join(f"{m} {d}" for m, d in zip(space.metrics, space.modes))
        if space.multi_objective
        else f"{space.metrics[0]} {space.modes[0]}"
    )
    progress(
        f"saeforge: searching {space.variant} ({args.samples} sample(s), {args.search_alg} search, "
        f"{args.scheduler} scheduler, up to {n} trial(s) at once, {objective}, constraints: "
        f"{', '.join(map(str, space.constraints)) or 'none'})"
    )
    started = time.time()
    with (
        mlflow.start_run(
            experiment_id=plan.tracking.experiment_id,
            run_name=search_name,
            tags={"saeforge.kind": "tune_search", mlflow_runs.VARIANT_TAG: space.variant},
        ) as parent,
        killed_on_interrupt(plan.tracking.uri, plan.tracking.experiment_id, parent.info.run_id),
    ):
        mlflow.log_params(
            {
                "variant": space.variant,
                "space": str(space.path),
                "samples": args.samples,
                "search_alg": args.search_alg,
                "scheduler": args.scheduler,
                "objective": objective,
                "constraints": "; ".join(map(str, space.constraints)),
                "max_concurrent": n,
                "tokens_per_trial": args.tokens_per_trial,
                "report_every": report_every,
                "grace_period": grace,
                "model": args.model,
                "hook": plan.hook.name,
                "d_sae": plan.variant.d_sae,
                "seed": args.seed,
                "activations": acts.source,
                **{f"fixed.{k}": v for k, v in space.fixed.items()},
            }
        )
        mlflow.log_metrics(acts.log_dict())
        mlflow.log_artifact(str(space.path), artifact_path="space")
        ctx = TrialContext(
            plan,
            space,
            acts.dataset,
            acts.contexts,
            eval_contexts,
            args.tokens_per_trial,
            l0_max,
            parent.info.run_id,
            f"{storage}/{search_name}/trials",
            eval_reference,
        )
        in_process = trains_in_process(plan)
        trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), trial_resources(plan))
        tuner = tune.Tuner(
            trainable,
            param_space=space.param_space(),
            tune_config=tune.TuneConfig(
                num_samples=args.samples,
                max_concurrent_trials=n,
                search_alg=make_search_alg(args, space, n),
                scheduler=make_scheduler(args, space, grace, max_t),
            ),
            run_config=tune.RunConfig(
                name=search_name,
                storage_path=storage,
                verbose=verbose,
                # a trial training in its own process is restarted by Tune; a TorchTrainer restarts its workers
                failure_config=tune.FailureConfig(max_failures=args.max_failures if in_process else 0),
            ),
        )
        rows = trial_rows(tuner.fit(), space, ctx)
        seconds = time.time() - started
        best = search_space.best_trial(rows, space)
        # the report files, also logged to MLflow: beside the trials, or in a temporary folder for remote storage
        out_dir = Path(tempfile.mkdtemp(prefix=f"{search_name}-")) if is_uri(storage) else Path(storage) / search_name
        out_dir.mkdir(parents=True, exist_ok=True)
        table = write_csv(rows, out_dir / "trials.csv")
        mlflow.log_artifact(str(table), artifact_path="search")
        mlflow.log_dict(
            {
                "rows": rows,
                "best_trial": best and best["trial_id"],
                "pareto": [r["trial_id"] for r in rows if r["pareto"]],
            },
            "search/trials.json",
        )
        points = [
            {
                "variant": space.variant,
                "l0": r["l0"],
                "ce_loss_recovered": r["ce_loss_recovered"],
                "label": r["trial_id"],
                "best": best is not None and r is best,
            }
            for r in rows
            if r["status"] == "completed"
        ]
        plot = plot_l0_vs_ce(
            points,
            out_dir / "l0_vs_ce_loss_recovered.png",
            title=f"{space.variant} search on {plan.hook.name} ({len(rows)} trials)",
            l0_max=l0_max,
        )
        mlflow.log_artifact(str(plot), artifact_path="search")
        counts = {s: sum(r["status"] == s for r in rows) for s in ("completed", "early_stopped", "failed")}
        mlflow.log_metrics({**{f"trials_{k}": v for k, v in counts.items()}, "search_seconds": seconds})
        summary = {
            "variant": space.variant,
            "hook": plan.hook.name,
            "parent_run_id": parent.info.run_id,
            "search_name": search_name,
            "params": list(space.params),
            "trials": len(rows),
            **{f"trials_{k}": v for k, v in counts.items()},
            "rows": rows,
            "best": best,
            "pareto": [r["trial_id"] for r in rows if r["pareto"]],
            "seconds": seconds,
            "table": str(table),
            "plot": str(plot),
            "registered_model": None,
            "version": None,
            "champion": False,
            "champion_reason": "no trial completed",
        }
        if best is None:
            progress(f"saeforge: {space.variant}: no trial completed; nothing registered")
            return summary
        mlflow.log_metrics(
            {
                **{
                    f"best/{k}": best[k]
                    for k in ("l0", "ce_loss_recovered", "explained_variance")
                    if math.isfinite(best[k])
                },
                "best/feasible": int(best["feasible"]),
            }
        )
        mlflow.set_tag("saeforge.best_run_id", best["run_id"])
        name, version, moved, reason = register_best(best, space, plan, l0_max)
        summary.update(registered_model=name, version=version, champion=moved, champion_reason=reason)
    return summary


def shared_train_args(args: TuneArgs, space: TuneSpace) -> TrainArgs:
    """The search's arguments as a training run's: the groups the two verbs share, the first
    space's variant and fixed values, and a trial's token budget."""
    shared = {
        f.name: getattr(args, f.name) for cls in (SourceArgs, ClusterArgs, SaeSizeArgs) for f in dataclasses.fields(cls)
    }
    return TrainArgs(**shared, variant=space.variant, overrides=dict(space.fixed), tokens=args.tokens_per_trial)


def search_references(plan: RunPlan, eval_contexts, progress=print) -> dict[HookPoint, Baseline]:
    """The held-out contexts' zero-ablated losses at every hook of the plan, computed once (a Ray
    task with every core, one clean pass for all hooks) for every trial of every search: they
    depend on the model, the hook and the text, not on the SAE."""
    import ray

    progress(f"saeforge: zero-ablated losses of the {len(eval_contexts)} held-out contexts, once for every trial...")
    task = ray.remote(num_cpus=1)(zero_ablation)
    hooks = list(plan.stream.hooks)
    special = list(plan.stream.special_ids)
    return ray.get(task.remote(plan.stream.model, hooks, eval_contexts, special, cores(), plan.stream.precision))


def open_search(plan: RunPlan, contexts, args, progress=print) -> tuple[RunPlan, SharedActivations]:
    """What every search-like driver (tune, study) does once its inputs are valid: check the
    activation cache, open the MLflow store and experiment, connect Ray, produce the shared
    activations. `args` has `activations`, `address` and `producers`. Returns the plan with its
    resources and tracking target, and the activations."""
    if args.activations:
        check_cache(args.activations, plan)
    uri = store.use_store()
    experiment_id = store.ensure_experiment(store.experiment_name(plan.stream.model.short_name, plan.hook.name), uri)
    connect_ray(args.address)
    # Trials report their metrics only at their end (tune: the early-stopping score only while
    # they train): Tune must not insist on every metric in every report.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # Ctrl-C raises KeyboardInterrupt, as in `saeforge train`: Tune's own handler would end the
    # search quietly and register its best trial so far as if it had finished.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    resources = plan_resources(plan, concurrent=False, workers=1)
    plan = dataclasses.replace(plan, resources=resources, tracking=TrackingTarget(uri, experiment_id))
    return plan, shared_activations(plan, contexts, args.activations, progress)


def hook_plan(plan: RunPlan, hook: HookPoint) -> RunPlan:
    """The plan of the searches on one hook of the shared activations: its trials read that hook's
    column, and the search is recorded in the hook's own experiment."""
    one = plan.for_hook(hook)
    name = store.experiment_name(plan.stream.model.short_name, hook.name)
    experiment_id = store.ensure_experiment(name, plan.tracking.uri)
    return dataclasses.replace(one, tracking=dataclasses.replace(one.tracking, experiment_id=experiment_id))


def run_tune(args: TuneArgs, progress=print, verbose: int = 1) -> dict:
    """The whole `saeforge tune`: returns a summary dict (also printed by the CLI)."""
    started = time.time()
    check_ranges(args)
    spaces = load_spaces(args)
    plan, contexts = plan_train(shared_train_args(args, spaces[0]), progress)
    for space in spaces:
        search_space.check_builds(space, plan.variant.d_in, plan.variant.d_sae)
    connect_ray(args.address)  # before the SIGTERM handler: ray.init sets one of its own
    with sigterm_interrupts():
        plan, acts = open_search(plan, contexts, args, progress)
        uri, experiment_id = plan.tracking.uri, plan.tracking.experiment_id
        concurrency = trial_concurrency(args)
        references = search_references(plan, contexts.eval, progress)
        searches = [
            search_variant(
                space,
                hook_plan(plan, hook),
                acts,
                contexts.eval,
                args,
                concurrency=concurrency,
                progress=progress,
                verbose=verbose,
                eval_reference=references[hook],
            )
            for hook in plan.stream.hooks
            for space in spaces
        ]
    return {
        "searches": searches,
        "activations": acts.summary(),
        "max_concurrent": concurrency[0],
        "tracking_uri": store.redact(uri),
        "experiment_id": experiment_id,
        "seconds": time.time() - started,
    }
