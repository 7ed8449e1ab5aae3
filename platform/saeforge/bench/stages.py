"""`saeforge bench`: throughput of each stage, measured side by side in one run.

1. plain single-process forward of the model slice vs the Ray Data producer actors;
2. SAE training alone (the pure loop on activations already in memory);
3. a plain single-process loop (slice forward + SAE step) vs the whole Ray pipeline
   (producers -> object store -> Ray Train worker), both counted from their first batch, and the
   Ray pipeline's wall time including its start-up.
Figures are real tokens per second; ratios compare figures from this run only.
"""

from __future__ import annotations

import dataclasses
import time
from types import SimpleNamespace

import numpy as np
import torch

from saeforge.core.corpus import valid_mask
from saeforge.core.training import make_optimizer, start_fresh, train_loop
from saeforge.errors import UserError
from saeforge.jobs.arguments import BenchArgs, TrainArgs
from saeforge.jobs.data.activation_stream import BATCH_CONTEXTS, MASK_COLUMN, ActivationProducer, activation_dataset
from saeforge.jobs.plan import RunPlan
from saeforge.jobs.runtime.ray_cluster import connect_ray, cores, plan_resources
from saeforge.jobs.train.driver import run_train, train_on_ray
from saeforge.jobs.validate import hook_points, plan_train


def _say(text: str) -> None:
    print(f"[bench] {text}", flush=True)


