"""Every variant side by side: `saeforge bench --variants` trains each through the real pipeline
and tables the figures they are compared on; `saeforge bench --step-cost` times one optimiser
step of each on the same activations, relative to relu."""

from __future__ import annotations

import time

import torch

import variants
from saeforge.bench.plain_loop import forward
from saeforge.bench.stages import say
from saeforge.core.batches import sae_input
from saeforge.core.corpus import valid_mask
from saeforge.core.training import make_optimizer, start_fresh
from saeforge.jobs.arguments import BenchArgs, TrainArgs
from saeforge.jobs.data.activation_stream import ActivationProducer
from saeforge.jobs.runtime.ray_cluster import cores
from saeforge.jobs.train.driver import run_train
from saeforge.jobs.validate import plan_train


def run_variant_table(args: BenchArgs, names: list[str]) -> list[dict]:
    """One full `saeforge train` per variant (same tokens, same d_sae, real pipeline, registered
    in MLflow) and a table of the figures the variants are compared on."""
    rows = []
    for name in names:
        say(f"variant {name}")
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
    acts = torch.cat([a for a, _ in forward(ActivationProducer(plan.stream, threads=cores()), train)])
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
        say(f"{name:<18} {value:8.1f} ms/step  {value / ms['relu']:5.2f}x relu")
    return ms
