"""One SAE of a study, as a Tune trial: train it in this process on the study's shared
activations (`core.training.train_loop`, one worker: a study's width comes from many SAEs at
once, not from data parallelism inside one), save it, evaluate it, report.

What the trial measured goes to `result.json` in its SAE folder (the driver reads it; Tune's own
report carries the scalars only): {"job", "steps", "config", "metrics", "tables",
"train_seconds", "eval_seconds", "sae_dir", "run_id"}.
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
from saeforge.jobs.sweep import eval_model
from saeforge.jobs.tracking import mlflow_runs
from saeforge.jobs.train.worker import in_process_device
from saeforge.jobs.validate import variant_config

CALIBRATION, FINAL = "calibration", "final"
RESULT_FILE = "result.json"


@dataclass(frozen=True)
class StudyJob:
    """One SAE to train: its variant, target L0, factor (the multiplier of the variant's
    `sparsity_fields`; ignored for an `l0_field` variant, whose field is set to the target) and
    seed, and its role: a calibration SAE gives its held-out L0 only (through the model slice,
    no MLflow run); a final one is evaluated with every suite of the study and logged as a child
    run of the study."""

    variant: str
    target: float
    factor: float
    seed: int
    role: str

    @property
    def name(self) -> str:
        factor = "" if variants.get(self.variant).l0_field else f"-f{self.factor:.4g}"
        return f"{self.variant}-L0{self.target:g}{factor}-s{self.seed}-{self.role}"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def overrides(self, given: dict[str, str], defaults: variants.VariantConfig) -> dict[str, Any]:
        """The job's config values: the study's `given` values that the variant has, its seed, and
        its sparsity knob (the target for an `l0_field`, else each sparsity field times the factor)."""
        cls = variants.get(self.variant)
        fields = cls.Config.field_types()
        values: dict[str, Any] = {k: v for k, v in given.items() if k in fields}
        values["seed"] = self.seed
        if cls.l0_field:
            values[cls.l0_field] = max(1, round(self.target))
        for name in cls.sparsity_fields:
            values[name] = float(values.get(name, getattr(defaults, name))) * self.factor
        return values


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


def train_sae(ctx: StudyContext, job: StudyJob) -> tuple[variants.Variant, int]:
    """A fresh SAE trained on the first contexts of the shared activations; (SAE, steps)."""
    plan = ctx.plan
    d_in, d_sae = plan.variant.d_in, plan.variant.d_sae
    defaults = variants.get(job.variant).Config(d_in=d_in, d_sae=d_sae)
    cfg = variant_config(job.variant, d_in, d_sae, job.overrides(ctx.overrides, defaults))
    budget = step_budget(ctx.tokens, cfg.batch_size, plan.stream.context_size, 1, ctx.available_contexts)
    stream = dataclasses.replace(plan.stream, contexts_per_step=budget.contexts_per_step, workers=1)
    device = in_process_device(plan)
    sae = variants.get(job.variant)(cfg).to(device)
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

    model, tokenizer = eval_model(ctx.plan.stream.model)
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

    job = StudyJob(**config["job"])
    torch.set_num_threads(ctx.plan.resources.worker_threads)
    started = time.time()
    sae, steps = train_sae(ctx, job)
    train_seconds = time.time() - started
    folder = Path(ctx.folder) / "saes" / job.name
    save_sae(sae, folder, ctx.plan.sae_meta)
    metrics, tables = evaluate(ctx, sae, ctx.suites if job.role == FINAL else ())  # the search reads L0 only
    result = {
        "job": job.as_dict(),
        "steps": steps,
        "config": sae.cfg.to_dict(),
        "metrics": metrics,
        "tables": tables,
        "train_seconds": train_seconds,
        "eval_seconds": time.time() - started - train_seconds,
        "sae_dir": str(folder),
        "run_id": log_final(ctx, job, sae, metrics, folder) if job.role == FINAL else "",
    }
    (folder / RESULT_FILE).write_text(json.dumps(result, default=float))
    tune.report({"l0": metrics["l0"], "result_file": str(folder / RESULT_FILE), "done": 1})


def log_final(ctx: StudyContext, job: StudyJob, sae: variants.Variant, metrics: dict, folder: Path) -> str:
    """A child run of the study for one final SAE: its config, its metrics, its folder."""
    tracking = ctx.plan.tracking
    tags = {
        mlflow_runs.VARIANT_TAG: job.variant,
        "saeforge.kind": "study_sae",
        "saeforge.target_l0": str(job.target),
        "saeforge.seed": str(job.seed),
    }
    params = {
        **{f"sae.{k}": v for k, v in sae.cfg.to_dict().items()},
        "variant": job.variant,
        "target_l0": job.target,
        "factor": job.factor,
    }
    run_id = mlflow_runs.open_child_run(tracking.uri, tracking.experiment_id, ctx.parent_run_id, job.name, tags, params)
    done = {"saeforge.sae_dir": str(folder), mlflow_runs.STATUS_TAG: "completed"}
    mlflow_runs.finish_run(tracking.uri, run_id, {f"eval/{k}": v for k, v in metrics.items()}, 0, done)
    return run_id
