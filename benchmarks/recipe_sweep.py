"""The recipe sweep that chose `saeforge train`'s defaults (docs/recipe.md holds its results).

Every recipe trains on the same real activations (Gemma 3 270M, residual after layer 6, the
built-in wiki corpus, the default run's token budget), through saeforge's own Ray-free loop
(`core.training`: the same fresh start, schedule and step batches of whole contexts as a
`saeforge train` run), and is evaluated by saeforge's own core evaluation (SAELens's conventions)
on the same held-out contexts. The activations are produced once and cached, so recipes differ
only in what they set.

    .venv/bin/python benchmarks/recipe_sweep.py                       # the built-in sweep
    .venv/bin/python benchmarks/recipe_sweep.py "topk k=64 lr=2e-3" "relu l1_coeff=0.01"
    .venv/bin/python benchmarks/recipe_sweep.py --defaults          # every variant at its defaults
    .venv/bin/python benchmarks/recipe_sweep.py --no-ce --tokens 100000 "relu l1_coeff=0.01" ...
        # L0 and explained variance only (on the held-out activations, no LM head): a quick map
        # from a sparsity coefficient to L0, for centring tune spaces
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

import variants
from saeforge.core import corpus, metrics
from saeforge.core.batches import step_budget
from saeforge.core.evaluation import baseline, evaluate_core
from saeforge.core.hooks import HookPoint, capture, layers_needed
from saeforge.core.model import load_model, load_tokenizer, resolve_model, run_slice
from saeforge.core.training import LoopSettings, start_fresh, train_loop

SWEEP = [
    "relu",  # at its defaults (the sweep in docs/recipe.md ran it at the papers' l1_coeff 0.04)
    "topk k=64",
    "topk k=64 lr=1e-3",
    "topk k=64 lr=2e-3",
    "topk k=64 lr=4e-3",
    "topk k=64 lr=2e-3 lr_schedule=cosine",
    "topk k=64 lr=2e-3 lr_schedule=cosine b_dec_init=init",
    "topk k=48 lr=2e-3 lr_schedule=cosine",
    "topk k=32 lr=2e-3 lr_schedule=cosine",
    "batchtopk k=64 lr=2e-3 lr_schedule=cosine batch_size=1024",
    "relu l1_coeff=0.008 lr=2e-3 lr_schedule=cosine",
]


TRACKED = ("loss", "diag/", "mean_abs_corr", "explained_variance", "l0")


def recipe(text: str) -> tuple[str, dict[str, str]]:
    name, *pairs = text.split()
    return name, dict(p.split("=", 1) for p in pairs)


def activations(
    model_name: str, hook: HookPoint, tokens: int, batch_tokens: int, eval_contexts: int, cache: Path
) -> dict:
    """Train and held-out contexts of the default run, and the train contexts' activations."""
    if cache.is_file():
        return torch.load(cache, weights_only=False)
    spec = resolve_model(model_name)
    tok = load_tokenizer(spec)
    special = corpus.special_ids(tok)
    budget = step_budget(tokens, batch_tokens, 128, 1)
    train = corpus.pack_contexts(corpus.split_texts(corpus.BUILTIN, "train"), tok, 128, budget.contexts)
    held_out = corpus.pack_contexts(corpus.split_texts(corpus.BUILTIN, "eval"), tok, 128, eval_contexts)
    model = load_model(spec, n_layers=layers_needed([hook]))
    acts = []
    started = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(train), 16):
            with capture(model, [hook]) as got:
                run_slice(model, torch.from_numpy(train[i : i + 16].astype(np.int64)))
            acts.append(got[hook.name].half())
    data = {
        "train": train,
        "eval": held_out,
        "special": special,
        "acts": torch.cat(acts),
        "mask": torch.from_numpy(corpus.valid_mask(train, special)),
        "forward_seconds": time.perf_counter() - started,
    }
    torch.save(data, cache)
    return data


@torch.no_grad()
def eval_activations(model_name: str, hook: HookPoint, contexts: np.ndarray) -> torch.Tensor:
    model = load_model(resolve_model(model_name), n_layers=layers_needed([hook]))
    with capture(model, [hook]) as got:
        run_slice(model, torch.from_numpy(contexts.astype(np.int64)))
    return got[hook.name].float()


def steps(data: dict, per_step: int):
    for i in range(0, len(data["acts"]) - per_step + 1, per_step):
        yield data["acts"][i : i + per_step].float(), data["mask"][i : i + per_step]


