"""How much any schedule of the same work can gain over the plain loop on this machine's cores
(measured: docs/benchmarks.md#what-any-schedule-can-reach-on-2-cores).

The plain loop alternates the slice's forward and the SAE step in one process, each on every
core. A platform can only beat it by running the two halves side by side, each on part of the
cores; that pays when a half runs less efficiently per core on more threads. This script measures
exactly that, side by side in one invocation, on the work of `saeforge bench --same-work`
(Gemma 3 270M to layer 6 in the run's precision, batches of 16 contexts; relu at d_sae 4096,
steps of 8 contexts):

1. each half alone at every thread count up to the cores (tokens/s, the median of `--rounds`);
2. the split that overlaps them: one process forwarding and one training at the same time, with
   the cores divided between them (default 1 + 1 on 2 cores), each timed over the same window;
3. from those: the training phase of the same-work run (`--tokens`) done serially (the plain
   loop's schedule, and a produce-first run's: forward on all cores, then the steps on all cores),
   done by the measured split (a pipeline runs at its slower half), and the ceiling of any
   schedule (every core busy all the time at the most efficient per-core rate measured).

The ceiling is what a platform could save before it pays any start-up of its own (Ray, its
actors, Ray Train's worker group); `saeforge bench --same-work` measures those.

    .venv/bin/python benchmarks/overlap_bound.py [--rounds 2] [--tokens 200000] [--window 20]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from saeforge.core.corpus import valid_mask
from saeforge.core.training import start_fresh, train_loop
from saeforge.jobs.arguments import TrainArgs
from saeforge.jobs.data.activation_stream import BATCH_CONTEXTS, ActivationProducer
from saeforge.jobs.validate import plan_train

FORWARD_CONTEXTS = 160  # contexts per forward measurement (10 producer batches)
SAE_STEPS = 40  # steps per SAE measurement


MEASURED_TOKENS = 60_000  # contexts tokenised for the measurements (--tokens only scales the result)


def setup():
    """The same-work run's plan and enough training contexts for every measurement."""
    work = TrainArgs(variant="relu", d_sae=4096, tokens=MEASURED_TOKENS, eval_contexts=4)
    plan, contexts = plan_train(work, lambda *_: None)
    return plan, np.asarray(contexts.train.pack())


def forward(producer: ActivationProducer, ids: np.ndarray) -> torch.Tensor:
    """The activations of `ids`, forwarded in producer batches; their real-token count is taken by
    the caller."""
    name = producer.spec.hooks[0].name
    return torch.cat(
        [
            producer.activations(torch.from_numpy(ids[i : i + BATCH_CONTEXTS]))[name]
            for i in range(0, len(ids), BATCH_CONTEXTS)
        ]
    )


def sae_steps(plan, acts: torch.Tensor, mask: torch.Tensor, steps: int) -> int:
    """`steps` relu SAE steps from a fresh start on (acts, mask), cycling through them; tokens seen."""
    per = plan.stream.contexts_per_step
    n = len(acts) // per

    def batches():
        for s in range(steps):
            i = (s % n) * per
            yield acts[i : i + per], mask[i : i + per]

    variant = plan.build_variant()
    loop = dataclasses.replace(plan.loop, log_every=10**9, total_steps=steps)
    return train_loop(variant, start_fresh(variant, batches()), loop).tokens_seen


def real_tokens(plan, ids: np.ndarray) -> int:
    return int(valid_mask(torch.from_numpy(ids), list(plan.stream.special_ids)).sum())


def solo_rates(plan, producer, ids, acts, mask, threads: int) -> tuple[float, float]:
    """(forward tok/s, SAE step tok/s) alone on `threads` threads."""
    torch.set_num_threads(threads)
    part = ids[:FORWARD_CONTEXTS]
    started = time.perf_counter()
    forward(producer, part)
    fwd = real_tokens(plan, part) / (time.perf_counter() - started)
    started = time.perf_counter()
    seen = sae_steps(plan, acts, mask, SAE_STEPS)
    return fwd, seen / (time.perf_counter() - started)


def child(role: str, threads: int, start_at: float, window: float, data: Path) -> None:
    """One side of the split: forward (role 'forward') or train (role 'sae') on `threads` threads
    from wall-clock `start_at` for `window` seconds; prints the tokens per second it reached."""
    torch.set_num_threads(threads)
    plan, ids = setup()
    saved = torch.load(data)
    producer = ActivationProducer(plan.stream, threads=threads) if role == "forward" else None
    if producer is not None:
        forward(producer, ids[:BATCH_CONTEXTS])  # warm-up
    time.sleep(max(0.0, start_at - time.time()))
    started, done, batch = time.perf_counter(), 0, 0
    while time.perf_counter() - started < window:
        if producer is not None:
            i = (batch * BATCH_CONTEXTS) % (len(ids) - BATCH_CONTEXTS)
            part, batch = ids[i : i + BATCH_CONTEXTS], batch + 1
            forward(producer, part)
            done += real_tokens(plan, part)
        else:
            done += sae_steps(plan, saved["acts"], saved["mask"], 10)
    print(json.dumps({"role": role, "tok_s": done / (time.perf_counter() - started)}), flush=True)


