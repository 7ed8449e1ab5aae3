"""`saeforge tune`: Ray Tune searches over a variant's tune space, one model pass for all trials.

Three levels, kept apart as in Ray's Train V2 examples:
- `run_tune`, the search driver: validate everything, produce the activations once (or read an
  activation cache), run one Tuner per variant on them, then judge the trials, log the search to
  MLflow (a parent run, one child run per trial, the table and the plot) and register the best.
- `run_trial`, the Tune function (one per trial): builds a TorchTrainer on the shared dataset and
  fits it (its workers run `train_workers.worker_loop`, which reports every `report_every` steps
  for early stopping), then evaluates the final SAE with the full model and reports the objective.
- `add_tune_parser` / `cmd_tune`: the command line.

docs/tuning.md describes the tune-space format, the objective and champion rule, early stopping
and the activation cache.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import variants
from saeforge import corpus, tracking, tune_space
from saeforge.activations import MASK_COLUMN, ActivationProducer, ProducerSpec, activation_dataset
from saeforge.errors import UserError

SCHEDULERS = ("asha", "fifo")
SEARCH_ALGS = ("optuna", "random")
OBJECTIVES = ("space", "single", "pareto")
ES_SCORE = "early_stop_score"  # the intermediate metric ASHA reads
TRIAL_TAG = "saeforge.trial_id"
STATUS_TAG = "saeforge.status"
COUNTER_NAME = "saeforge-model-forward-counter"
CACHE_MANIFEST = "manifest.json"
TRIAL_CPU = 0.1  # the trial's own driver: it mostly waits on its TorchTrainer ({"cpu": 0} is refused)


@dataclass
class TuneArgs:
    """Everything `saeforge tune` accepts (the CLI's flags map one to one)."""

    variant: str = "relu"  # NAME, NAME,NAME or all
    space: str = ""  # default tune_spaces/<variant>.yaml
    samples: int = 8
    max_concurrent: int = 0  # 0: from the cluster's resources
    scheduler: str = "asha"
    search_alg: str = "optuna"
    objective: str = "space"  # space | single (CE loss recovered) | pareto (L0 min, CE loss recovered max)
    tokens_per_trial: int = 100_000
    activations: str = ""  # activation cache folder (written if absent, reused if present)
    model: str = "gemma-3-270m"
    hook: str = "6"
    d_sae: int = 0
    dataset: str = corpus.BUILTIN
    text_column: str = "text"
    context_size: int = 128
    producers: int = 1
    workers: int = 1  # Ray Train workers per trial
    eval_contexts: int = 16
    report_every: int = 0  # steps between intermediate reports (0: about ten per trial)
    grace_period: int = 0  # steps before ASHA may stop a trial (0: the space's, else a quarter of a trial)
    max_l0: float = 0.0  # champion L0 bound when the space sets none (0: d_in / 2)
    seed: int = 0
    storage: str = "saeforge_runs"
    name: str = ""
    address: str = ""


# -- the one model pass ----------------------------------------------------------------------------

def _counter():
    """A named actor counting producer batches and contexts (the proof of one model pass)."""
    import ray

    @ray.remote(num_cpus=0)
    class ForwardCounter:
        def __init__(self):
            self.batches = self.contexts = 0

        def add(self, contexts: int) -> None:
            self.batches += 1
            self.contexts += contexts

        def read(self) -> tuple[int, int]:
            return self.batches, self.contexts

    return ForwardCounter.options(name=COUNTER_NAME, get_if_exists=True).remote()


class CountingProducer(ActivationProducer):
    """An ActivationProducer that also counts each model forward in the named counter actor."""

    def __init__(self, spec: ProducerSpec):
        import ray

        super().__init__(spec)
        self.counter = ray.get_actor(COUNTER_NAME)

    def __call__(self, batch):
        import ray

        out = super().__call__(batch)
        ray.get(self.counter.add.remote(len(batch["input_ids"])))
        return out


def _token_rows(batch: dict, column: str) -> dict:
    """Context batches -> the token rows of real tokens (what a "tokens" producer emits)."""
    return {column: batch[column][batch[MASK_COLUMN].astype(bool)]}


@dataclass
class SharedActivations:
    """The materialised activations every trial reads, per batch layout, and what making them cost."""

    datasets: dict[str, Any]
    tokens: int  # real-token rows
    contexts: int
    source: str  # "model" or "cache:PATH"
    producer_batches: int  # model forwards in this search (0 when read from a cache)
    contexts_forwarded: int
    seconds: float

    def log_dict(self) -> dict[str, float]:
        return {"activations/tokens": self.tokens, "activations/contexts": self.contexts,
                "activations/producer_batches": self.producer_batches,
                "activations/contexts_forwarded": self.contexts_forwarded, "activations/seconds": self.seconds}


def _cache_identity(plan) -> dict:
    return {"model": plan.args.model, "hook": plan.hook.name, "context_size": plan.args.context_size,
            "dataset": plan.args.dataset}


def check_cache(path: str, plan, layout: str) -> dict | None:
    """The manifest of a usable activation cache at `path`, None when there is none yet;
    UserError when it holds something else."""
    folder = Path(path).expanduser()
    manifest = folder / CACHE_MANIFEST
    if not manifest.is_file():
        if folder.exists() and any(folder.iterdir()):
            raise UserError(f"--activations {path}: the folder exists but holds no complete activation cache "
                            f"(no {CACHE_MANIFEST}); delete it or choose another path")
        return None
    try:
        info = json.loads(manifest.read_text())
    except (OSError, ValueError):
        raise UserError(f"--activations {path}: {CACHE_MANIFEST} is not readable JSON") from None
    for key, value in _cache_identity(plan).items():
        if info.get(key) != value:
            raise UserError(f"--activations {path}: the cache holds {key} {info.get(key)!r}, this search needs "
                            f"{value!r}; choose another path")
    if layout == "contexts" and info.get("layout") != "contexts":
        raise UserError(f"--activations {path}: the cache holds token rows, but a variant searched needs whole "
                        "contexts; choose another path")
    return info


def shared_activations(plan, layouts: set[str], args: TuneArgs, progress=print) -> SharedActivations:
    """Produce the activations once (Ray Data producers -> materialize() in the object store), or
    read the activation cache; with --activations and no cache yet, write one."""
    import ray
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    column = plan.hook.name
    layout = "contexts" if "contexts" in layouts else "tokens"
    started = time.time()
    cached = check_cache(args.activations, plan, layout) if args.activations else None
    batches = contexts_forwarded = 0
    if cached is not None:
        layout = cached["layout"]
        progress(f"saeforge: reading the activation cache {args.activations} ({cached['tokens']:,} tokens); "
                 "the model does not run")
        produced = ray.data.read_parquet(str(Path(args.activations).expanduser().resolve() / layout)).materialize()
        n_contexts, source = int(cached["contexts"]), f"cache:{args.activations}"
    else:
        progress(f"saeforge: one model pass over {len(plan.train_contexts)} contexts for every trial "
                 f"({args.producers} producer(s))...")
        counter = _counter()
        before = ray.get(counter.read.remote())
        gpus = ray.cluster_resources().get("GPU", 0)
        spec = ProducerSpec(plan.spec, (plan.hook,), tuple(plan.special_ids), layout,
                            threads=max(1, (os.cpu_count() or 1) // args.producers))
        produced = activation_dataset(plan.train_contexts, spec, producers=args.producers,
                                      gpus_per_producer=min(1.0, gpus / args.producers) if gpus else 0.0,
                                      producer=CountingProducer).materialize()
        after = ray.get(counter.read.remote())
        batches, contexts_forwarded = after[0] - before[0], after[1] - before[1]
        n_contexts, source = len(plan.train_contexts), "model"
    datasets = {layout: produced}
    if "tokens" in layouts and layout == "contexts":
        datasets["tokens"] = produced.map_batches(_token_rows, fn_kwargs={"column": column},
                                                  batch_format="numpy").materialize()
    tokens = datasets["tokens"].count() if "tokens" in datasets else int(
        sum(int(b[MASK_COLUMN].sum()) for b in produced.iter_batches(batch_size=256, batch_format="numpy")))
    if args.activations and cached is None:
        folder = Path(args.activations).expanduser().resolve()
        produced.write_parquet(str(folder / layout))
        info = {**_cache_identity(plan), "layout": layout, "tokens": tokens, "contexts": n_contexts,
                "written": time.strftime("%Y-%m-%d %H:%M:%S")}
        (folder / CACHE_MANIFEST).write_text(json.dumps(info, indent=2))  # last: marks the cache complete
        progress(f"saeforge: activation cache written to {folder}")
    seconds = time.time() - started
    progress(f"saeforge: {tokens:,} activation tokens ready in {seconds:.0f}s "
             f"({batches} producer batches, {contexts_forwarded} contexts forwarded)")
    return SharedActivations(datasets, tokens, n_contexts, source, batches, contexts_forwarded, seconds)


# -- one trial ---------------------------------------------------------------------------------------

@dataclass
class TrialContext:
    """What every trial of one variant's search shares (sent once through tune.with_parameters)."""

    plan: Any  # train_job.Plan for this variant (its variant_cfg holds the fixed values)
    space: tune_space.TuneSpace
    dataset: Any  # the materialised activations in this variant's batch layout
    available_tokens: int
    available_contexts: int
    tokens_per_trial: int
    report_every: int
    l0_max: float
    uri: str
    experiment_id: str
    parent_run_id: str
    storage: str
    threads: int
    gpu_per_worker: float


def trial_budget(ctx: TrialContext, cfg) -> tuple[int, int]:
    """(total steps, batch rows) of one trial, by the same rule as train_job.plan_run."""
    args = ctx.plan.args
    if ctx.plan.variant_cls.batch_layout == "tokens":
        return max(1, min(ctx.tokens_per_trial, ctx.available_tokens) // cfg.batch_size), cfg.batch_size
    budget = ctx.available_contexts * (args.context_size - 1)
    return max(1, budget // cfg.batch_size), max(args.workers, cfg.batch_size // args.context_size)


def _early_stop_callback(stopping: tune_space.EarlyStopping, l0_max: float):
    from ray.tune.integration.ray_train import TuneReportCallback

    class EarlyStopScore(TuneReportCallback):
        """Forwards Ray Train reports to Tune, adding the score ASHA compares: the early-stopping
        metric, worsened by how far the training L0 is above the search's L0 bound."""

        def after_report(self, run_context, metrics, checkpoint):
            first = dict(metrics[0])
            if stopping.metric in first:
                over = max(0.0, first.get("l0", 0.0) / l0_max - 1) if l0_max else 0.0
                value = first[stopping.metric]
                first[ES_SCORE] = value - over if stopping.mode == "max" else value + over
            super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    return EarlyStopScore()


def _eval_model(spec):
    """The full model for evaluation, loaded once per trial process."""
    from saeforge.model import load_model

    cache = _eval_model.__dict__.setdefault("cache", {})
    if spec not in cache:
        cache.clear()
        cache[spec] = load_model(spec)
    return cache[spec]


def run_trial(config: dict, ctx: TrialContext | None = None) -> None:
    """The Tune function: one TorchTrainer run on the shared activations, then evaluation."""
    import torch
    import ray.train
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient
    from ray import tune
    from ray.train.torch import TorchTrainer

    from saeforge.evaluation import evaluate_core
    from saeforge.sae_io import load_sae
    from saeforge.train_job import worker_config
    from saeforge.train_workers import SAE_DIR, worker_loop

    plan, space = ctx.plan, ctx.space
    trial_id = tune.get_context().get_trial_id()
    client = MlflowClient(ctx.uri)
    run_id = client.create_run(ctx.experiment_id, run_name=f"{space.variant}-{trial_id}", tags={
        "mlflow.parentRunId": ctx.parent_run_id, TRIAL_TAG: trial_id, "saeforge.variant": space.variant}).info.run_id
    # No terminal status is written on failure here: a trial that ASHA stops also raises, and its
    # actor can still run after tuner.fit() returns. The driver closes every unfinished child run
    # from Tune's own view of the trial (trial_rows).
    overrides = {**space.fixed, **config}
    cfg = plan.variant_cls.Config.build(d_in=plan.d_in, d_sae=plan.d_sae, overrides=overrides)
    total_steps, batch_rows = trial_budget(ctx, cfg)
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in
                                     {**{f"sae.{k}": v for k, v in cfg.to_dict().items()},
                                      "variant": space.variant, "total_steps": total_steps}.items()])
    args = dataclasses.replace(plan.args, overrides=overrides, log_every=ctx.report_every, checkpoint_every=0,
                               run_name=trial_id)
    trial_plan = dataclasses.replace(plan, args=args, variant_cfg=cfg, total_steps=total_steps,
                                     batch_rows=batch_rows)
    spec = ProducerSpec(plan.spec, (plan.hook,), tuple(plan.special_ids), plan.variant_cls.batch_layout)
    loop_config = {**worker_config(trial_plan, spec, ctx.uri, run_id, threads=ctx.threads),
                   "report_every": ctx.report_every}
    resources = {"CPU": 1, **({"GPU": ctx.gpu_per_worker} if 0 < ctx.gpu_per_worker < 1 else {})}
    trainer = TorchTrainer(
        train_loop_per_worker=worker_loop, train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=args.workers, use_gpu=ctx.gpu_per_worker > 0,
                                               resources_per_worker=resources),
        datasets={"train": ctx.dataset},
        run_config=ray.train.RunConfig(
            name=trial_id, storage_path=ctx.storage,
            callbacks=[_early_stop_callback(space.early_stopping, ctx.l0_max)],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            failure_config=ray.train.FailureConfig(max_failures=0)))
    started = time.time()
    result = trainer.fit()
    if result.error:
        raise result.error
    train_seconds = time.time() - started
    checkpoint = Path(result.checkpoint.path)
    torch.set_num_threads(ctx.threads)
    sae, _ = load_sae(checkpoint / SAE_DIR)
    metrics = evaluate_core(_eval_model(plan.spec), sae, plan.hook, plan.eval_contexts, plan.special_ids)
    eval_seconds = time.time() - started - train_seconds  # with the full model's load (once per trial)
    final = {k: float(v) for k, v in metrics.items() if math.isfinite(v)}
    objective = space.score(metrics) if not space.multi_objective else math.nan
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(f"eval/{k}", v, now, total_steps) for k, v in final.items()]
                     + [Metric("train_seconds", train_seconds, now, total_steps),
                        Metric("eval_seconds", eval_seconds, now, total_steps)]
                     + ([Metric("objective", objective, now, total_steps)] if math.isfinite(objective) else []))
    client.set_tag(run_id, "saeforge.checkpoint", str(checkpoint))
    client.set_tag(run_id, STATUS_TAG, "completed")
    client.set_terminated(run_id, "FINISHED")
    tune.report({**final, "objective": objective, "feasible": int(space.feasible(metrics)),
                 "train_seconds": train_seconds, "eval_seconds": eval_seconds,
                 "checkpoint_dir": str(checkpoint), "mlflow_run_id": run_id, "step": total_steps, "trial_done": 1})


