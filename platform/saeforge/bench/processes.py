"""Whole programs timed as fresh processes, the way the benchmarks that compare programs run them:
each `saeforge` verb (or the plain loop) is a new Python process on a private local Ray, logging
to the benchmark's own MLflow store, timed from start to exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from saeforge.jobs.arguments import BenchArgs, TrainArgs


def bench_env(folder: Path) -> dict:
    """The environment of every timed process: this one's, with an MLflow store in `folder` and
    no RAY_ADDRESS (each process on this machine, on a private local Ray)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
    env.pop("RAY_ADDRESS", None)
    return env


def saeforge_command(verb: str, flags: dict, *extra: str) -> list[str]:
    """`saeforge VERB --flag value ... EXTRA --json` in this interpreter."""
    pairs = [str(x) for kv in flags.items() for x in kv]
    return [sys.executable, "-m", "saeforge.cli", verb, *pairs, *extra, "--json"]


def train_args(args: BenchArgs) -> TrainArgs:
    """The work both arms of a comparison do: `saeforge train`'s arguments from the bench's."""
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
    return saeforge_command("train", flags)


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
