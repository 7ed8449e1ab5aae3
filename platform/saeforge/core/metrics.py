"""Metrics every variant shares, computed from latents and reconstructions (never per variant)."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from saeforge.core.batches import real_rows
from variants.common import mean_abs_correlation

DENSE_FIRING_RATE = 0.1  # a latent firing on more than 10% of tokens counts as dense
DEAD_WINDOW_TOKENS = 50_000  # a latent silent over the last 50k training tokens counts as dead


@torch.no_grad()
def batch_metrics(x: Tensor, recon: Tensor, latents: Tensor, mask: Tensor | None = None) -> dict[str, float]:
    x, recon, f = real_rows(x, mask), real_rows(recon, mask), real_rows(latents, mask)
    residual = (x - recon).pow(2).sum()
    total = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
    return {
        "l0": (f > 0).sum(-1).float().mean().item(),
        "explained_variance": (1 - residual / total).item(),
    }


def dead_fraction(tokens_since_fired: Tensor, tokens_seen: int, window: int = DEAD_WINDOW_TOKENS) -> float:
    """Latents silent over the last min(window, tokens_seen) training tokens."""
    horizon = max(1, min(window, tokens_seen))
    return (tokens_since_fired >= horizon).float().mean().item()


DECODER_COSINE_STATS = ("decoder_cos_mean", "decoder_cos_max", "decoder_cos_frac_above_0.5")


@torch.no_grad()
def decoder_cosine_stats(directions: Tensor, max_rows: int = 4096) -> dict[str, float]:
    """Mean |cos|, max |cos| and fraction of pairs above 0.5 between decoder directions
    (on at most max_rows latents, so the d_sae x d_sae matrix stays affordable)."""
    w = directions[:max_rows]
    w = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    cos = (w @ w.T).abs()
    off = ~torch.eye(len(w), dtype=torch.bool, device=w.device)
    values = cos[off]
    return {
        "decoder_cos_mean": values.mean().item(),
        "decoder_cos_max": values.max().item(),
        "decoder_cos_frac_above_0.5": (values > 0.5).float().mean().item(),
    }


class RunningMeans:
    """Averages of scalar metrics over a logging window."""

    def __init__(self):
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, values: dict[str, float | Tensor]) -> None:
        for key, value in values.items():
            self.sums[key] += float(value.detach()) if isinstance(value, Tensor) else float(value)
            self.counts[key] += 1

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}


@torch.no_grad()
def periodic_metrics(variant, x: Tensor, latents: Tensor, mask: Tensor | None, max_latents: int = 1024) -> dict:
    """The costlier shared statistics and the variant's own diagnostics, on one batch, for the
    training curves (on a subset of latents so a log step stays cheap)."""
    values = {"mean_abs_corr": mean_abs_correlation(real_rows(latents, mask), max_latents=max_latents)}
    values.update(decoder_cosine_stats(variant.decoder_directions().detach(), max_rows=max_latents))
    values.update({f"diag/{k}": float(v) for k, v in variant.diagnostics(x, mask).items()})
    return values
