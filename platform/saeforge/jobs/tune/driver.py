"""The driver of `saeforge tune`: Ray Tune searches over each variant's tune space, one model pass
for every trial.

Validate everything (`validate.plan_tune`), open the sweep (`sweep.open_sweep`: one model pass;
with several hooks, `--layer 3,6`, it emits every hook's), run one Tuner per variant and hook on
the shared activations (each trial: `trial.run_trial`, on its hook's column), then judge the
trials, log the search to MLflow (a parent run in the hook's experiment, one child run per
trial, the table and the plot) and register the best under the hook's own name.
docs/tuning.md describes the tune-space format, the objective and champion rule, early stopping
and the activation cache.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from saeforge.core.batches import step_budget
from saeforge.core.evaluation import Baseline
from saeforge.core.hooks import HookPoint
from saeforge.core.reporting import pareto_front, plot_l0_vs_ce, write_csv
from saeforge.core.sae_files import SAE_DIR
from saeforge.core.training import LoopSettings
from saeforge.jobs import sweep
from saeforge.jobs.arguments import TuneArgs
from saeforge.jobs.data.activation_cache import SharedActivations
from saeforge.jobs.plan import RunPlan
from saeforge.jobs.runtime.failures import one_line
from saeforge.jobs.runtime.ray_cluster import cores, ray_driver
from saeforge.jobs.runtime.storage import is_uri, storage_path
from saeforge.jobs.tracking import mlflow_runs, registry, store
from saeforge.jobs.tune import search_space
from saeforge.jobs.tune.search_space import TuneSpace
from saeforge.jobs.tune.trial import ES_SCORE, TrialContext, run_trial, trains_in_process, zero_ablation
from saeforge.jobs.validate import plan_tune, variant_config

# The final figures a trial row keeps (NaN unless the trial completed).
ROW_METRICS = (
    "l0",
    "ce_loss_recovered",
    "explained_variance",
    "kl_div_sae",
    "dead_fraction",
    "objective",
    "train_seconds",
    "eval_seconds",
)


@dataclass
class TrialRow:
    """One trial of a search, as Tune saw it end: its status, sampled values and final figures."""

    trial_id: str | None
    run_id: str
    status: str  # completed, early_stopped or failed
    params: dict
    metrics: dict  # ROW_METRICS (NaN unless completed)
    step: int
    train_explained_variance: float  # the last training report's, for a trial that did not complete
    checkpoint_dir: str
    error: str
    feasible: bool = False
    pareto: bool = False

    def as_dict(self) -> dict:
        """The row as the table, the JSON report and the summary show it (sampled values and
        figures as columns)."""
        head = {"trial_id": self.trial_id, "run_id": self.run_id, "status": self.status, **self.params}
        tail = {
            "step": self.step,
            "train_explained_variance": self.train_explained_variance,
            "feasible": self.feasible,
            "checkpoint_dir": self.checkpoint_dir,
            "error": self.error,
            "pareto": self.pareto,
        }
        return {**head, **self.metrics, **tail}


@dataclass
class Search:
    """One variant's search on one hook: its plan, its Tune settings, its MLflow parent run."""

    space: TuneSpace
    plan: RunPlan
    name: str
    report_every: int
    grace: int
    max_t: int
    l0_max: float
    concurrency: tuple[int, int, float]
    params: dict = field(default_factory=dict)