def split_rates(producer_threads: int, trainer_threads: int, window: float, data: Path) -> tuple[float, float]:
    """(forward tok/s, SAE step tok/s) of the two halves running at the same time in two processes."""
    start_at = time.time() + 40  # both processes have loaded the model and the activations by then
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--child",
                role,
                "--threads",
                str(t),
                "--start-at",
                str(start_at),
                "--window",
                str(window),
                "--data",
                str(data),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for role, t in (("forward", producer_threads), ("sae", trainer_threads))
    ]
    rates = {}
    for proc in procs:
        out, _ = proc.communicate()
        line = json.loads(out.strip().splitlines()[-1])
        rates[line["role"]] = line["tok_s"]
    return rates["forward"], rates["sae"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=200_000, help="the same-work run's training tokens")
    parser.add_argument("--window", type=float, default=20.0, help="seconds each side of the split is timed")
    parser.add_argument("--producer-threads", type=int, default=0, help="the split's forward threads (default half)")
    parser.add_argument("--child", choices=["forward", "sae"], help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.threads, args.start_at, args.window, args.data)
        return

    cores = os.cpu_count() or 1
    plan, ids = setup()
    producer = ActivationProducer(plan.stream, threads=cores)
    torch.set_num_threads(cores)
    acts = forward(producer, ids[: plan.stream.contexts_per_step * 12])
    mask = valid_mask(torch.from_numpy(ids[: len(acts)]), list(plan.stream.special_ids))
    print(
        f"{cores} cores, forward in {plan.stream.precision}, relu d_sae {plan.variant.d_sae}, {args.rounds} rounds",
        flush=True,
    )
    solo: dict[int, list[tuple[float, float]]] = {t: [] for t in range(1, cores + 1)}
    for r in range(args.rounds):
        for t in solo:
            solo[t].append(solo_rates(plan, producer, ids, acts, mask, t))
            print(
                f"  round {r + 1}, {t} thread(s): forward {solo[t][-1][0]:,.0f} tok/s, "
                f"SAE steps {solo[t][-1][1]:,.0f} tok/s",
                flush=True,
            )
    fwd = {t: statistics.median(f for f, _ in v) for t, v in solo.items()}
    sae = {t: statistics.median(s for _, s in v) for t, v in solo.items()}

    p = args.producer_threads or max(1, cores // 2)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "acts.pt"
        torch.save({"acts": acts, "mask": mask}, data)
        print(
            f"  the split: forward on {p} thread(s) and SAE steps on {cores - p} at the same time, "
            f"{args.window:.0f} s...",
            flush=True,
        )
        split_fwd, split_sae = split_rates(p, max(1, cores - p), args.window, data)

    n = args.tokens
    serial = n / fwd[cores] + n / sae[cores]
    pipeline = n / min(split_fwd, split_sae)
    per_core = max(fwd[t] / t for t in fwd), max(sae[t] / t for t in sae)
    ceiling = (n / per_core[0] + n / per_core[1]) / cores
    print()
    print("| threads | forward tok/s | per core | SAE steps tok/s | per core |")
    print("|---|---|---|---|---|")
    for t in fwd:
        print(f"| {t} | {fwd[t]:,.0f} | {fwd[t] / t:,.0f} | {sae[t]:,.0f} | {sae[t] / t:,.0f} |")
    print(f"| split {p} + {cores - p}, side by side | {split_fwd:,.0f} | | {split_sae:,.0f} | |")
    print()
    print(f"training phase of {n:,} tokens (forward + SAE steps, no start-up):")
    print(f"  serial, every core on each half in turn (plain loop, produce-first): {serial:.0f} s")
    print(
        f"  pipelined on the measured split (the slower half sets the pace):       {pipeline:.0f} s "
        f"({serial / pipeline:.2f}x serial)"
    )
    print(
        f"  ceiling of any schedule (every core busy at the best per-core rate):   {ceiling:.0f} s "
        f"({serial / ceiling:.2f}x serial)"
    )
    print(f"  the most any schedule saves on {cores} cores: {serial - ceiling:.0f} s, before its own start-up")


if __name__ == "__main__":
    main()
