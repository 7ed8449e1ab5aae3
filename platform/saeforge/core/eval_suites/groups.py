"""Groups: the hierarchy papers' measures (seeds 003 and 004) on any SAE, from its own parts.

A variant declares its parts with `latent_groups()` (hsae: two levels; contrastive_hier: its
fine groups; matryoshka_batchtopk: its prefix blocks); a flat dictionary (None) is cut into
`flat_parts` contiguous blocks of latent ids, an arbitrary partition that gives the baseline
number the papers compare against. On held-out real tokens:
- zero_fraction: the fraction of zero latent activations (over tokens x latents), and, for a
  variant's own parts, the same per part (`zero_fraction/<kind>_<id>`): seed 004's "fraction of
  zero activations per level";
- centroid_cosine: the mean off-diagonal cosine between the parts' centroids (the mean decoder
  direction of each part's latents), seed 003's "mean cosine similarity between group centroids".
The parts' names and ids come from the variant, never from its name.
"""

from __future__ import annotations

import re

import torch

from saeforge.core.eval_suites import register
from saeforge.core.eval_suites.context import EvalContext, SuiteResult, heldout_contexts, token_latents
from variants.common import mean_offdiag_cosine


def part_labels(sae, flat_parts: int) -> tuple[str, torch.Tensor]:
    """(kind, (d_sae,) part ids): the variant's own parts, else `flat_parts` contiguous blocks."""
    groups = sae.latent_groups()
    if groups is not None:
        return groups.kind, groups.labels.long().cpu()
    d_sae = sae.cfg.d_sae
    parts = max(1, min(flat_parts, d_sae))
    return "block", torch.arange(d_sae) * parts // d_sae


def centroid_cosine(directions: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean off-diagonal cosine between the mean direction of each non-empty part."""
    ids = torch.unique(labels)
    if len(ids) < 2:
        return float("nan")
    centroids = torch.stack([directions[labels == i].mean(0) for i in ids])
    return mean_offdiag_cosine(centroids)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


@register("groups")
def groups(ctx: EvalContext, contexts: int = 32, flat_parts: int = 64) -> SuiteResult:
    """Per-part zero fraction and part-centroid cosine (the hierarchy papers' measures).

    contexts: held-out contexts read; flat_parts: blocks a flat dictionary is cut into (64: the
    8 x 8 fine groups of seed 003).
    """
    kind, labels = part_labels(ctx.sae, flat_parts)
    ids = torch.unique(labels)
    zeros = torch.zeros(len(ids))
    total_zeros, tokens = 0.0, 0
    sizes = torch.tensor([(labels == i).sum().item() for i in ids], dtype=torch.float64)
    for _, f, mask in token_latents(ctx, heldout_contexts(ctx, contexts)):
        rows = f[mask].cpu()
        is_zero = (rows == 0).float()
        total_zeros += is_zero.sum().item()
        tokens += rows.shape[0]
        zeros += torch.stack([is_zero[:, labels == i].sum() for i in ids])
    d_sae = ctx.sae.cfg.d_sae
    metrics = {
        "zero_fraction": total_zeros / max(tokens * d_sae, 1),
        "centroid_cosine": centroid_cosine(ctx.sae.decoder_directions().detach().float().cpu(), labels),
        "parts": float(len(ids)),
        "tokens": float(tokens),
    }
    table = []
    own = ctx.sae.latent_groups() is not None  # a flat dictionary's blocks carry no meaning one by one
    for n, (i, z) in enumerate(zip(ids.tolist(), zeros.tolist()) if own else ()):
        frac = z / max(tokens * sizes[n].item(), 1)
        metrics[f"zero_fraction/{slug(kind)}_{i}"] = frac
        table.append({"part": f"{kind} {i}", "latents": int(sizes[n].item()), "zero_fraction": frac})
    return SuiteResult(
        metrics,
        headline=("zero_fraction", "centroid_cosine", "parts"),
        tables={f"zero fraction per {kind}": table} if table else {},
    )
