"""`saeforge bench --same-work`: a plain single-process loop and `saeforge train` on the same
work, back to back, each in a fresh process timed whole (start-up, corpus, training, evaluation).

The plain loop is what a researcher writes by hand with no framework: tokenise the corpus, load
the model slice, forward a step's contexts, take an SAE step, repeat; then load the whole model
and evaluate the SAE on the held-out contexts. It uses saeforge's own pieces for each part (the
same corpus packing, variant, fresh start, schedule and core evaluation), so the two programs do
the same arithmetic on the same tokens and differ only in how the work is run: no Ray, no
MLflow, no checkpoints in the plain loop. Both read the prepared model from the same cache
(prepared before the first round), so neither pays the first-time preparation.

    python -m saeforge.bench.same_work '<TrainArgs as JSON>'   # the plain loop alone (JSON out)
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from saeforge.jobs.arguments import BenchArgs, TrainArgs


def plain_loop(args: TrainArgs) -> dict:
    """The plain single-process loop on `args`' work; returns its figures and phase times."""
    import torch

    from saeforge.bench.stages import _plain_stream
    from saeforge.core.evaluation import evaluate_core
    from saeforge.core.model import load_model
    from saeforge.core.training import start_fresh, train_loop
    from saeforge.jobs.data.activation_stream import ActivationProducer
    from saeforge.jobs.runtime.ray_cluster import cores
    from saeforge.jobs.validate import plan_train

    torch.set_num_threads(cores())
    phases, last = {}, time.time()

    def done(phase: str) -> None:
        nonlocal last
        phases[phase], last = time.time() - last, time.time()

    plan, contexts = plan_train(args)
    done("plan")
    producer = ActivationProducer(plan.stream, threads=cores())
    variant = plan.build_variant()
    done("load_slice")
    batches = start_fresh(variant, _plain_stream(producer, contexts.train.pack(), plan.stream.contexts_per_step))
    started = time.perf_counter()
    state = train_loop(variant, batches, dataclasses.replace(plan.loop, log_every=10**9))
    train_seconds = time.perf_counter() - started
    done("train")
    del producer
    model = load_model(plan.stream.model)
    metrics = evaluate_core(
        model, variant, plan.hook, contexts.eval, list(plan.stream.special_ids), precision=plan.stream.precision
    )
    done("evaluate")
    return {
        "steps": state.step,
        "tokens_seen": state.tokens_seen,
        "train_tokens_per_s": state.tokens_seen / max(train_seconds, 1e-9),
        "phase_seconds": phases,
        "metrics": {k: metrics[k] for k in ("l0", "explained_variance", "ce_loss_recovered")},
    }


def timed(command: list[str], cwd: Path, env: dict) -> tuple[float, dict]:
    """Run a command in a fresh process; its wall time and the JSON it printed last."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"{command[2:4]} failed (exit {done.returncode}): " + " / ".join(tail))
    return wall, last_json(done.stdout)


def last_json(stdout: str) -> dict:
    """The JSON object a `--json` verb printed: the latest line opening an object at column 0 from
    which a whole JSON object parses (a library may print lines before or after it: Ray's and
    Tune's exit messages)."""
    lines, decoder = stdout.splitlines(), json.JSONDecoder()
    for first in reversed([i for i, line in enumerate(lines) if line.startswith("{")]):
        try:
            return decoder.raw_decode("\n".join(lines[first:]))[0]
        except json.JSONDecodeError:
            continue
    raise RuntimeError(f"no JSON summary in the output: {stdout[-500:]!r}")


def train_args(args: BenchArgs) -> TrainArgs:
    """The work both programs do: `saeforge train`'s flags from the bench's."""
    return TrainArgs(
        model=args.model,
        layer=args.layer,
        variant=args.variant,
        tokens=args.tokens,
        d_sae=args.d_sae,
        eval_contexts=args.eval_contexts,
    )


def train_command(work: TrainArgs, storage: Path) -> list[str]:
    flags = {
        "--model": work.model,
        "--layer": work.layer,
        "--variant": work.variant,
        "--tokens": work.tokens,
        "--d-sae": work.d_sae,
        "--eval-contexts": work.eval_contexts,
        "--storage": storage,
    }
    return [sys.executable, "-m", "saeforge.cli", "train", *(str(x) for kv in flags.items() for x in kv), "--json"]


def run_same_work(args: BenchArgs, say=print) -> dict:
    """`args.rounds` rounds of (plain loop, saeforge train), each a fresh process timed whole."""
    from saeforge.core.model import resolve_model

    work = train_args(args)
    resolve_model(work.model)  # prepared once, before any round is timed
    rounds = []
    with tempfile.TemporaryDirectory(prefix="saeforge-same-work-") as tmp:
        folder = Path(tmp)
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
        env.pop("RAY_ADDRESS", None)  # both on this machine
        plain_cmd = [sys.executable, "-m", "saeforge.bench.same_work", json.dumps(dataclasses.asdict(work))]
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


if __name__ == "__main__":
    print(json.dumps(plain_loop(TrainArgs(**json.loads(sys.argv[1])))))
