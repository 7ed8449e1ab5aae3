"""`saeforge bench` (no mode flag): the throughput of each stage, measured side by side in one run.

1. plain single-process forward of the model slice vs the Ray Data producer actors;
2. SAE training alone (the pure loop on activations already in memory);
3. a plain single-process loop (slice forward + SAE step) vs the whole Ray pipeline
   (producers -> object store -> Ray Train worker), both counted from their first batch, and the
   Ray pipeline's wall time including its start-up.
Figures are real tokens per second; ratios compare figures from this run only.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time

import numpy as np
import torch

from saeforge.bench.plain_loop import forward, plain_stream, steps, train_tokens_per_s
from saeforge.bench.processes import train_args
from saeforge.core.corpus import valid_mask
from saeforge.jobs.arguments import BenchArgs
from saeforge.jobs.data.activation_stream import MASK_COLUMN, ActivationProducer, activation_dataset
from saeforge.jobs.plan import Contexts, RunPlan
from saeforge.jobs.runtime.ray_cluster import connect_ray, cores, plan_resources
from saeforge.jobs.train.driver import train_on_ray
from saeforge.jobs.validate import plan_train


def say(text: str) -> None:
    print(f"[bench] {text}", flush=True)


def run_stages(args: BenchArgs) -> dict:
    """Every stage's tokens/s and the ratios between them; printed and returned."""
    torch.set_num_threads(cores())
    work = dataclasses.replace(
        train_args(args),
        producers=args.producers,
        eval_contexts=1,
        log_every=10_000,
        checkpoint_every=10_000,
        storage=tempfile.mkdtemp(prefix="saeforge-bench-"),
    )
    plan, contexts = plan_train(work)
    train = contexts.train.pack()  # a bench's few thousand contexts, in this process
    figures: dict = {
        "model": args.model,
        "hook": plan.hook.name,
        "variant": args.variant,
        "d_sae": plan.variant.d_sae,
        "contexts_per_step": plan.stream.contexts_per_step,
        "tokens": args.tokens,
        "cpu_cores": cores(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    real_tokens = int(valid_mask(train, list(plan.stream.special_ids)).sum())
    figures.update(plain_figures(plan, train, real_tokens))
    figures.update(ray_figures(args, plan, contexts, train, real_tokens))
    figures["ratio_ray_producer_vs_plain_forward"] = figures["ray_producer_tok_s"] / figures["plain_forward_tok_s"]
    figures["ratio_end_to_end_vs_plain_loop"] = figures["ray_end_to_end_tok_s"] / figures["plain_loop_tok_s"]
    figures["ratio_end_to_end_with_startup_vs_plain_loop"] = (
        figures["ray_end_to_end_with_startup_tok_s"] / figures["plain_loop_tok_s"]
    )
    width = max(map(len, figures))
    for key, value in figures.items():
        say(f"{key:<{width}}  {value:,.3f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    return figures


def plain_figures(plan: RunPlan, train: np.ndarray, real_tokens: int) -> dict:
    """Stages 1-3 in this process: the forward alone, the SAE alone, both in one loop."""
    per_step = plan.stream.contexts_per_step
    say("1/4 plain single-process forward of the slice")
    producer = ActivationProducer(plan.stream, threads=cores())
    forward(producer, train[:2])  # warm-up (allocations, first-call overheads)
    start = time.perf_counter()
    blocks = forward(producer, train)
    figures = {"plain_forward_tok_s": real_tokens / (time.perf_counter() - start)}
    say("2/4 SAE training alone on activations in memory")
    figures["sae_train_tok_s"] = train_tokens_per_s(plan, steps(blocks, per_step))
    say("3/4 plain single-process loop: slice forward + SAE step")
    figures["plain_loop_tok_s"] = train_tokens_per_s(plan, plain_stream(producer, train, per_step))
    return figures


def ray_figures(args: BenchArgs, plan: RunPlan, contexts: Contexts, train: np.ndarray, real_tokens: int) -> dict:
    """Stage 4 on Ray: the producer actors alone, then the whole pipeline into a Ray Train worker."""
    say("4/4 Ray: producer actors alone, then the whole pipeline into a Ray Train worker")
    connect_ray()
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    plan = dataclasses.replace(plan, resources=plan_resources(plan, workers=1))
    start = time.perf_counter()
    first, rows = None, 0
    dataset = activation_dataset(train, plan.stream, producers=args.producers, threads=plan.resources.producer_threads)
    for batch in dataset.iter_batches(batch_size=None):
        if first is None:
            first = time.perf_counter()
        else:
            rows += int(batch[MASK_COLUMN].sum())
    end = time.perf_counter()
    figures = {
        "ray_producer_tok_s": rows / max(end - first, 1e-9),
        "ray_producer_with_startup_tok_s": real_tokens / max(end - start, 1e-9),
    }
    start = time.perf_counter()
    result = train_on_ray(plan, contexts, name=f"bench-{int(time.time())}")
    wall = time.perf_counter() - start
    figures["ray_end_to_end_tok_s"] = result.metrics["tokens_seen"] / result.metrics["train_seconds"]
    figures["ray_end_to_end_with_startup_tok_s"] = result.metrics["tokens_seen"] / wall
    return figures