def run_tune(args: TuneArgs, progress=print, verbose: int = 1) -> dict:
    """The whole `saeforge tune`: returns a summary dict (also printed by the CLI)."""
    started = time.time()
    plan, contexts, spaces = plan_tune(args, progress)
    with ray_driver(args.address):
        plan, acts = sweep.open_sweep(plan, contexts, args.activations, progress)
        concurrency = sweep.trial_concurrency(args)
        references = search_references(plan, contexts.eval, progress)
        searches = [
            search_variant(
                prepare_search(args, space, hook_plan(plan, hook), concurrency),
                acts,
                contexts.eval,
                args,
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
        "tracking_uri": store.redact(plan.tracking.uri),
        "experiment_id": plan.tracking.experiment_id,
        "seconds": time.time() - started,
    }


def search_references(plan: RunPlan, eval_contexts, progress=print) -> dict[HookPoint, Baseline]:
    """The held-out contexts' zero-ablated losses at every hook of the plan, computed once (a Ray
    task with every core, one clean pass for all hooks) for every trial of every search: they
    depend on the model, the hook and the text, not on the SAE."""
    import ray

    progress(f"saeforge: zero-ablated losses of the {len(eval_contexts)} held-out contexts, once for every trial...")
    task = ray.remote(num_cpus=1)(zero_ablation)
    hooks, special = list(plan.stream.hooks), list(plan.stream.special_ids)
    return ray.get(task.remote(plan.stream.model, hooks, eval_contexts, special, cores(), plan.stream.precision))


def hook_plan(plan: RunPlan, hook: HookPoint) -> RunPlan:
    """The plan of the searches on one hook of the shared activations: its trials read that hook's
    column, and the search is recorded in the hook's own experiment."""
    one = plan.for_hook(hook)
    name = store.experiment_name(plan.stream.model.short_name, hook.name)
    experiment_id = store.ensure_experiment(name, plan.tracking.uri)
    return dataclasses.replace(one, tracking=dataclasses.replace(one.tracking, experiment_id=experiment_id))


def prepare_search(args: TuneArgs, space: TuneSpace, base: RunPlan, concurrency: tuple[int, int, float]) -> Search:
    """A variant's search: its plan (the space's fixed values, a trial's share of the machine,
    Tune's report cadence), its name and early-stopping schedule."""
    cfg = variant_config(space.variant, base.variant.d_in, base.variant.d_sae, space.fixed)
    plan = sweep.with_trial_share(dataclasses.replace(base, variant_name=space.variant, variant=cfg), concurrency)
    report_every, grace, max_t = cadence(args, space, plan)
    plan = dataclasses.replace(plan, loop=LoopSettings(1, log_every=report_every, report_every=report_every))
    name = f"{args.name or 'tune'}-{space.variant}-{plan.hook.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    search = Search(space, plan, name, report_every, grace, max_t, space.l0_max() or plan.max_l0, concurrency)
    search.params = search_params(args, search)
    return search


def cadence(args: TuneArgs, space: TuneSpace, plan: RunPlan) -> tuple[int, int, int]:
    """(report_every, grace_period, max_t) in training steps, from the smallest batch searched."""
    spec = space.params.get("batch_size")
    batch = int(min(spec["values"]) if "values" in spec else spec["low"]) if spec else plan.variant.batch_size
    steps = step_budget(args.tokens_per_trial, batch, plan.stream.context_size, plan.stream.workers).total_steps
    report_every = args.report_every or max(1, steps // 10)
    grace = args.grace_period or space.early_stopping.grace_period or max(report_every, steps // 4)
    return report_every, grace, max(steps, grace) * 4 + 1  # max_t past any trial's last step: ASHA never cuts the end


def objective_text(space: TuneSpace) -> str:
    if space.multi_objective:
        return "pareto: " + ", ".join(f"{m} {d}" for m, d in zip(space.metrics, space.modes))
    return f"{space.metrics[0]} {space.modes[0]}"


def search_params(args: TuneArgs, search: Search) -> dict:
    """What the search's parent run logs as its params."""
    space, plan = search.space, search.plan
    return {
        "variant": space.variant,
        "space": str(space.path),
        "samples": args.samples,
        "search_alg": args.search_alg,
        "scheduler": args.scheduler,
        "objective": objective_text(space),
        "constraints": "; ".join(map(str, space.constraints)),
        "max_concurrent": search.concurrency[0],
        "tokens_per_trial": args.tokens_per_trial,
        "report_every": search.report_every,
        "grace_period": search.grace,
        "model": args.model,
        "hook": plan.hook.name,
        "d_sae": plan.variant.d_sae,
        "seed": args.seed,
        **{f"fixed.{k}": v for k, v in space.fixed.items()},
    }


def search_variant(
    search: Search,
    acts: SharedActivations,
    eval_contexts,
    args: TuneArgs,
    *,
    progress=print,
    verbose: int = 1,
    eval_reference: Baseline | None = None,
) -> dict:
    """One variant's search: a Tuner over its space on the shared activations, under a parent
    MLflow run; ends by registering the best trial's SAE. `eval_reference`: the zero-ablated
    losses of `eval_contexts` (`search_references`), which every trial's evaluation reuses."""
    import mlflow

    space, plan = search.space, search.plan
    progress(
        f"saeforge: searching {space.variant} ({args.samples} sample(s), {args.search_alg} search, "
        f"{args.scheduler} scheduler, up to {search.concurrency[0]} trial(s) at once, {objective_text(space)}, "
        f"constraints: {', '.join(map(str, space.constraints)) or 'none'})"
    )
    started = time.time()
    tags = {"saeforge.kind": "tune_search", mlflow_runs.VARIANT_TAG: space.variant}
    params = {**search.params, "activations": acts.source}
    with sweep.parent_run(plan, search.name, tags, params, acts) as parent_run_id:
        mlflow.log_artifact(str(space.path), artifact_path="space")
        storage = storage_path(args.storage)  # a local folder made absolute, or a URI as given
        ctx = TrialContext(
            plan,
            space,
            acts.dataset,
            acts.contexts,
            eval_contexts,
            args.tokens_per_trial,
            search.l0_max,
            parent_run_id,
            f"{storage}/{search.name}/trials",
            eval_reference,
        )
        rows = trial_rows(make_tuner(args, search, ctx, storage, verbose).fit(), ctx)
        close_unfinished(rows, plan.tracking.uri)
        summary = search_summary(search, rows, parent_run_id, time.time() - started, storage)
        if summary["best"] is None:
            progress(f"saeforge: {space.variant}: no trial completed; nothing registered")
            return summary
        summary.update(register_best(summary["best"], search))
    return summary


def make_tuner(args: TuneArgs, search: Search, ctx: TrialContext, storage: str, verbose: int):
    """The Tuner of one variant's search: a trial per sample, ASHA or FIFO, Optuna or random."""
    from ray import tune

    in_process = trains_in_process(search.plan)
    n = search.concurrency[0]
    trainable = tune.with_parameters(run_trial, ctx=ctx)
    return tune.Tuner(
        tune.with_resources(trainable, sweep.trial_resources(search.plan, in_process)),
        param_space=search.space.param_space(),
        tune_config=tune.TuneConfig(
            num_samples=args.samples,
            max_concurrent_trials=n,
            search_alg=make_search_alg(args, search.space, n),
            scheduler=make_scheduler(args, search.space, search.grace, search.max_t),
            reuse_actors=True,  # a trial process serves the next trial: no new process, the eval model kept
        ),
        run_config=tune.RunConfig(
            name=search.name,
            storage_path=storage,
            verbose=verbose,
            # a trial training in its own process is restarted by Tune; a TorchTrainer restarts its workers
            failure_config=tune.FailureConfig(max_failures=args.max_failures if in_process else 0),
        ),
    )


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


def trial_rows(grid, ctx: TrialContext) -> list[TrialRow]:
    """One row per trial of Tune's result grid (status, sampled values, final figures), with the
    child run each trial logged to; the completed trials' Pareto set marked."""
    space, tracking = ctx.space, ctx.plan.tracking
    children = {
        r.data.tags.get(mlflow_runs.TRIAL_TAG): r.info.run_id
        for r in mlflow_runs.child_runs(tracking.uri, tracking.experiment_id, ctx.parent_run_id)
    }
    rows = []
    for result in grid:
        m = result.metrics or {}
        trial_id = _trial_id(result, [k for k in children if k])
        status = "failed" if result.error else "completed" if m.get("trial_done") else "early_stopped"
        done = status == "completed"
        row = TrialRow(
            trial_id=trial_id,
            run_id=children.get(trial_id, ""),
            status=status,
            params={k: (result.config or {}).get(k) for k in space.params},
            metrics={k: float(m[k]) if done and k in m else math.nan for k in ROW_METRICS},
            step=m.get("step", 0),
            train_explained_variance=math.nan if done else m.get("explained_variance", math.nan),
            checkpoint_dir=m.get("checkpoint_dir", ""),
            error=one_line(result.error) if result.error else "",
        )
        row.feasible = done and space.feasible(row.metrics)
        rows.append(row)
    done = [r for r in rows if r.status == "completed"]
    for j in pareto_front([(r.metrics["l0"], r.metrics["ce_loss_recovered"]) for r in done]):
        done[j].pareto = True
    return rows


def close_unfinished(rows: list[TrialRow], uri: str) -> None:
    """The child runs of trials that failed or were stopped early end FAILED or KILLED, tagged
    with their status (and the step they stopped at, or their error)."""
    for row in rows:
        if not row.run_id or row.status == "completed":
            continue
        tags = {mlflow_runs.STATUS_TAG: row.status}
        if row.status == "early_stopped":
            tags["saeforge.stopped_at_step"] = str(row.step)
        if row.error:
            tags["saeforge.error"] = row.error[:4000]
        mlflow_runs.close_run(uri, row.run_id, "KILLED" if row.status == "early_stopped" else "FAILED", tags)


def search_summary(search: Search, rows: list[TrialRow], parent_run_id: str, seconds: float, storage: str) -> dict:
    """The search's summary; its table, JSON rows and plot written beside the trials (or in a
    temporary folder for remote storage) and logged to the parent run."""
    import mlflow

    table = [r.as_dict() for r in rows]
    best = search_space.best_trial(table, search.space)
    out = Path(tempfile.mkdtemp(prefix=f"{search.name}-")) if is_uri(storage) else Path(storage) / search.name
    out.mkdir(parents=True, exist_ok=True)
    csv, plot = write_csv(table, out / "trials.csv"), search_plot(search, table, best, out)
    pareto = [r["trial_id"] for r in table if r["pareto"]]
    mlflow.log_artifact(str(csv), artifact_path="search")
    mlflow.log_artifact(str(plot), artifact_path="search")
    mlflow.log_dict({"rows": table, "best_trial": best and best["trial_id"], "pareto": pareto}, "search/trials.json")
    counts = {s: sum(r.status == s for r in rows) for s in ("completed", "early_stopped", "failed")}
    mlflow.log_metrics({**{f"trials_{k}": v for k, v in counts.items()}, "search_seconds": seconds})
    return {
        "variant": search.space.variant,
        "hook": search.plan.hook.name,
        "parent_run_id": parent_run_id,
        "search_name": search.name,
        "params": list(search.space.params),
        "trials": len(rows),
        **{f"trials_{k}": v for k, v in counts.items()},
        "rows": table,
        "best": best,
        "pareto": pareto,
        "seconds": seconds,
        "table": str(csv),
        "plot": str(plot),
        "registered_model": None,
        "version": None,
        "champion": False,
        "champion_reason": "no trial completed",
    }


def search_plot(search: Search, table: list[dict], best: dict | None, out: Path) -> Path:
    """L0 against CE loss recovered of the completed trials, the best one marked."""
    points = [
        {
            "variant": search.space.variant,
            "l0": r["l0"],
            "ce_loss_recovered": r["ce_loss_recovered"],
            "label": r["trial_id"],
            "best": best is not None and r is best,
        }
        for r in table
        if r["status"] == "completed"
    ]
    title = f"{search.space.variant} search on {search.plan.hook.name} ({len(table)} trials)"
    return plot_l0_vs_ce(points, out / "l0_vs_ce_loss_recovered.png", title=title, l0_max=search.l0_max)


def register_best(best: dict, search: Search) -> dict:
    """Register the search's best trial (its SAE, logged once in its child run); it becomes
    champion only when it met every constraint and beats the current champion."""
    import mlflow

    space, plan = search.space, search.plan
    figures = {f"best/{k}": best[k] for k in ("l0", "ce_loss_recovered", "explained_variance")}
    mlflow.log_metrics({**mlflow_runs.finite(figures), "best/feasible": int(best["feasible"])})
    mlflow.set_tag("saeforge.best_run_id", best["run_id"])
    name = registry.registered_model_name(plan.stream.model.short_name, plan.hook.name, space.variant)
    version = registry.log_and_register(Path(best["checkpoint_dir"]) / SAE_DIR, name, run_id=best["run_id"])
    if best["feasible"]:
        moved, reason = registry.promote_if_better(name, version, best, search.l0_max)
    else:
        registry.tag_version(name, version, best)  # for the record, but not a champion candidate
        missed = [str(c) for c in space.constraints if c.violation(best) > 0]
        moved, reason = False, f"no trial met the constraints ({', '.join(missed)}); this is the closest"
    return {"registered_model": name, "version": version, "champion": moved, "champion_reason": reason}