@torch.no_grad()
def quick_eval(sae, acts: torch.Tensor, mask: torch.Tensor) -> dict:
    """L0 and explained variance on held-out activations, without running the model's head."""
    from saeforge.core.batches import real_rows, sae_input

    sae.eval()
    x, m = sae_input(sae, acts.float(), mask)
    f = sae.encode(x)
    xr, xh = real_rows(x, m), real_rows(sae.decode(f), m)
    ev = 1 - (xr - xh).pow(2).sum() / (xr - xr.mean(0)).pow(2).sum()
    return {
        "l0": float((real_rows(f, m) > 0).sum(-1).float().mean()),
        "explained_variance": float(ev),
        "ce_loss_recovered": math.nan,
        "ce_loss_recovered_stderr": math.nan,
        "explained_variance_stderr": math.nan,
        "eval_tokens": float(len(xr)),
    }


def last_window(curve: list) -> dict:
    """The last logged window's loss terms, shared statistics and the variant's diagnostics."""
    return {k: round(v, 5) for k, v in curve[-1][1].items() if k.startswith(TRACKED)} if curve else {}


def train(text: str, data: dict, tokens: int):
    """One recipe trained on the cached activations: (sae, loop state, logged curve, seconds)."""
    name, overrides = recipe(text)
    sae = variants.build(name, d_in=data["acts"].shape[-1], d_sae=8 * data["acts"].shape[-1], overrides=overrides)
    budget = step_budget(tokens, sae.cfg.batch_size, 128, 1, available_contexts=len(data["acts"]))
    curve = []
    started = time.perf_counter()
    state = train_loop(
        sae,
        start_fresh(sae, steps(data, budget.contexts_per_step)),
        LoopSettings(budget.total_steps, log_every=25),
        on_log=lambda s, m: curve.append((s, m)),
    )
    return sae, state, curve, time.perf_counter() - started


def run(text: str, data: dict, full_model, hook: HookPoint, tokens: int, reference) -> dict:
    sae, state, curve, train_seconds = train(text, data, tokens)
    dead = metrics.dead_fraction(sae.tokens_since_fired, state.tokens_seen)
    if full_model is None:
        result = quick_eval(sae, data["eval_acts"], torch.from_numpy(corpus.valid_mask(data["eval"], data["special"])))
    else:
        result = evaluate_core(full_model, sae, hook, data["eval"], data["special"], reference=reference)
    return {
        "recipe": text,
        "steps": state.step,
        "tokens": state.tokens_seen,
        "train_s": train_seconds,
        "l0": result["l0"],
        "ce_loss_recovered": result["ce_loss_recovered"],
        "ce_stderr": result["ce_loss_recovered_stderr"],
        "explained_variance": result["explained_variance"],
        "ev_stderr": result["explained_variance_stderr"],
        "dead_last_50k": dead,
        "ev_at_step_10_25": [round(m["explained_variance"], 3) for s, m in curve[:2]],
        "eval_tokens": result["eval_tokens"],
        # the last logged window (25 steps): each weighted loss term beside the MSE, the shared
        # statistics and the variant's own diagnostics (how hard each penalty pulls at the end)
        "final_window": last_window(curve),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("recipes", nargs="*", help="'VARIANT field=value ...' (default: the built-in sweep)")
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--tokens", type=int, default=300_000)
    p.add_argument("--eval-contexts", type=int, default=32)
    p.add_argument("--cache", default="/tmp/saeforge_sweep_acts.pt")
    p.add_argument("--out", default="", help="append the results as JSON lines to this file")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--defaults", action="store_true", help="every registered variant at its defaults")
    p.add_argument("--no-ce", action="store_true", help="L0 and explained variance only (no LM head)")
    ns = p.parse_args()
    torch.set_num_threads(ns.threads)
    hook = HookPoint(ns.layer)
    data = activations(ns.model, hook, ns.tokens, 1024, ns.eval_contexts, Path(ns.cache))
    print(
        f"activations: {tuple(data['acts'].shape)} ({int(data['mask'].sum()):,} real tokens), "
        f"eval contexts {len(data['eval'])}",
        flush=True,
    )
    if ns.no_ce:
        full_model = reference = None
        data["eval_acts"] = eval_activations(ns.model, hook, data["eval"])
    else:
        full_model = load_model(resolve_model(ns.model))
        reference = baseline(full_model, hook, data["eval"], data["special"])  # the zero ablation, once
    print("| recipe | L0 | CE loss recovered | explained variance | dead (last 50k) | steps | train s |", flush=True)
    print("|---|---|---|---|---|---|---|", flush=True)
    for text in variants.names() if ns.defaults else ns.recipes or SWEEP:
        row = run(text, data, full_model, hook, ns.tokens, reference)
        print(
            f"| {row['recipe']} | {row['l0']:.1f} | {row['ce_loss_recovered']:.3f} ± {row['ce_stderr']:.3f} | "
            f"{row['explained_variance']:.3f} ± {row['ev_stderr']:.3f} | {row['dead_last_50k']:.3f} | {row['steps']} | "
            f"{row['train_s']:.0f} |",
            flush=True,
        )
        if ns.out:
            with open(ns.out, "a") as f:
                f.write(
                    json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
                    + "\n"
                )


if __name__ == "__main__":
    main()