def _one_line(err: BaseException | str) -> str:
    """The most telling line of an error (Ray wraps the worker's own exception in its report)."""
    text = str(err)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", line):
            return line
    return lines[-1] if lines else type(err).__name__


# -- the search driver --------------------------------------------------------------------------

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


def load_spaces(args: TuneArgs) -> list[tune_space.TuneSpace]:
    names = variant_names(args.variant)
    if args.space and len(names) > 1:
        raise UserError("--space: expected one variant with a space file (a list or 'all' uses tune_spaces/NAME.yaml)")
    spaces = []
    for name in names:
        path = Path(args.space) if args.space else tune_space.default_space_path(name)
        if not path.is_file():
            raise UserError(f"{path}: no tune space for variant '{name}' (pass --space FILE)")
        space = tune_space.load(path, name)
        if args.objective == "pareto":
            space = space.as_pareto()
        elif args.objective == "single":
            space = space.as_single()
        if args.search_alg == "optuna" and space.has_grid:
            field_name = next(k for k, v in space.params.items() if v["sampler"] == "grid")
            raise UserError(f"{path}: params.{field_name}.sampler: expected a sampler Optuna can draw from "
                            "(choice, uniform, loguniform, randint); grid needs --search-alg random")
        spaces.append(space)
    return spaces


