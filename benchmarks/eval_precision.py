"""The core evaluation of one saved SAE in float32 and in bfloat16 (`--precision`), side by side on
the same held-out contexts: wall and CPU seconds of each, and each figure's difference.

    .venv/bin/python benchmarks/eval_precision.py saeforge_runs/RUN/checkpoint_XXXXXX
    .venv/bin/python benchmarks/eval_precision.py CHECKPOINT --contexts 64 --rounds 2

The SAE's own cfg.json names the model and hook; the held-out contexts are the default run's
(`--contexts` of them). Rounds alternate which precision goes first. Measured:
docs/benchmarks.md#precision.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from saeforge.core.evaluation import evaluate_core
from saeforge.core.sae_files import SAE_DIR, load_sae
from saeforge.jobs.arguments import TrainArgs
from saeforge.jobs.validate import plan_train

FIGURES = ("ce_loss_recovered", "explained_variance", "kl_div_sae", "l0", "ce_loss_clean", "ce_loss_sae")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="a run's checkpoint folder (holding sae/)")
    p.add_argument("--contexts", type=int, default=64, help="held-out contexts (default: the default run's 64)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    folder = Path(args.checkpoint)
    sae, cfg = load_sae(folder / SAE_DIR if (folder / SAE_DIR).is_dir() else folder)
    plan, contexts = plan_train(
        TrainArgs(
            model=cfg["metadata"]["model_name"],
            layer=str(cfg["metadata"]["hook_layer"]),
            eval_contexts=args.contexts,
            storage="/tmp/saeforge_eval_precision",
        )
    )
    from saeforge.core.model import load_model

    model = load_model(plan.stream.model)
    special = list(plan.stream.special_ids)
    results: dict[str, list] = {"float32": [], "bfloat16": []}
    for r in range(args.rounds):
        order = ("float32", "bfloat16") if r % 2 == 0 else ("bfloat16", "float32")
        for precision in order:
            wall, cpu = time.perf_counter(), time.process_time()
            m = evaluate_core(model, sae, plan.hook, contexts.eval, special, precision=precision)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            results[precision].append({"wall_s": wall, "cpu_s": cpu, **{k: m[k] for k in FIGURES}})
            print(
                f"round {r + 1} {precision:9s} wall {wall:6.1f} s cpu {cpu:6.1f} s  "
                + "  ".join(f"{k} {m[k]:.4f}" for k in FIGURES),
                flush=True,
            )
    best = {p: min(results[p], key=lambda x: x["wall_s"]) for p in results}
    bf16, fp32 = best["bfloat16"], best["float32"]
    print(
        f"eval tokens {m['eval_tokens']:.0f}: bf16/fp32 wall {bf16['wall_s'] / fp32['wall_s']:.2f}x, "
        f"cpu {bf16['cpu_s'] / fp32['cpu_s']:.2f}x; differences "
        + ", ".join(f"{k} {best['bfloat16'][k] - best['float32'][k]:+.4f}" for k in FIGURES)
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
