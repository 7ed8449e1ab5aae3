"""`saeforge bench --same-work`: a plain single-process loop and `saeforge train` on the same
work, back to back, each in a fresh process timed whole (start-up, corpus, training, evaluation).

The plain loop is what a researcher writes by hand with no framework: tokenise the corpus, load
the model slice, forward a step's contexts, take an SAE step, repeat; then load the whole model
and evaluate the SAE on the held-out contexts. It uses saeforge's own pieces for each part (the
same corpus packing, variant, fresh start, schedule and core evaluation), so the two programs do
the same arithmetic on the same tokens and differ only in how the work is run: no Ray, no
MLflow, no checkpoints in the plain loop. Both read the prepared model from the same cache
(prepared before the first round), so neither pays the first-time preparation.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from pathlib import Path

from saeforge.bench.processes import bench_env, timed, train_args, train_command
from saeforge.jobs.arguments import BenchArgs


def run_same_work(args: BenchArgs, say=print) -> dict:
    """`args.rounds` rounds of (plain loop, saeforge train), each a fresh process timed whole."""
    from saeforge.core.model import resolve_model

    work = train_args(args)
    resolve_model(work.model)  # prepared once, before any round is timed
    rounds = []
    with tempfile.TemporaryDirectory(prefix="saeforge-same-work-") as tmp:
        folder = Path(tmp)
        env = bench_env(folder)
        plain_cmd = [sys.executable, "-m", "saeforge.bench.plain_loop", json.dumps(dataclasses.asdict(work))]
        for r in range(1, args.rounds + 1):
            say(f"[bench] round {r}/{args.rounds}: the plain loop...")
            plain_wall, plain = timed(plain_cmd, folder, env)
            say(f"[bench] round {r}/{args.rounds}: saeforge train...")
            train_wall, train = timed(train_command(work, folder / "runs"), folder, env)
            rounds.append(
                {
                    "plain_wall_s": plain_wall,
                    "saeforge_wall_s": train_wall,
                    "ratio": plain_wall / train_wall,  # > 1: saeforge is faster
                    "plain_train_tok_s": plain["train_tokens_per_s"],
                    "saeforge_train_tok_s": train["train_tokens_per_s"],
                    "plain_phases": plain["phase_seconds"],
                    "saeforge_phases": train["phase_seconds"],
                    "plain_metrics": plain["metrics"],
                    "saeforge_metrics": {k: train["metrics"][k] for k in plain["metrics"]},
                }
            )
    say(
        f"[bench] same work: {work.variant}, d_sae {work.d_sae or 'default'}, {work.tokens:,} tokens, "
        f"{work.eval_contexts} eval contexts, {work.model} layer {work.layer}"
    )
    say(
        "| round | plain loop | saeforge train | speed-up (plain / saeforge wall) | "
        "training tok/s: plain (forward + step), saeforge (SAE steps; its forward ran first) |"
    )
    say("|---|---|---|---|---|")
    for i, r in enumerate(rounds, 1):
        say(
            f"| {i} | {r['plain_wall_s']:.0f} s | {r['saeforge_wall_s']:.0f} s | {r['ratio']:.2f}x | "
            f"{r['plain_train_tok_s']:,.0f}, {r['saeforge_train_tok_s']:,.0f} |"
        )
    for i, r in enumerate(rounds, 1):
        for who in ("plain", "saeforge"):
            phases = " | ".join(f"{k} {v:.0f}s" for k, v in r[f"{who}_phases"].items())
            say(f"[bench] round {i} {who:<8} phases: {phases}; metrics {r[f'{who}_metrics']}")
    say(
        "[bench] the two training rates are not comparable: for the best any schedule of the forward and "
        "the steps can reach on these cores, run benchmarks/overlap_bound.py"
    )
    return {"work": dataclasses.asdict(work), "rounds": rounds}
