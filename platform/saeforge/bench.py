"""`saeforge bench`: throughput of each stage, measured side by side in one run.

1. plain single-process forward of the model slice vs the Ray Data producer actors;
2. SAE training alone (the pure loop on activations already in memory);
3. a plain single-process loop (slice forward + SAE step) vs the whole Ray pipeline
   (producers -> object store -> Ray Train worker), both counted from their first batch, and the
   Ray pipeline's wall time including its start-up.
Figures are tokens (real activation rows) per second; ratios compare figures from this run only.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

import variants
from saeforge.activations import ActivationProducer, ProducerSpec, activation_dataset
from saeforge.hooks import HookPoint
from saeforge.train_job import TrainArgs, connect_ray, fit, plan_run
from saeforge.training import estimate_act_scale, train_loop

BATCH_CONTEXTS = 16


def _say(text: str) -> None:
    print(f"[bench] {text}", flush=True)


def _plain_forward(producer: ActivationProducer, contexts: np.ndarray) -> tuple[float, list[np.ndarray]]:
    """Tokens/s of the slice forward in this process, and the activations it produced."""
    column = producer.spec.hooks[0].name
    producer({"input_ids": contexts[:2]})  # warm-up (allocations, first-call overheads)
    rows, out = 0, []
    start = time.perf_counter()
    for i in range(0, len(contexts), BATCH_CONTEXTS):
        acts = producer({"input_ids": contexts[i:i + BATCH_CONTEXTS]})[column]
        rows += len(acts)
        out.append(acts)
    return rows / (time.perf_counter() - start), out


def _ray_producers(spec: ProducerSpec, contexts: np.ndarray, producers: int) -> tuple[float, float]:
    """Tokens/s through Ray Data actors: from the first batch on, and including actor start-up."""
    start = time.perf_counter()
    ds = activation_dataset(contexts, spec, producers=producers, batch_contexts=BATCH_CONTEXTS)
    steady_rows, all_rows, first = 0, 0, None
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        n = len(batch[spec.hooks[0].name])
        all_rows += n
        if first is None:
            first = time.perf_counter()
        else:
            steady_rows += n
    end = time.perf_counter()
    return steady_rows / max(end - first, 1e-9), all_rows / max(end - start, 1e-9)


def _batches(acts: np.ndarray, batch_rows: int):
    for i in range(0, len(acts) - batch_rows + 1, batch_rows):
        yield torch.from_numpy(acts[i:i + batch_rows]), None


def run_bench(model: str = "gemma-3-270m", layer: int = 6, tokens: int = 60_000, d_sae: int = 0,
              variant: str = "relu", producers: int = 1) -> dict:
    torch.set_num_threads(os.cpu_count() or 1)
    args = TrainArgs(model=model, hook=str(layer), variant=variant, tokens=tokens, d_sae=d_sae, producers=producers,
                     eval_contexts=1, log_every=10_000, checkpoint_every=10_000, storage="/tmp/saeforge_bench",
                     run_name=f"bench-{int(time.time())}")
    plan = plan_run(args)
    batch_rows = plan.variant_cfg.batch_size
    hook = HookPoint.parse(str(layer))
    spec = ProducerSpec(plan.spec, (hook,), tuple(plan.special_ids), threads=os.cpu_count() or 1)
    figures: dict = {"model": model, "hook": hook.name, "variant": variant, "d_sae": plan.d_sae,
                     "batch_tokens": batch_rows, "tokens": tokens, "cpu_cores": os.cpu_count(),
                     "device": "cuda" if torch.cuda.is_available() else "cpu"}

    _say("1/4 plain single-process forward of the slice")
    producer = ActivationProducer(spec)
    figures["plain_forward_tok_s"], chunks = _plain_forward(producer, plan.train_contexts)
    acts = np.concatenate(chunks)

    _say("2/4 SAE training alone on activations in memory")
    sae = variants.build(variant, d_in=plan.d_in, d_sae=plan.d_sae, overrides=args.overrides)
    sae.act_scale.fill_(estimate_act_scale(torch.from_numpy(acts[:batch_rows])))
    steps = len(acts) // batch_rows
    start = time.perf_counter()
    train_loop(sae, _batches(acts, batch_rows), steps, log_every=10**9)
    figures["sae_train_tok_s"] = steps * batch_rows / (time.perf_counter() - start)

    _say("3/4 plain single-process loop: slice forward + SAE step")
    sae = variants.build(variant, d_in=plan.d_in, d_sae=plan.d_sae, overrides=args.overrides)
    sae.act_scale.fill_(estimate_act_scale(torch.from_numpy(acts[:batch_rows])))
    start = time.perf_counter()
    seen = train_loop(sae, _plain_stream(producer, plan.train_contexts, batch_rows), steps, log_every=10**9)
    figures["plain_loop_tok_s"] = seen.tokens_seen / (time.perf_counter() - start)
    del producer

    _say("4/4 Ray: producer actors alone, then the whole pipeline into a Ray Train worker")
    connect_ray()
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    figures["ray_producer_tok_s"], figures["ray_producer_with_startup_tok_s"] = _ray_producers(
        spec, plan.train_contexts, producers)
    start = time.perf_counter()
    result = fit(plan, uri="", run_id="")
    wall = time.perf_counter() - start
    figures["ray_end_to_end_tok_s"] = result.metrics["tokens_seen"] / result.metrics["train_seconds"]
    figures["ray_end_to_end_with_startup_tok_s"] = result.metrics["tokens_seen"] / wall
    figures["ratio_ray_producer_vs_plain_forward"] = figures["ray_producer_tok_s"] / figures["plain_forward_tok_s"]
    figures["ratio_end_to_end_vs_plain_loop"] = figures["ray_end_to_end_tok_s"] / figures["plain_loop_tok_s"]
    figures["ratio_end_to_end_with_startup_vs_plain_loop"] = (
        figures["ray_end_to_end_with_startup_tok_s"] / figures["plain_loop_tok_s"])
    width = max(map(len, figures))
    for key, value in figures.items():
        _say(f"{key:<{width}}  {value:,.3f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    return figures


def _plain_stream(producer: ActivationProducer, contexts: np.ndarray, batch_rows: int):
    """Forward contexts and cut the activations into SAE batches, in one process."""
    column = producer.spec.hooks[0].name
    buffer = np.empty((0, producer.model.config.hidden_size), np.float32)
    for i in range(0, len(contexts), BATCH_CONTEXTS):
        buffer = np.concatenate([buffer, producer({"input_ids": contexts[i:i + BATCH_CONTEXTS]})[column]])
        while len(buffer) >= batch_rows:
            yield torch.from_numpy(buffer[:batch_rows].copy()), None
            buffer = buffer[batch_rows:]


def run_variant_table(model: str, layer: int, tokens: int, d_sae: int, names: list[str],
                      eval_contexts: int = 16) -> list[dict]:
    """One full `saeforge train` per variant (same tokens, same d_sae, real pipeline, registered
    in MLflow) and a table of the figures the variants are compared on."""
    from saeforge.train_job import run_train

    rows = []
    for name in names:
        _say(f"variant {name}")
        summary = run_train(TrainArgs(model=model, hook=str(layer), variant=name, tokens=tokens, d_sae=d_sae,
                                      eval_contexts=eval_contexts, run_name=f"table-{name}-{int(time.time())}"))
        m = summary["metrics"]
        rows.append({"variant": name, "l0": m["l0"], "explained_variance": m["explained_variance"],
                     "ce_loss_recovered": m["ce_loss_recovered"], "mean_abs_corr": m["mean_abs_corr"],
                     "train_tok_s": summary["train_tokens_per_s"],
                     "diagnostics": {k[5:]: round(v, 4) for k, v in m.items() if k.startswith("diag/")}})
    print("| variant | L0 | explained var. | CE loss recovered | mean abs corr | train tok/s | variant diagnostics |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['l0']:.1f} | {r['explained_variance']:.3f} | {r['ce_loss_recovered']:.3f} | "
              f"{r['mean_abs_corr']:.3f} | {r['train_tok_s']:,.0f} | {r['diagnostics']} |")
    return rows


def run_step_costs(model: str, layer: int, d_sae: int, batch_tokens: int = 1024, context: int = 128) -> dict:
    """Milliseconds per optimiser step of every variant on the same real activations (same batch
    and d_sae; context-layout variants get the batch as whole contexts), relative to relu."""
    from saeforge.training import make_optimizer

    torch.set_num_threads(1)  # one core each, as a Ray Train worker beside a producer gets
    plan = plan_run(TrainArgs(model=model, hook=str(layer), tokens=batch_tokens * 2, eval_contexts=1,
                              context_size=context))
    spec = ProducerSpec(plan.spec, (plan.hook,), tuple(plan.special_ids), threads=os.cpu_count() or 1)
    _, chunks = _plain_forward(ActivationProducer(spec), plan.train_contexts)
    acts = torch.from_numpy(np.concatenate(chunks)[:batch_tokens])
    acts = acts * estimate_act_scale(acts)
    d_sae = d_sae or plan.d_sae
    ms = {}
    for _ in range(2):  # two rounds, best of each: less noise from whatever else runs
        for name in variants.names():
            sae = variants.build(name, d_in=plan.d_in, d_sae=d_sae)
            optimizer = make_optimizer(sae)
            x, mask = acts, None
            if sae.batch_layout == "contexts":
                x = acts[: batch_tokens // context * context].reshape(-1, context, plan.d_in)
                mask = torch.ones(x.shape[:2], dtype=torch.bool)
            times = []
            for step in range(6):
                start = time.perf_counter()
                out = sae(x, step, mask)
                optimizer.zero_grad()
                out.total.backward()
                optimizer.step()
                sae.after_step(step)
                times.append(time.perf_counter() - start)
            ms[name] = min(ms.get(name, float("inf")), 1000 * min(times[1:]))
    for name, value in ms.items():
        _say(f"{name:<18} {value:8.1f} ms/step  {value / ms['relu']:5.2f}x relu")
    return ms
