"""Disentanglement: the papers' own measures of how independent an SAE's latents are, for any SAE.

On the latents of held-out contexts (real tokens only):
- mean |Pearson correlation| between the activations of the latents that fire (the shared
  `variants.common.mean_abs_correlation`, mi_ortho's headline number);
- pairwise mutual information by a Gaussian KDE (`variants.common.kde_mutual_information`) on the
  most correlated pairs, and on as many random pairs of firing latents for comparison. Each latent
  is standardised first and the bandwidth is Silverman's rule 1.06 n^(-1/5), so the estimate does
  not depend on the latents' scale;
- decoder cosine statistics (mean, max, fraction of pairs above 0.5) between decoder directions;
- for variants whose diagnostics report group structure (group-assignment entropy, inter-group
  correlation, centroid cosine), those numbers, averaged over batches: a variant declares groups
  by what its `diagnostics()` returns, never by its name.
"""

from __future__ import annotations

import numpy as np
import torch

from saeforge.core import metrics as shared_metrics
from saeforge.core.batches import for_layout
from saeforge.core.eval_suites import register
from saeforge.core.eval_suites.context import EvalContext, SuiteResult, heldout_contexts, token_latents
from variants.common import correlation_matrix, kde_bandwidth, kde_mutual_information, mean_abs_correlation

SILVERMAN = 1.06  # bandwidth factor for unit-variance data
# diagnostics() keys that describe group structure -> the names this suite reports them under
GROUP_DIAGNOSTICS = {
    "assignment_entropy": "group_entropy",
    "membership_entropy": "group_membership_entropy",
    "inter_group_correlation": "inter_group_correlation",
    "centroid_cosine": "group_centroid_cosine",
    "groups_used": "groups_used",
}


def pair_mutual_information(a: torch.Tensor, b: torch.Tensor, bandwidth_factor: float = SILVERMAN) -> torch.Tensor:
    """KDE mutual information (nats) of sample pairs a[p], b[p] (P, n), each row standardised."""

    def standardise(t: torch.Tensor) -> torch.Tensor:
        t = t.float()
        return (t - t.mean(-1, keepdim=True)) / t.std(-1, keepdim=True).clamp_min(1e-8)

    return kde_mutual_information(standardise(a), standardise(b), kde_bandwidth(a.shape[-1], bandwidth_factor))


def correlated_pairs(latents: torch.Tensor, n_pairs: int, max_latents: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """The n_pairs most |correlated| pairs of firing latents ((n, 2) indices, their |corr|), among
    the max_latents most often firing ones."""
    counts = (latents > 0).sum(0)
    active = torch.nonzero(counts).squeeze(-1)
    if active.numel() > max_latents:
        active = active[counts[active].topk(max_latents).indices]
    m = active.numel()
    if m < 2:
        return torch.zeros(0, 2, dtype=torch.long), torch.zeros(0)
    corr = correlation_matrix(latents.float(), index=active).abs()
    upper = torch.triu(torch.ones(m, m, dtype=torch.bool), diagonal=1)
    top = corr.masked_fill(~upper, -1.0).reshape(-1).topk(min(n_pairs, m * (m - 1) // 2))
    return torch.stack([active[top.indices // m], active[top.indices % m]], -1), top.values


def random_pairs(latents: torch.Tensor, n_pairs: int, seed: int = 0) -> torch.Tensor:
    """n_pairs random pairs of distinct firing latents."""
    active = torch.nonzero((latents > 0).any(0)).squeeze(-1)
    if active.numel() < 2:
        return torch.zeros(0, 2, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    i = torch.randint(active.numel(), (n_pairs,), generator=gen)
    j = (i + 1 + torch.randint(active.numel() - 1, (n_pairs,), generator=gen)) % active.numel()
    return torch.stack([active[i], active[j]], -1)


def latent_statistics(
    latents: torch.Tensor, n_pairs: int = 32, kde_tokens: int = 512, seed: int = 0
) -> dict[str, float]:
    """Correlation and KDE-MI statistics of latent activations (tokens, d_sae)."""
    latents = latents.float().cpu()
    pairs, abs_corr = correlated_pairs(latents, n_pairs)
    rows = torch.linspace(0, latents.shape[0] - 1, min(kde_tokens, latents.shape[0])).round().long()
    sample = latents[rows]
    out = {
        "mean_abs_corr": mean_abs_correlation(latents),
        "firing_latents": float((latents > 0).any(0).sum()),
        "top_pairs_abs_corr_mean": float(abs_corr.mean()) if len(pairs) else 0.0,
    }
    if len(pairs):
        mi = pair_mutual_information(sample[:, pairs[:, 0]].T, sample[:, pairs[:, 1]].T)
        out["top_pairs_kde_mi_mean"] = float(mi.mean())
        out["top_pairs_kde_mi_max"] = float(mi.max())
        rand = random_pairs(latents, len(pairs), seed)
        out["random_pairs_kde_mi_mean"] = float(
            pair_mutual_information(sample[:, rand[:, 0]].T, sample[:, rand[:, 1]].T).mean()
        )
    return out


@register("disentanglement")
def disentanglement(
    ctx: EvalContext,
    contexts: int = 32,
    n_pairs: int = 32,
    kde_tokens: int = 512,
    max_tokens: int = 8192,
    seed: int = 0,
) -> SuiteResult:
    """Latent independence: mean |corr|, KDE MI of the most correlated pairs, decoder cosines, groups.

    contexts: held-out contexts read; n_pairs: most correlated pairs whose MI is estimated;
    kde_tokens: tokens the KDE uses (its cost is n_pairs x kde_tokens^2); max_tokens: latent rows kept.
    """
    rows: list[torch.Tensor] = []
    kept = 0
    diag_sums: dict[str, float] = {}
    batches = 0
    for x, f, mask in token_latents(ctx, heldout_contexts(ctx, contexts)):
        if kept < max_tokens:
            rows.append(f[mask][: max_tokens - kept].cpu())
            kept += len(rows[-1])
        for key, value in ctx.sae.diagnostics(*for_layout(ctx.sae, x, mask)).items():
            if key in GROUP_DIAGNOSTICS:
                diag_sums[key] = diag_sums.get(key, 0.0) + float(value)
        batches += 1
    latents = torch.cat(rows)
    result = latent_statistics(latents, n_pairs, kde_tokens, seed)
    result.update(shared_metrics.decoder_cosine_stats(ctx.sae.decoder_directions().detach().float().cpu()))
    result.update({GROUP_DIAGNOSTICS[k]: v / batches for k, v in diag_sums.items()})
    result["tokens"] = float(len(latents))
    headline = ["mean_abs_corr", "top_pairs_kde_mi_mean", "decoder_cos_mean", "decoder_cos_frac_above_0.5"]
    headline += [GROUP_DIAGNOSTICS[k] for k in ("assignment_entropy", "inter_group_correlation") if k in diag_sums]
    return SuiteResult({k: float(v) for k, v in result.items() if np.isfinite(v)}, headline=tuple(headline))