def _check_args(args: TuneArgs) -> None:
    for name in ("samples", "tokens_per_trial", "workers", "producers", "eval_contexts"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("max_concurrent", "report_every", "grace_period"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be 0 (automatic) or more")
    if args.scheduler not in SCHEDULERS:
        raise UserError(f"--scheduler: expected one of {', '.join(SCHEDULERS)}, got '{args.scheduler}'")
    if args.search_alg not in SEARCH_ALGS:
        raise UserError(f"--search-alg: expected one of {', '.join(SEARCH_ALGS)}, got '{args.search_alg}'")
    if args.objective not in OBJECTIVES:
        raise UserError(f"--objective: expected one of {', '.join(OBJECTIVES)}, got '{args.objective}'")


def trial_concurrency(args: TuneArgs) -> tuple[int, int, float]:
    """(max concurrent trials, torch threads per train worker, GPUs per worker) from the cluster's
    resources. A local Ray declares more logical CPUs than the machine has cores (NOTES-APIS.md):
    there the cores decide."""
    import ray

    resources = ray.cluster_resources()
    logical = resources.get("CPU", 1.0)
    alive = [n for n in ray.nodes() if n.get("Alive")]
    cores = min(logical, os.cpu_count() or 1) if len(alive) <= 1 else logical
    n = max(1, min(int(cores // args.workers), int(logical // (args.workers + TRIAL_CPU))))
    gpus = resources.get("GPU", 0.0)
    if gpus:  # a whole GPU per train worker where there are enough, else one trial sharing them
        n = min(n, max(1, int(gpus // args.workers)))
    if args.max_concurrent:
        n = args.max_concurrent
    threads = max(1, int(cores // (n * args.workers)))
    gpu_per_worker = (1.0 if gpus >= n * args.workers else gpus / (n * args.workers)) if gpus else 0.0
    return n, threads, gpu_per_worker


def _batch_size_hint(space: tune_space.TuneSpace, variant_cls) -> int:
    spec = space.params.get("batch_size")
    if spec:
        return int(min(spec["values"]) if "values" in spec else spec["low"])
    return int(space.fixed.get("batch_size", variant_cls.Config.__dataclass_fields__["batch_size"].default))


def _cadence(args: TuneArgs, space: tune_space.TuneSpace, variant_cls, tokens: int) -> tuple[int, int, int]:
    """(report_every, grace_period, max_t) in training steps."""
    steps = max(1, min(args.tokens_per_trial, tokens) // _batch_size_hint(space, variant_cls))
    report_every = args.report_every or max(1, steps // 10)
    grace = args.grace_period or space.early_stopping.grace_period or max(report_every, steps // 4)
    return report_every, grace, max(steps, grace) * 4 + 1  # max_t past any trial's last step: ASHA never cuts the end


class _Scheduled:
    """Builds the scheduler and search algorithm of one search."""

    @staticmethod
    def scheduler(args: TuneArgs, space: tune_space.TuneSpace, grace: int, max_t: int):
        from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

        if args.scheduler == "fifo":
            return FIFOScheduler()
        return ASHAScheduler(time_attr="step", metric=ES_SCORE, mode=space.early_stopping.mode, grace_period=grace,
                             max_t=max_t, reduction_factor=space.early_stopping.reduction_factor)

    @staticmethod
    def search_alg(args: TuneArgs, space: tune_space.TuneSpace, max_concurrent: int):
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


def trial_rows(grid, space: tune_space.TuneSpace, ctx: TrialContext) -> list[dict]:
    """One row per trial (status, sampled values, final metrics); child runs of trials that were
    stopped early or died are closed with their status."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(ctx.uri)
    children = {r.data.tags.get(TRIAL_TAG): r for r in client.search_runs(
        [ctx.experiment_id], f"tags.mlflow.parentRunId = '{ctx.parent_run_id}'", max_results=10_000)}
    rows = []
    for result in grid:
        m = result.metrics or {}
        trial_id = _trial_id(result, [k for k in children if k])
        run = children.get(trial_id)
        status = "failed" if result.error else "completed" if m.get("trial_done") else "early_stopped"
        row = {"trial_id": trial_id, "run_id": run.info.run_id if run else "", "status": status,
               **{k: (result.config or {}).get(k) for k in space.params}}
        for key in ("l0", "ce_loss_recovered", "explained_variance", "kl_div_sae", "dead_fraction", "objective",
                    "train_seconds", "eval_seconds"):
            row[key] = float(m[key]) if status == "completed" and key in m else math.nan
        row["step"] = m.get("step", 0)
        row["train_explained_variance"] = m.get("explained_variance", math.nan) if status != "completed" else math.nan
        row["feasible"] = status == "completed" and space.feasible(row)
        row["checkpoint_dir"] = m.get("checkpoint_dir", "")
        row["error"] = _one_line(result.error) if result.error else ""
        rows.append(row)
        if run is not None and status != "completed":  # failed and stopped trials are closed here
            client.set_tag(run.info.run_id, STATUS_TAG, status)
            if status == "early_stopped":
                client.set_tag(run.info.run_id, "saeforge.stopped_at_step", str(row["step"]))
            if row["error"]:
                client.set_tag(run.info.run_id, "saeforge.error", row["error"][:4000])
            client.set_terminated(run.info.run_id, "KILLED" if status == "early_stopped" else "FAILED")
    done = [i for i, r in enumerate(rows) if r["status"] == "completed"]
    front = tune_space.pareto_front([(rows[i]["l0"], rows[i]["ce_loss_recovered"]) for i in done])
    for i, r in enumerate(rows):
        r["pareto"] = i in {done[j] for j in front}
    return rows


def write_table(rows: list[dict], path: Path) -> Path:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    return path


def format_rows(rows: list[dict], keys: list[str]) -> str:
    """A plain text table (numbers to 4 significant digits)."""
    def cell(v):
        if isinstance(v, float):
            return "-" if math.isnan(v) else f"{v:.4g}"
        return "" if v is None else str(v)

    cells = [[cell(r.get(k)) for k in keys] for r in rows]
    widths = [max([len(k)] + [len(c[i]) for c in cells]) for i, k in enumerate(keys)]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def search_variant(space: tune_space.TuneSpace, plan, acts: SharedActivations, args: TuneArgs, *, uri: str,
                   experiment_id: str, concurrency: tuple[int, int, float], progress=print, verbose: int = 1) -> dict:
    """One variant's search: a Tuner over its space on the shared activations, under a parent
    MLflow run; ends by registering the best trial's SAE."""
    import mlflow
    from ray import tune

    from saeforge.compare import plot_l0_vs_ce
    from saeforge.train_job import sae_meta

    variant_cls = variants.get(space.variant)
    cfg = variant_cls.Config.build(d_in=plan.d_in, d_sae=plan.d_sae, overrides=space.fixed)
    layout = variant_cls.batch_layout
    plan = dataclasses.replace(plan, args=dataclasses.replace(plan.args, variant=space.variant,
                                                              overrides=dict(space.fixed)),
                               variant_cls=variant_cls, variant_cfg=cfg)
    n, threads, gpu_per_worker = concurrency
    report_every, grace, max_t = _cadence(args, space, variant_cls, acts.tokens)
    l0_max = space.l0_max() or plan.args.max_l0
    stamp = time.strftime("%Y%m%d-%H%M%S")
    search_name = f"{args.name or 'tune'}-{space.variant}-{stamp}"
    storage = Path(args.storage).expanduser().resolve()
    objective = ("pareto: " + ", ".join(f"{m} {d}" for m, d in zip(space.metrics, space.modes))
                 if space.multi_objective else f"{space.metrics[0]} {space.modes[0]}")
    progress(f"saeforge: searching {space.variant} ({args.samples} sample(s), {args.search_alg} search, "
             f"{args.scheduler} scheduler, up to {n} trial(s) at once, {objective}, constraints: "
             f"{', '.join(map(str, space.constraints)) or 'none'})")
    started = time.time()
    with mlflow.start_run(experiment_id=experiment_id, run_name=search_name,
                          tags={"saeforge.kind": "tune_search", "saeforge.variant": space.variant}) as parent:
        mlflow.log_params({
            "variant": space.variant, "space": str(space.path), "samples": args.samples,
            "search_alg": args.search_alg, "scheduler": args.scheduler, "objective": objective,
            "constraints": "; ".join(map(str, space.constraints)), "max_concurrent": n,
            "tokens_per_trial": args.tokens_per_trial, "report_every": report_every, "grace_period": grace,
            "model": plan.args.model, "hook": plan.hook.name, "d_sae": plan.d_sae, "seed": args.seed,
            "activations": acts.source, **{f"fixed.{k}": v for k, v in space.fixed.items()}})
        mlflow.log_metrics(acts.log_dict())
        mlflow.log_artifact(str(space.path), artifact_path="space")
        ctx = TrialContext(plan, space, acts.datasets[layout], acts.tokens, acts.contexts, args.tokens_per_trial,
                           report_every,
                           l0_max, uri, experiment_id, parent.info.run_id, str(storage / search_name / "trials"),
                           threads, gpu_per_worker)
        trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), {"cpu": TRIAL_CPU})
        tuner = tune.Tuner(
            trainable, param_space=space.param_space(),
            tune_config=tune.TuneConfig(num_samples=args.samples, max_concurrent_trials=n,
                                        search_alg=_Scheduled.search_alg(args, space, n),
                                        scheduler=_Scheduled.scheduler(args, space, grace, max_t)),
            run_config=tune.RunConfig(name=search_name, storage_path=str(storage), verbose=verbose))
        grid = tuner.fit()
        rows = trial_rows(grid, space, ctx)
        seconds = time.time() - started
        best = tune_space.best_trial(rows, space)
        out_dir = storage / search_name
        out_dir.mkdir(parents=True, exist_ok=True)
        table = write_table(rows, out_dir / "trials.csv")
        mlflow.log_artifact(str(table), artifact_path="search")
        mlflow.log_dict({"rows": rows, "best_trial": best and best["trial_id"],
                         "pareto": [r["trial_id"] for r in rows if r["pareto"]]}, "search/trials.json")
        points = [{"variant": space.variant, "l0": r["l0"], "ce_loss_recovered": r["ce_loss_recovered"],
                   "label": r["trial_id"], "best": best is not None and r is best} for r in rows
                  if r["status"] == "completed"]
        plot = plot_l0_vs_ce(points, out_dir / "l0_vs_ce_loss_recovered.png",
                             title=f"{space.variant} search on {plan.hook.name} ({len(rows)} trials)", l0_max=l0_max)
        mlflow.log_artifact(str(plot), artifact_path="search")
        counts = {s: sum(r["status"] == s for r in rows) for s in ("completed", "early_stopped", "failed")}
        mlflow.log_metrics({**{f"trials_{k}": v for k, v in counts.items()}, "search_seconds": seconds})
        summary = {"variant": space.variant, "parent_run_id": parent.info.run_id, "search_name": search_name,
                   "params": list(space.params), "trials": len(rows),
                   **{f"trials_{k}": v for k, v in counts.items()}, "rows": rows,
                   "best": best, "pareto": [r["trial_id"] for r in rows if r["pareto"]], "seconds": seconds,
                   "table": str(table), "plot": str(plot), "registered_model": None, "version": None,
                   "champion": False, "champion_reason": "no trial completed"}
        if best is None:
            progress(f"saeforge: {space.variant}: no trial completed; nothing registered")
            return summary
        mlflow.log_metrics({**{f"best/{k}": best[k] for k in ("l0", "ce_loss_recovered", "explained_variance")
                               if math.isfinite(best[k])}, "best/feasible": int(best["feasible"])})
        mlflow.set_tag("saeforge.best_run_id", best["run_id"])
        sae_dir = Path(best["checkpoint_dir"]) / "sae"
        name = tracking.registered_model_name(plan.spec.short_name, plan.hook.name, space.variant)
        with mlflow.start_run(run_id=best["run_id"], nested=True):
            mlflow.log_artifacts(str(sae_dir), artifact_path="sae")
            version = tracking.log_and_register(sae_dir, plan.d_in, plan.d_sae, name)
        if best["feasible"]:
            moved, reason = tracking.promote_if_better(name, version, best, l0_max)
        else:  # tagged as promote_if_better tags every version, but not a champion candidate
            from mlflow.tracking import MlflowClient

            client = MlflowClient()
            client.set_model_version_tag(name, str(version), tracking.CHAMPION_METRIC,
                                         f"{best[tracking.CHAMPION_METRIC]:.6f}")
            client.set_model_version_tag(name, str(version), "l0", f"{best['l0']:.3f}")
            missed = [str(c) for c in space.constraints if c.violation(best) > 0]
            moved, reason = False, f"no trial met the constraints ({', '.join(missed)}); this is the closest"
        summary.update(registered_model=name, version=int(version), champion=moved, champion_reason=reason,
                       sae_meta=sae_meta(plan))
    return summary


def run_tune(args: TuneArgs, progress=print, verbose: int = 1) -> dict:
    """The whole `saeforge tune`: returns a summary dict (also printed by the CLI)."""
    from saeforge.train_job import TrainArgs, connect_ray, plan_run

    started = time.time()
    _check_args(args)
    spaces = load_spaces(args)
    plan = plan_run(TrainArgs(
        model=args.model, hook=args.hook, variant=spaces[0].variant, overrides=dict(spaces[0].fixed),
        tokens=args.tokens_per_trial, d_sae=args.d_sae, dataset=args.dataset, text_column=args.text_column,
        context_size=args.context_size, producers=args.producers, workers=args.workers,
        eval_contexts=args.eval_contexts, max_l0=args.max_l0, storage=args.storage, address=args.address))
    for space in spaces:
        tune_space.check_builds(space, plan.d_in, plan.d_sae)
    layouts = {variants.get(s.variant).batch_layout for s in spaces}
    if args.activations:
        check_cache(args.activations, plan, "contexts" if "contexts" in layouts else "tokens")

    uri = tracking.use_store()
    experiment_id = tracking.ensure_experiment(tracking.experiment_name(plan.spec.short_name, plan.hook.name), uri)
    connect_ray(args.address, dashboard=True)
    # Trials report the objective only at their end and the early-stopping score only while they
    # train: Tune must not insist on every metric in every report.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    acts = shared_activations(plan, layouts, args, progress)
    concurrency = trial_concurrency(args)
    searches = [search_variant(space, plan, acts, args, uri=uri, experiment_id=experiment_id,
                               concurrency=concurrency, progress=progress, verbose=verbose) for space in spaces]
    return {"searches": searches, "activations": {k: v for k, v in dataclasses.asdict(acts).items()
                                                  if k != "datasets"},
            "max_concurrent": concurrency[0], "tracking_uri": uri, "experiment_id": experiment_id,
            "seconds": time.time() - started}


# -- command line -----------------------------------------------------------------------------------

def add_tune_parser(sub) -> None:
    from saeforge.hooks import SITES

    d = TuneArgs()
    p = sub.add_parser(
        "tune", help="search a variant's hyperparameters with Ray Tune; register the best SAE",
        description="Search tune_spaces/VARIANT.yaml (or --space FILE) with Ray Tune on activations produced once "
                    "for every trial; log a parent MLflow run with one child run per trial, register the best SAE "
                    "and move 'champion' if it beats the current one. Format and rules: docs/tuning.md.")
    p.add_argument("--variant", default=d.variant,
                   help="variant, comma-separated variants, or 'all' (default %(default)s)")
    p.add_argument("--space", default="", metavar="FILE", help="tune-space YAML (default tune_spaces/VARIANT.yaml)")
    p.add_argument("--samples", type=int, default=d.samples, help="trials per variant (default %(default)s)")
    p.add_argument("--max-concurrent", type=int, default=0, help="trials at once (default: from the resources)")
    p.add_argument("--scheduler", default=d.scheduler, choices=SCHEDULERS,
                   help="asha stops bad trials early (default); fifo runs every trial to the end")
    p.add_argument("--search-alg", default=d.search_alg, choices=SEARCH_ALGS, help="default %(default)s")
    p.add_argument("--objective", default=d.objective, choices=OBJECTIVES,
                   help="space: as the space file says (default); single: CE loss recovered under the constraints; "
                        "pareto: (L0 min, CE loss recovered max)")
    p.add_argument("--tokens-per-trial", type=int, default=d.tokens_per_trial,
                   help="activation tokens each trial trains on (default %(default)s)")
    p.add_argument("--activations", default="", metavar="PATH",
                   help="activation cache folder: reused if it holds one, else written (default: object store only)")
    p.add_argument("--model", default=d.model, help="model (as for `saeforge train`; default %(default)s)")
    p.add_argument("--layer", type=int, default=int(d.hook), help="layer whose output is hooked (default %(default)s)")
    p.add_argument("--site", default="resid_post", choices=sorted(SITES), help="what to read at that layer")
    p.add_argument("--d-sae", type=int, default=d.d_sae, help="number of latents (default 8 x d_in)")
    p.add_argument("--dataset", default=d.dataset, help="text source (as for `saeforge train`)")
    p.add_argument("--text-column", default=d.text_column, help="text column of a dataset (default %(default)s)")
    p.add_argument("--context-size", type=int, default=d.context_size, help="tokens per context (default %(default)s)")
    p.add_argument("--producers", type=int, default=d.producers, help="model-slice actors (default %(default)s)")
    p.add_argument("--workers", type=int, default=d.workers, help="Ray Train workers per trial (default %(default)s)")
    p.add_argument("--eval-contexts", type=int, default=d.eval_contexts,
                   help="held-out contexts each trial is evaluated on (default %(default)s)")
    p.add_argument("--report-every", type=int, default=0,
                   help="steps between intermediate reports (default: ~10 per trial)")
    p.add_argument("--grace-period", type=int, default=0,
                   help="steps before ASHA may stop a trial (default: the space's, else a quarter of a trial)")
    p.add_argument("--max-l0", type=float, default=d.max_l0,
                   help="champion L0 bound if the space sets none (default d_in / 2)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the search algorithm (default %(default)s)")
    p.add_argument("--storage", default=d.storage, help="folder for Tune/Train runs, checkpoints, tables and plots")
    p.add_argument("--name", default="", help="prefix of the search names (default 'tune')")
    p.add_argument("--address", default="", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_tune)


def cmd_tune(ns: argparse.Namespace) -> int:
    names = {f.name for f in dataclasses.fields(TuneArgs)}
    values = {k: v for k, v in vars(ns).items() if k in names}
    values["hook"] = f"{ns.site}:{ns.layer}"
    summary = run_tune(TuneArgs(**values))
    if ns.json:
        print(json.dumps(summary, indent=2, default=str))
        return 0
    acts = summary["activations"]
    print(f"\nsaeforge: done in {summary['seconds']:.0f}s; activations: {acts['tokens']:,} tokens from "
          f"{acts['source']} ({acts['producer_batches']} producer batches, {acts['seconds']:.0f}s), "
          "shared by every trial")
    for s in summary["searches"]:
        print(f"\n{s['variant']}: {s['trials']} trials ({s['trials_completed']} completed, "
              f"{s['trials_early_stopped']} stopped early, {s['trials_failed']} failed) in {s['seconds']:.0f}s; "
              f"parent run {s['parent_run_id']}")
        keys = ["trial_id", "status", *s["params"], "l0", "ce_loss_recovered", "explained_variance", "pareto"]
        print(format_rows(s["rows"], keys))
        for r in s["rows"]:
            if r["error"]:
                print(f"  {r['trial_id']} failed: {r['error']}")
        if s["best"]:
            b = s["best"]
            verdict = "is the new champion" if s["champion"] else "did not become champion"
            print(f"  best: {b['trial_id']} (CE loss recovered {b['ce_loss_recovered']:.4f} at L0 {b['l0']:.1f}) "
                  f"registered as {s['registered_model']} v{s['version']}, {verdict}: {s['champion_reason']}")
        else:
            print(f"  best: none ({s['champion_reason']})")
        print(f"  table {s['table']} | plot {s['plot']}")
    print(f"\n  browse with mlflow ui --backend-store-uri {summary['tracking_uri']}")
    return 0

