"""`saeforge bench --layers 3,6,9`: one `saeforge train --layer 3,6,9` (one model pass, one SAE per
layer) against one `saeforge train --layer L` per layer, back to back, each a fresh process timed
whole (start-up, corpus, activations, training, evaluation, registration).

Both arms do the same work per SAE (same variant, tokens, width, evaluation contexts, same data
order and seed: the SAEs are the same), so the ratio of wall times is what running the model
once instead of k times, and starting up once instead of k times, saves. The rounds alternate
which arm goes first, so a load that drifts over the benchmark does not favour one arm. The
model is prepared and the MLflow store created before anything is timed; the load average of
the machine is recorded beside each figure (the machine may be shared).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

from saeforge.bench.processes import bench_env, timed, train_args, train_command
from saeforge.jobs.arguments import BenchArgs


def layer_commands(args: BenchArgs, storage: Path) -> tuple[list[str], list[list[str]]]:
    """(the k-layer run's command, one single-layer command per layer): the same flags but --layer."""
    work = train_args(args)
    layers = [h.layer for h in check_layers(args)]
    together = train_command(dataclasses.replace(work, layer=",".join(map(str, layers))), storage)
    return together, [train_command(dataclasses.replace(work, layer=str(n)), storage) for n in layers]


def check_layers(args: BenchArgs):
    """--layers as hook points: at least two, each once and in the model's range (one line else)."""
    from saeforge.core.model import load_config, resolve_model
    from saeforge.errors import UserError
    from saeforge.jobs.validate import hook_points

    hooks = hook_points(SimpleNamespace(layer=args.layers, site="resid_post"))
    if len(hooks) < 2:
        raise UserError(f"--layers {args.layers}: give two layers or more (e.g. 3,6,9)")
    n_layers = load_config(resolve_model(args.model)).num_hidden_layers
    for hook in hooks:
        hook.check(n_layers, args.model)
    return hooks


def _prepare_store(uri: str) -> None:
    """Create the SQLite store (its migrations take seconds) before any arm is timed."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.search_experiments()


def run_layers_bench(args: BenchArgs, say=print) -> dict:
    """`args.rounds` rounds of (the k-layer run, the k single-layer runs), alternating which goes first."""
    check_layers(args)  # bad input costs seconds, before anything runs
    rounds = []
    with tempfile.TemporaryDirectory(prefix="saeforge-layers-bench-") as tmp:
        folder = Path(tmp)
        env = bench_env(folder)
        _prepare_store(env["MLFLOW_TRACKING_URI"])
        together, separate = layer_commands(args, folder / "runs")
        for r in range(1, args.rounds + 1):
            arms = [("together", [together]), ("separate", separate)]
            record: dict = {"first": arms[(r - 1) % 2][0]}
            for name, commands in arms if r % 2 else arms[::-1]:
                walls, summaries, loads = [], [], []
                for command in commands:
                    layer = command[command.index("--layer") + 1]
                    say(f"[bench] round {r}/{args.rounds}: saeforge train --layer {layer} ...")
                    loads.append(os.getloadavg()[0])
                    wall, summary = timed(command, folder, env)
                    walls.append(wall)
                    summaries.append(summary)
                    say(f"[bench]   {wall:.0f} s (load average before it {loads[-1]:.1f})")
                record[name] = {
                    "wall_s": sum(walls),
                    "walls_s": walls,
                    "load_before": loads,
                    "phases": [s["phase_seconds"] for s in summaries],
                    "forwards": [s["activations"] for s in summaries],
                    "metrics": [
                        {h["hook"]: {k: h["metrics"][k] for k in ("l0", "explained_variance", "ce_loss_recovered")}}
                        for s in summaries
                        for h in s["hooks"]
                    ],
                }
            record["ratio"] = record["together"]["wall_s"] / record["separate"]["wall_s"]
            rounds.append(record)
    say(
        f"[bench] layers {args.layers}: {args.variant}, d_sae {args.d_sae or 'default'}, {args.tokens:,} tokens, "
        f"{args.eval_contexts} eval contexts, {args.model}; load average {os.getloadavg()[0]:.1f} now"
    )
    say("| round | one run, all layers | one run per layer (each) | ratio (together / separate) | first |")
    say("|---|---|---|---|---|")
    for i, r in enumerate(rounds, 1):
        each = ", ".join(f"{w:.0f}" for w in r["separate"]["walls_s"])
        say(
            f"| {i} | {r['together']['wall_s']:.0f} s | {r['separate']['wall_s']:.0f} s ({each}) | "
            f"{r['ratio']:.2f}x | {r['first']} |"
        )
    for i, r in enumerate(rounds, 1):
        for name in ("together", "separate"):
            phases = " / ".join(" | ".join(f"{k} {v:.0f}s" for k, v in p.items()) for p in r[name]["phases"])
            forwards = sum(f["contexts_forwarded"] for f in r[name]["forwards"])
            say(f"[bench] round {i} {name:<8} {forwards} contexts forwarded; phases: {phases}")
            say(f"[bench] round {i} {name:<8} metrics {r[name]['metrics']}")
    return {"work": {**dataclasses.asdict(train_args(args)), "layers": args.layers}, "rounds": rounds}