def _forward(producer: ActivationProducer, contexts: np.ndarray) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(activations, mask) per producer batch of contexts, in this process."""
    column = producer.spec.hooks[0].name
    out = []
    for i in range(0, len(contexts), BATCH_CONTEXTS):
        block = contexts[i : i + BATCH_CONTEXTS]
        rows = producer({"context_id": np.arange(len(block)), "input_ids": block})
        out.append((torch.from_numpy(rows[column]), torch.from_numpy(rows[MASK_COLUMN])))
    return out


def _steps(blocks: list[tuple[torch.Tensor, torch.Tensor]], per_step: int):
    """Regroup producer batches into steps of `per_step` whole contexts."""
    acts = torch.cat([a for a, _ in blocks])
    mask = torch.cat([m for _, m in blocks])
    for i in range(0, len(acts) - per_step + 1, per_step):
        yield acts[i : i + per_step], mask[i : i + per_step]


def _plain_stream(producer: ActivationProducer, contexts: np.ndarray, per_step: int):
    """Forward contexts and cut the activations into steps, in one process (the plain loop)."""
    for i in range(0, len(contexts) - per_step + 1, per_step):
        yield from _steps(_forward(producer, contexts[i : i + per_step]), per_step)


def _train_tokens_per_s(plan: RunPlan, batches) -> float:
    variant = plan.build_variant()
    start = time.perf_counter()
    state = train_loop(variant, start_fresh(variant, batches), dataclasses.replace(plan.loop, log_every=10**9))
    return state.tokens_seen / (time.perf_counter() - start)


def check_one_layer(args: BenchArgs) -> None:
    """Every mode but --layers measures one layer: a list in --layer is one line, exit 2."""
    if len(hook_points(SimpleNamespace(layer=args.layer, site="resid_post"))) > 1:
        raise UserError(
            f"--layer {args.layer}: this bench reads one layer (--layers {args.layer} compares a run of them all)"
        )


def run_bench(args: BenchArgs) -> dict:
    torch.set_num_threads(cores())
    plan, contexts = plan_train(
        TrainArgs(
            model=args.model,
            layer=args.layer,
            variant=args.variant,
            tokens=args.tokens,
            d_sae=args.d_sae,
            producers=args.producers,
            eval_contexts=1,
            log_every=10_000,
            checkpoint_every=10_000,
            storage="/tmp/saeforge_bench",
        )
    )
    per_step = plan.stream.contexts_per_step
    train = contexts.train.pack()  # a bench's few thousand contexts, in this process
    figures: dict = {
        "model": args.model,
        "hook": plan.hook.name,
        "variant": args.variant,
        "d_sae": plan.variant.d_sae,
        "contexts_per_step": per_step,
        "tokens": args.tokens,
        "cpu_cores": cores(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    real_tokens = int(valid_mask(train, list(plan.stream.special_ids)).sum())

    _say("1/4 plain single-process forward of the slice")
    producer = ActivationProducer(plan.stream, threads=cores())
    _forward(producer, train[:2])  # warm-up (allocations, first-call overheads)
    start = time.perf_counter()
    blocks = _forward(producer, train)
    figures["plain_forward_tok_s"] = real_tokens / (time.perf_counter() - start)

    _say("2/4 SAE training alone on activations in memory")
    figures["sae_train_tok_s"] = _train_tokens_per_s(plan, _steps(blocks, per_step))

    _say("3/4 plain single-process loop: slice forward + SAE step")
    figures["plain_loop_tok_s"] = _train_tokens_per_s(plan, _plain_stream(producer, train, per_step))
    del producer, blocks

    _say("4/4 Ray: producer actors alone, then the whole pipeline into a Ray Train worker")
    connect_ray()
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    plan = dataclasses.replace(plan, resources=plan_resources(plan, workers=1))
    start = time.perf_counter()
    first, rows = None, 0
    for batch in activation_dataset(
        train, plan.stream, producers=args.producers, threads=plan.resources.producer_threads
    ).iter_batches(batch_size=None):
        if first is None:
            first = time.perf_counter()
        else:
            rows += int(batch[MASK_COLUMN].sum())
    end = time.perf_counter()
    figures["ray_producer_tok_s"] = rows / max(end - first, 1e-9)
    figures["ray_producer_with_startup_tok_s"] = real_tokens / max(end - start, 1e-9)
    start = time.perf_counter()
    result = train_on_ray(plan, contexts, name=f"bench-{int(time.time())}")
    wall = time.perf_counter() - start
    figures["ray_end_to_end_tok_s"] = result.metrics["tokens_seen"] / result.metrics["train_seconds"]
    figures["ray_end_to_end_with_startup_tok_s"] = result.metrics["tokens_seen"] / wall
    figures["ratio_ray_producer_vs_plain_forward"] = figures["ray_producer_tok_s"] / figures["plain_forward_tok_s"]
    figures["ratio_end_to_end_vs_plain_loop"] = figures["ray_end_to_end_tok_s"] / figures["plain_loop_tok_s"]
    figures["ratio_end_to_end_with_startup_vs_plain_loop"] = (
        figures["ray_end_to_end_with_startup_tok_s"] / figures["plain_loop_tok_s"]
    )
    width = max(map(len, figures))
    for key, value in figures.items():
        _say(f"{key:<{width}}  {value:,.3f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    return figures


def run_variant_table(args: BenchArgs, names: list[str]) -> list[dict]:
    """One full `saeforge train` per variant (same tokens, same d_sae, real pipeline, registered
    in MLflow) and a table of the figures the variants are compared on."""
    rows = []
    for name in names:
        _say(f"variant {name}")
        summary = run_train(
            TrainArgs(
                model=args.model,
                layer=args.layer,
                variant=name,
                tokens=args.tokens,
                d_sae=args.d_sae,
                eval_contexts=args.eval_contexts,
                run_name=f"table-{name}-{int(time.time())}",
            )
        )
        m = summary["metrics"]
        rows.append(
            {
                "variant": name,
                "l0": m["l0"],
                "explained_variance": m["explained_variance"],
                "ce_loss_recovered": m["ce_loss_recovered"],
                "mean_abs_corr": m["mean_abs_corr"],
                "train_tok_s": summary["train_tokens_per_s"],
                "diagnostics": {k[5:]: round(v, 4) for k, v in m.items() if k.startswith("diag/")},
            }
        )
    print("| variant | L0 | explained var. | CE loss recovered | mean abs corr | train tok/s | variant diagnostics |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['l0']:.1f} | {r['explained_variance']:.3f} | {r['ce_loss_recovered']:.3f} | "
            f"{r['mean_abs_corr']:.3f} | {r['train_tok_s']:,.0f} | {r['diagnostics']} |"
        )
    return rows


def run_step_costs(args: BenchArgs, batch_tokens: int = 1024) -> dict:
    """Milliseconds per optimiser step of every variant on the same real activations (same batch
    of whole contexts and d_sae, each variant in its own layout), relative to relu."""
    import variants
    from saeforge.core.batches import sae_input

    torch.set_num_threads(1)  # one core each, as a Ray Train worker beside a producer gets
    plan, contexts = plan_train(
        TrainArgs(
            model=args.model,
            layer=args.layer,
            tokens=batch_tokens * 2,
            eval_contexts=1,
            overrides={"batch_size": str(batch_tokens)},
        )
    )
    train = contexts.train.pack()
    acts = torch.cat([a for a, _ in _forward(ActivationProducer(plan.stream, threads=cores()), train)])
    mask = torch.from_numpy(valid_mask(train, list(plan.stream.special_ids)))
    per_step = plan.stream.contexts_per_step
    acts, mask = acts[:per_step], mask[:per_step]
    d_sae = args.d_sae or plan.variant.d_sae
    ms: dict[str, float] = {}
    for _ in range(2):  # two rounds, best of each: less noise from whatever else runs
        for name in variants.names():
            sae = variants.build(name, d_in=plan.variant.d_in, d_sae=d_sae)
            next(start_fresh(sae, [(acts, mask)]))
            optimizer = make_optimizer(sae)
            x, m = sae_input(sae, acts, mask)
            times = []
            for step in range(6):
                start = time.perf_counter()
                out = sae(x, step, m)
                optimizer.zero_grad()
                out.total.backward()
                optimizer.step()
                sae.after_step(step)
                times.append(time.perf_counter() - start)
            ms[name] = min(ms.get(name, float("inf")), 1000 * min(times[1:]))
    for name, value in ms.items():
        _say(f"{name:<18} {value:8.1f} ms/step  {value / ms['relu']:5.2f}x relu")
    return ms
