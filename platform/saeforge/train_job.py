"""The driver of one training run: validate, build the activation stream, fit, evaluate, track.

Order matters for the user: everything that can be wrong with the input (variant, config fields,
model path, layer, dataset, resume target) is checked before Ray starts or MLflow records
anything, so a mistake costs seconds and leaves nothing behind.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

import variants
from saeforge import corpus, eval_suites, tracking
from saeforge.activations import ProducerSpec, activation_dataset
from saeforge.errors import UserError
from saeforge.hooks import HookPoint
from saeforge.model import ModelSpec, load_config, load_model, load_tokenizer, resolve_model
from saeforge.train_workers import RUN_INFO_FILE, is_checkpoint, worker_loop



@dataclass
class TrainArgs:
    """Everything `saeforge train` accepts (the CLI's flags map one to one)."""

    model: str = "gemma-3-270m"
    hook: str = "6"  # LAYER, SITE:LAYER or blocks.LAYER.hook_SITE
    variant: str = "relu"
    overrides: dict = field(default_factory=dict)  # variant config fields (--set name=value)
    tokens: int = 250_000
    d_sae: int = 0  # 0: the variant's default width, 8 x d_in
    dataset: str = corpus.BUILTIN
    text_column: str = "text"
    context_size: int = 128
    producers: int = 1
    workers: int = 1
    eval_contexts: int = 16
    eval_suites: str = ""  # extra suites after the core evaluation, e.g. "probing,unlearning" or "all"
    max_l0: float = 0.0  # 0: d_in / 2
    checkpoint_every: int = 100
    log_every: int = 10
    storage: str = "saeforge_runs"
    run_name: str = ""
    address: str = ""
    resume: str = ""

    def hook_point(self) -> HookPoint:
        return HookPoint.parse(self.hook)


# -- validation and preparation ------------------------------------------------------------------

def find_checkpoint(path: str) -> Path:
    """A checkpoint folder, or the newest checkpoint inside a run folder."""
    folder = Path(path).expanduser().resolve()
    if is_checkpoint(folder):
        return folder
    candidates = sorted((p for p in folder.glob("checkpoint_*") if is_checkpoint(p)), key=lambda p: p.stat().st_mtime) \
        if folder.is_dir() else []
    if not candidates:
        raise UserError(f"cannot resume from '{path}': no saeforge checkpoint there")
    return candidates[-1]


def resume_args(path: str) -> tuple[TrainArgs, Path, dict]:
    """The original run's arguments and MLflow run id, from the checkpoint it left."""
    checkpoint = find_checkpoint(path)
    try:
        info = json.loads((checkpoint / RUN_INFO_FILE).read_text())
        args = TrainArgs(**info["train_args"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"cannot resume from '{path}': the checkpoint has no readable {RUN_INFO_FILE}") from None
    args.resume = str(checkpoint)
    return args, checkpoint, info


@dataclass
class Plan:
    """What validation produced: everything the run needs, computed once."""

    args: TrainArgs
    spec: ModelSpec
    hook: HookPoint
    variant_cls: type
    variant_cfg: variants.VariantConfig
    d_in: int
    d_sae: int
    special_ids: list[int]
    train_contexts: np.ndarray
    eval_contexts: np.ndarray
    total_steps: int
    batch_rows: int
    run_info: dict


def plan_run(args: TrainArgs) -> Plan:
    """Check every input and prepare the token contexts; raises UserError on bad input."""
    run_info: dict = {}
    checkpoint = None
    if args.resume:
        args, checkpoint, run_info = resume_args(args.resume)
    for name in ("tokens", "context_size", "producers", "workers", "eval_contexts"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.context_size < 2:
        raise UserError("--context-size must be at least 2 (BOS + one token)")
    variant_cls = variants.get(args.variant) if args.variant in variants.names() else None
    if variant_cls is None:
        raise UserError(str(variants.UnknownVariant(args.variant)))
    hook = args.hook_point()
    spec = resolve_model(args.model)  # prepares (de-quantises) the packaged Gemma the first time
    config = load_config(spec)
    hook.check(config.num_hidden_layers, args.model)
    d_in = config.hidden_size
    d_sae = args.d_sae or 8 * d_in
    try:
        variant_cfg = variant_cls.Config.build(d_in=d_in, d_sae=d_sae, overrides=args.overrides)
        variant_cls(variant_cfg)  # sizes a variant cannot take (e.g. groups) fail here, not in a worker
    except (variants.ConfigError, ValueError) as err:
        raise UserError(str(err)) from None
    if args.eval_suites:
        eval_suites.parse_suites(args.eval_suites)  # unknown suite names fail here, before any work
    if args.max_l0 <= 0:
        args.max_l0 = d_in / 2

    tokenizer = load_tokenizer(spec)
    special = corpus.special_ids(tokenizer)
    per_context = args.context_size - 1
    n_contexts = math.ceil(args.tokens / per_context * 1.05) + args.workers
    train = corpus.pack_contexts(corpus.split_texts(args.dataset, "train", args.text_column), tokenizer,
                                 args.context_size, n_contexts)
    if checkpoint is not None:
        train = _skip_trained(train, special, int(run_info.get("tokens_seen", 0)))
    valid_tokens = int(corpus.valid_mask(train, special).sum())
    if valid_tokens == 0:
        raise UserError(f"dataset '{args.dataset}' yields no tokens to train on"
                        + (" (after the part already trained)" if checkpoint is not None else ""))
    evals = corpus.pack_contexts(corpus.split_texts(args.dataset, "eval", args.text_column), tokenizer,
                                 args.context_size, args.eval_contexts)
    if len(evals) == 0:
        raise UserError(f"dataset '{args.dataset}' has no held-out documents to evaluate on")
    batch_rows = variant_cfg.batch_size if variant_cls.batch_layout == "tokens" \
        else max(args.workers, variant_cfg.batch_size // args.context_size)
    budget = min(args.tokens, valid_tokens) if variant_cls.batch_layout == "tokens" else len(train) * per_context
    total_steps = run_info.get("total_steps") or max(1, budget // variant_cfg.batch_size)
    return Plan(args, spec, hook, variant_cls, variant_cfg, d_in, d_sae, special, train, evals, total_steps,
                batch_rows, run_info)


def _skip_trained(contexts: np.ndarray, special: list[int], tokens_seen: int) -> np.ndarray:
    """Drop the leading contexts whose tokens the checkpoint already trained on."""
    cumulative = np.cumsum(corpus.valid_mask(contexts, special).sum(1))
    return contexts[int(np.searchsorted(cumulative, tokens_seen, side="right")):]


# -- the run -------------------------------------------------------------------------------------

def connect_ray(address: str = "", dashboard: bool = False) -> None:
    """Attach to a cluster (--address / RAY_ADDRESS, as inside `ray job submit`), else start a
    private local Ray with generously declared logical CPUs (see NOTES-APIS.md).

    `dashboard=True` (Tune searches) also starts the local dashboard and points
    RAY_API_SERVER_ADDRESS at it: Ray Train cleans up the placement group of a trial stopped
    early through the state API, and without it the next trial waits forever."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address)
        return
    extra: dict = {}
    if dashboard:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"  # before init: Ray's processes inherit it
        extra = {"dashboard_host": "127.0.0.1", "dashboard_port": port}
    ray.init(address="local", num_cpus=max(8, 2 * (os.cpu_count() or 1)), include_dashboard=dashboard, **extra)


def _gpu_shares(producers: int, workers: int) -> tuple[float, bool]:
    """GPUs per producer and whether trainers use GPUs: whole GPUs when there are enough, else
    every actor shares them equally."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus <= 0:
        return 0.0, False
    return (1.0 if gpus >= producers + workers else gpus / (producers + workers)), True


def worker_config(plan: Plan, producer_spec: ProducerSpec, uri: str, run_id: str, threads: int) -> dict:
    args = plan.args
    return {
        "variant": args.variant, "overrides": args.overrides, "d_in": plan.d_in, "d_sae": plan.d_sae,
        "producer_spec": producer_spec, "column": plan.hook.name, "batch_rows": plan.batch_rows,
        "total_steps": plan.total_steps, "log_every": args.log_every, "checkpoint_every": args.checkpoint_every,
        "resume_from": args.resume or None, "tracking_uri": uri, "run_id": run_id, "threads": threads,
        "sae_meta": sae_meta(plan),
        "run_info": {"run_id": run_id, "train_args": asdict(args), "total_steps": plan.total_steps},
    }


def sae_meta(plan: Plan) -> dict:
    return {"model_name": plan.args.model, "hook_name": plan.hook.name, "hook_layer": plan.hook.layer,
            "context_size": plan.args.context_size, "dataset_path": plan.args.dataset}


def fit(plan: Plan, uri: str, run_id: str):
    """Producers -> object store -> TorchTrainer workers. Returns Ray Train's Result (its
    checkpoint is the final one; its metrics carry steps, tokens and training seconds)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    args = plan.args
    cores = os.cpu_count() or 1
    gpus_per_producer, use_gpu = _gpu_shares(args.producers, args.workers)
    spec = ProducerSpec(plan.spec, (plan.hook,), tuple(plan.special_ids), plan.variant_cls.batch_layout,
                        threads=max(1, cores // args.producers))
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # our own progress lines instead
    dataset = activation_dataset(plan.train_contexts, spec, producers=args.producers,
                                 gpus_per_producer=gpus_per_producer)
    resources = {"CPU": 1, **({"GPU": gpus_per_producer} if use_gpu and gpus_per_producer < 1 else {})}
    storage = Path(args.storage).expanduser().resolve()
    trainer = TorchTrainer(
        train_loop_per_worker=worker_loop,
        train_loop_config=worker_config(plan, spec, uri, run_id, threads=max(1, cores // args.workers)),
        scaling_config=ray.train.ScalingConfig(num_workers=args.workers, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        datasets={"train": dataset},
        run_config=ray.train.RunConfig(
            name=args.run_name, storage_path=str(storage),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=0)),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    return result


def run_train(args: TrainArgs, progress=print) -> dict:
    """The whole `saeforge train`: returns a summary dict (also printed by the CLI)."""
    import mlflow

    started = time.time()
    plan = plan_run(args)
    args = plan.args
    resumed_run = plan.run_info.get("run_id") if args.resume else None
    args.run_name = args.run_name or f"{args.variant}-{plan.hook.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.resume:
        args.run_name = f"{Path(args.resume).parent.name}-resumed-{time.strftime('%H%M%S')}"
    progress(f"saeforge: {args.variant} SAE (d_sae {plan.d_sae}) on {plan.hook.name} of {args.model}, "
             f"{plan.total_steps} steps of {plan.variant_cfg.batch_size} tokens, "
             f"{len(plan.train_contexts)} contexts, {args.producers} producer(s), {args.workers} worker(s)")

    uri = tracking.use_store()
    experiment_id = tracking.ensure_experiment(tracking.experiment_name(plan.spec.short_name, plan.hook.name), uri)
    connect_ray(args.address)
    with mlflow.start_run(run_id=resumed_run, experiment_id=None if resumed_run else experiment_id,
                          run_name=None if resumed_run else args.run_name) as run:
        if not resumed_run:
            mlflow.log_params({**{k: v for k, v in asdict(args).items() if k != "overrides"},
                               **{f"sae.{k}": v for k, v in plan.variant_cfg.to_dict().items()},
                               "total_steps": plan.total_steps})
        result = fit(plan, uri, run.info.run_id)
        checkpoint = Path(result.checkpoint.path)
        train_tokens_per_s = result.metrics["tokens_seen"] / max(result.metrics["train_seconds"], 1e-9)
        train_seconds = time.time() - started

        from saeforge.evaluation import evaluate_core
        from saeforge.sae_io import load_sae, save_sae

        variant, _ = load_sae(checkpoint / "sae")
        progress(f"saeforge: evaluating on {len(plan.eval_contexts)} held-out contexts...")
        model = load_model(plan.spec)
        results = evaluate_core(model, variant, plan.hook, plan.eval_contexts, plan.special_ids,
                                progress=lambda done, total: progress(f"  eval {done}/{total} contexts"))
        mlflow.log_metrics({f"eval/{k}": v for k, v in results.items() if math.isfinite(v)})
        mlflow.log_metrics({"train_seconds": train_seconds, "train_tokens_per_s": train_tokens_per_s})
        sae_dir = Path(checkpoint) / "final_sae"
        save_sae(variant, sae_dir, sae_meta(plan))
        mlflow.log_artifacts(str(sae_dir), artifact_path="sae")
        mlflow.log_dict(results, "eval/core.json")
        extra = [n for n in eval_suites.parse_suites(args.eval_suites) if n != "core"] if args.eval_suites else []
        if extra:
            from saeforge.eval_job import run_suites
            from saeforge.sae_io import sae_cfg

            suites = run_suites(variant, sae_cfg(variant, sae_meta(plan)), extra, model=model,
                                model_name=args.model, dataset=args.dataset, progress=progress)
            for suite, outcome in suites.items():
                mlflow.log_metrics({f"eval/{suite}/{k}": v for k, v in outcome.metrics.items() if math.isfinite(v)})
                mlflow.log_dict(outcome.to_dict(), f"eval/{suite}.json")
        name = tracking.registered_model_name(plan.spec.short_name, plan.hook.name, args.variant)
        version = tracking.log_and_register(sae_dir, plan.d_in, plan.d_sae, name)
        moved, reason = tracking.promote_if_better(name, version, results, args.max_l0)
    summary = {
        "run_id": run.info.run_id, "experiment_id": run.info.experiment_id, "tracking_uri": uri,
        "registered_model": name, "version": int(version), "champion": moved, "champion_reason": reason,
        "checkpoint": str(checkpoint), "metrics": results, "seconds": time.time() - started,
        "train_tokens_per_s": train_tokens_per_s,
    }
    return summary
