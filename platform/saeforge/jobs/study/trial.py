"""One SAE of a study, as a Tune function trial: train it in this process on the study's shared
activations (`core.training.train_loop`, one worker: a study's width comes from many SAEs at
once, not from data parallelism inside one), save it, evaluate it, report.

A job is a dict: variant, target L0, factor (the multiplier of the variant's `sparsity_fields`;
ignored for an `l0_field` variant, whose field is set to the target), seed, role ("calibration":
its held-out L0 only, through the model slice, no MLflow run; "final": every suite of the
study and an MLflow child run of the study). What the trial measured goes to `result.json` in
its SAE folder (the driver reads it; Tune's own report carries the scalars only).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import variants
from saeforge.core.batches import step_budget
from saeforge.core.sae_files import sae_cfg, save_sae
from saeforge.core.training import LoopSettings, start_fresh, train_loop
from saeforge.jobs.data.activation_stream import step_batches
from saeforge.jobs.plan import RunPlan
from saeforge.jobs.tracking import mlflow_runs
from saeforge.jobs.train.worker import in_process_device
from saeforge.jobs.validate import variant_config

CALIBRATION, FINAL = "calibration", "final"
RESULT_FILE = "result.json"


@dataclass
class StudyContext:
    """What every SAE of a study shares (sent once through tune.with_parameters)."""

    plan: RunPlan
    dataset: Any  # the materialised activations, one row per context
    available_contexts: int
    tokens: int
    overrides: dict[str, str]  # set on every variant that has the field
    suites: tuple[str, ...]
    suite_options: dict[str, dict]
    parent_run_id: str
    folder: str  # the study's folder: SAEs under saes/


def job_overrides(job: dict, overrides: dict[str, str], cls: type[variants.Variant], defaults) -> dict[str, Any]:
    """The job's config values: the study's overrides that the variant has, its seed, and its
    sparsity knob (the target for an `l0_field`, else each sparsity field times the factor)."""
    fields = cls.Config.field_types()
    values: dict[str, Any] = {k: v for k, v in overrides.items() if k in fields}
    values["seed"] = job["seed"]
    if cls.l0_field:
        values[cls.l0_field] = max(1, round(job["target"]))
    for name in cls.sparsity_fields:
        values[name] = float(values.get(name, getattr(defaults, name))) * job["factor"]
    return values


def job_name(job: dict) -> str:
    factor = "" if variants.get(job["variant"]).l0_field else f"-f{job['factor']:.4g}"
    return f"{job['variant']}-L0{job['target']:g}{factor}-s{job['seed']}-{job['role']}"


def trial_model(spec):
    """The whole model and tokenizer for evaluation, loaded once per trial process."""
    from saeforge.core.model import compute_device, load_model, load_tokenizer

    cache = trial_model.__dict__.setdefault("cache", {})
    if spec not in cache:
        cache.clear()
        device, dtype = compute_device()
        cache[spec] = (load_model(spec, dtype=dtype, device=device), load_tokenizer(spec))
    return cache[spec]


def train_sae(ctx: StudyContext, job: dict) -> tuple[variants.Variant, int]:
    """A fresh SAE trained on the first contexts of the shared activations; (SAE, steps)."""
    plan = ctx.plan
    cls = variants.get(job["variant"])
    defaults = cls.Config(d_in=plan.variant.d_in, d_sae=plan.variant.d_sae)
    cfg = variant_config(
        job["variant"], plan.variant.d_in, plan.variant.d_sae, job_overrides(job, ctx.overrides, cls, defaults)
    )
    budget = step_budget(ctx.tokens, cfg.batch_size, plan.stream.context_size, 1, ctx.available_contexts)
    stream = dataclasses.replace(plan.stream, contexts_per_step=budget.contexts_per_step, workers=1)
    device = in_process_device(plan)
    sae = cls(cfg).to(device)
    batches = start_fresh(sae, step_batches(ctx.dataset.limit(budget.contexts), stream, device=device))
    train_loop(sae, batches, LoopSettings(budget.total_steps, log_every=budget.total_steps, checkpoint_every=0))
    return sae, budget.total_steps


def heldout_l0(ectx, n_contexts: int) -> float:
    """Mean L0 over the real tokens of the first `n_contexts` held-out contexts (the core
    suite's contexts), through the model slice only: what the L0 search reads."""
    from saeforge.core.eval_suites.context import heldout_contexts, token_latents

    fired, tokens = 0.0, 0
    for _, f, mask in token_latents(ectx, heldout_contexts(ectx, n_contexts)):
        rows = f[mask]
        fired += (rows > 0).sum().item()
        tokens += rows.shape[0]
    return fired / max(tokens, 1)


def evaluate(ctx: StudyContext, sae: variants.Variant, suites: tuple[str, ...]) -> tuple[dict, dict]:
    """({suite/metric: value}, {suite: {table: rows}}) of the registered suites on this SAE, and
    `l0`: its held-out L0 on the core suite's contexts."""
    from saeforge.core.eval_suites.runner import build_context, run_local

    model, tokenizer = trial_model(ctx.plan.stream.model)
    cfg = sae_cfg(sae, ctx.plan.sae_meta)
    ectx = build_context(sae, cfg, model, tokenizer, dataset=ctx.plan.args.dataset)
    results = run_local(ectx, list(suites), ctx.suite_options)
    metrics = {
        f"{suite}/{k}": float(v)
        for suite, r in results.items()
        for k, v in r.metrics.items()
        if isinstance(v, (int, float))
    }
    metrics.update({f"{suite}/seconds": r.seconds for suite, r in results.items()})
    metrics["l0"] = heldout_l0(ectx, ctx.suite_options["core"]["contexts"])
    return metrics, {suite: r.tables for suite, r in results.items() if r.tables}


def study_trial(config: dict, ctx: StudyContext | None = None) -> None:
    """The Tune function: train, save, evaluate one SAE of the study; log it when final."""
    import torch
    from ray import tune

    job = config["job"]
    torch.set_num_threads(ctx.plan.resources.worker_threads)
    started = time.time()
    sae, steps = train_sae(ctx, job)
    train_seconds = time.time() - started
    folder = Path(ctx.folder) / "saes" / job_name(job)
    save_sae(sae, folder, ctx.plan.sae_meta)
    suites = ctx.suites if job["role"] == FINAL else ()  # the search reads the held-out L0 only
    metrics, tables = evaluate(ctx, sae, suites)
    result = {
        "job": job,
        "steps": steps,
        "config": sae.cfg.to_dict(),
        "metrics": metrics,
        "tables": tables,
        "train_seconds": train_seconds,
        "eval_seconds": time.time() - started - train_seconds,
        "sae_dir": str(folder),
        "run_id": log_final(ctx, job, sae, metrics, folder) if job["role"] == FINAL else "",
    }
    (folder / RESULT_FILE).write_text(json.dumps(result, default=float))
    tune.report({"l0": metrics["l0"], "result_file": str(folder / RESULT_FILE), "done": 1})


def log_final(ctx: StudyContext, job: dict, sae: variants.Variant, metrics: dict, folder: Path) -> str:
    """A child run of the study for one final SAE: its config, its metrics, its result file."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    plan = ctx.plan
    uri = plan.tracking.uri
    run_id = mlflow_runs.start_child_run(
        uri,
        plan.tracking.experiment_id,
        ctx.parent_run_id,
        job_name(job),
        {
            mlflow_runs.VARIANT_TAG: job["variant"],
            "saeforge.kind": "study_sae",
            "saeforge.target_l0": str(job["target"]),
            "saeforge.seed": str(job["seed"]),
        },
    )
    client = MlflowClient(uri)
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        params=[Param(f"sae.{k}", str(v)) for k, v in sae.cfg.to_dict().items()]
        + [
            Param("variant", job["variant"]),
            Param("target_l0", str(job["target"])),
            Param("factor", str(job["factor"])),
        ],
        metrics=[Metric(f"eval/{k}", v, now, 0) for k, v in mlflow_runs.finite(metrics).items()],
    )
    mlflow_runs.close_run(
        uri, run_id, "FINISHED", {"saeforge.sae_dir": str(folder), mlflow_runs.STATUS_TAG: "completed"}
    )
    return run_id
