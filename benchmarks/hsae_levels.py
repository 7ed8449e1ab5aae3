"""hsae's two levels on the recipe sweep's activations: each level's L0 and live latents and the
norms of the level-2 directions (rows of Wd2 Wd1), beside L0 and explained variance
(docs/recipe.md#behind-hsae holds its results).

    .venv/bin/python benchmarks/hsae_levels.py hsae "hsae gram_coeff=0"
    .venv/bin/python benchmarks/hsae_levels.py --unit-wd2-rows "hsae gram_coeff=0"
        # the paper's constraint instead (unit rows of Wd2 and Wd1 separately)
"""

from __future__ import annotations

import argparse

import recipe_sweep
import torch

from saeforge.core import corpus
from saeforge.core.hooks import HookPoint
from variants.hsae import HSAE


@torch.no_grad()
def unit_wd2_rows(self: HSAE) -> None:
    """The paper's constraint: unit rows for Wd1 and Wd2 each (and Ws, W2), not their product."""
    for w in (self.Ws, self.W2, self.Wd1, self.Wd2):
        w.div_(w.norm(dim=-1, keepdim=True).clamp_min(1e-8))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("recipes", nargs="+", help="'hsae field=value ...'")
    p.add_argument("--unit-wd2-rows", action="store_true", help="the paper's constraint on Wd2 and Wd1")
    p.add_argument("--cache", default="/tmp/saeforge_sweep_acts.pt", help="recipe_sweep.py's activation cache")
    p.add_argument("--tokens", type=int, default=300_000)
    ns = p.parse_args()
    torch.set_num_threads(2)
    if ns.unit_wd2_rows:
        HSAE.normalize_decoder_rows = unit_wd2_rows
    hook = HookPoint(6)
    data = recipe_sweep.activations("gemma-3-270m", hook, ns.tokens, 1024, 32, recipe_sweep.Path(ns.cache))
    data["eval_acts"] = recipe_sweep.eval_activations("gemma-3-270m", hook, data["eval"])
    real = torch.from_numpy(corpus.valid_mask(data["eval"], data["special"]))  # no BOS / padding
    for text in ns.recipes:
        sae, _, curve, _ = recipe_sweep.train(text, data, ns.tokens)
        row = recipe_sweep.quick_eval(sae, data["eval_acts"], real)
        x = data["eval_acts"][real].float() * sae.act_scale
        with torch.no_grad():
            z1, z2 = sae.levels(x)
            norms = sae.decoder_directions()[sae.cfg.d_sae // 2 :].norm(dim=-1)  # level 2: rows of Wd2 Wd1
        print(
            f"{text}: L0 {row['l0']:.1f} (level 1 {(z1 > 0).sum(-1).float().mean():.1f}, level 2 "
            f"{(z2 > 0).sum(-1).float().mean():.1f}), explained variance {row['explained_variance']:.3f}, "
            f"live latents {int((z1 > 0).any(0).sum())} + {int((z2 > 0).any(0).sum())}, level-2 direction "
            f"norms median {norms.median():.2f} max {norms.max():.2f}, last window {recipe_sweep.last_window(curve)}",
            flush=True,
        )


if __name__ == "__main__":
    main()
