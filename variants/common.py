"""Maths shared by several variants, written once (init, decoder norms, AuxK, ...).

Variants import what they need from here; nothing here knows about any particular variant.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def mse_loss(x_hat: Tensor, x: Tensor) -> Tensor:
    """Squared error summed over d_in and averaged over tokens: every variant's reconstruction term."""
    return (x_hat - x).pow(2).sum(-1).mean()


def paper_weight(coeff: float, d_in: int) -> float:
    """A paper's penalty coefficient on our loss scale. The papers weigh their penalties against
    an MSE averaged over d_in; `mse_loss` sums over d_in, which on inputs normalised to
    E||x|| = sqrt(d_in) is d_in times theirs, so the same effective weight is coeff * d_in.
    Config fields keep the papers' per-element numbers (d_in-free); every variant on that scale
    multiplies its penalties through here (all but jumprelu and the top-k family, whose papers
    state their coefficients on other scales)."""
    return coeff * d_in


def total_variance(x: Tensor) -> Tensor:
    """E||x - mean x||^2 over the rows of x (..., d_in), summed over d_in, without gradient: the
    factor between our summed MSE and a variance-normalised one (Gao et al.'s scale)."""
    rows = x.detach().reshape(-1, x.shape[-1])
    return (rows - rows.mean(0)).pow(2).sum(-1).mean()


def geometric_median(points: Tensor, iters: int = 200, tol: float = 1e-7) -> Tensor:
    """The point minimising the summed Euclidean distance to the rows of `points` (N, d), by
    Weiszfeld's iterations from the mean (each iterate is the distance-weighted mean, weights
    1 / ||p - m||): Gao et al.'s robust centre for the initial decoder bias. Stops when a step
    moves less than `tol` relative to the median's norm."""
    pts = points.detach().to(torch.promote_types(points.dtype, torch.float32))
    median = pts.mean(0)
    for _ in range(iters):
        weights = 1.0 / (pts - median).norm(dim=-1).clamp_min(1e-12)
        new = (weights.unsqueeze(-1) * pts).sum(0) / weights.sum()
        moved = float((new - median).norm())
        median = new
        if moved <= tol * (1.0 + float(median.norm())):
            break
    return median


def tied_init(d_in: int, d_sae: int, seed: int, norm: float = 0.1) -> tuple[nn.Parameter, nn.Parameter]:
    """W_dec rows random directions of norm `norm`, W_enc = W_dec^T (SAELens / Anthropic's
    initialisation: small decoder rows keep the first reconstructions from exploding when half
    of thousands of latents fire; variants that renormalise rows rescale them after step one)."""
    gen = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(d_sae, d_in, generator=gen)
    w_dec *= norm / w_dec.norm(dim=-1, keepdim=True)
    return nn.Parameter(w_dec.T.clone()), nn.Parameter(w_dec)


def decoder_norm_weighted_l1(f: Tensor, w_dec: Tensor) -> Tensor:
    """sum_i f_i * ||w_i||, averaged over tokens (the L1 of Anthropic's April update)."""
    return (f * w_dec.norm(dim=-1)).sum(-1).mean()


def topk_relu(pre: Tensor, k: int) -> Tensor:
    """Keep the k largest pre-activations of each row, ReLU them, zero the rest."""
    values, indices = pre.topk(min(k, pre.shape[-1]), dim=-1)
    return torch.zeros_like(pre).scatter_(-1, indices, values.relu())


def sparse_decode(indices: Tensor, values: Tensor, w_dec: Tensor) -> Tensor:
    """sum_j values[:, j] * w_dec[indices[:, j]] for (N, k) rows: the decode of a code with k
    non-zeros per row, without the dense (N, d_sae) @ (d_sae, d_in) product: it reads k of the
    d_sae decoder rows per token (docs/recipe.md#behind-topk has the step time); gradients reach
    both `values` and `w_dec`."""
    return F.embedding_bag(indices, w_dec, per_sample_weights=values, mode="sum")


def auxk_loss(x: Tensor, x_hat: Tensor, pre: Tensor, w_dec: Tensor, dead: Tensor, aux_k: int) -> Tensor:
    """AuxK (Gao et al. 2024): reconstruct the residual error e = x - x_hat (no gradient) from the
    top aux_k pre-activations of the *dead* latents (decoder rows, no bias), as a variance ratio
    mean_t ||e_hat - e||^2 / mean_t ||e - mean e||^2 (sums over d_in; a ratio of batch means, where
    Gao et al.'s reference code averages per-token ratios), so the term is scale free. Zero when
    nothing is dead; `topk_family_terms` puts it on our MSE's scale."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre.new_zeros(())
    residual = (x - x_hat).detach()
    dead_pre = pre.masked_fill(~dead, float("-inf"))
    values, indices = dead_pre.topk(min(aux_k, n_dead), dim=-1)  # only dead latents: n_dead >= k
    residual_hat = sparse_decode(indices, values.relu(), w_dec)
    denom = (residual - residual.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-8)
    return (residual_hat - residual).pow(2).sum(-1).mean() / denom


def capped_warmup(warmup_steps: int, total_steps: int) -> int:
    """The warm-up a run of `total_steps` optimiser steps uses: at most 10% of the run (and at
    least one step), so short runs and search trials still reach their full learning rate and
    their full penalty coefficients. One rule for the platform's lr warm-up and every penalty
    warm-up (jumprelu's L0 coefficient, cubic_ortho's gamma(t))."""
    return min(warmup_steps, max(1, total_steps // 10))


def linear_warmup(step: int, warmup_steps: int) -> float:
    """Ramp from 0 to 1 over `warmup_steps` (1 at once when warmup_steps <= 0)."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


# -- ramps --------------------------------------------------------------------------------------
def linear_ramp(step: int, ramp_steps: int, end: float = 1.0, start: float = 0.0) -> float:
    """`start` -> `end` linearly over `ramp_steps`, then held: penalty warm-ups (cubic_ortho's gamma(t),
    jumprelu's sparsity coefficient) that must follow the same shape as the lr warm-up."""
    return start + (end - start) * linear_warmup(step, ramp_steps)


# -- correlation and Gram matrices ---------------------------------------------------------------
def correlation_matrix(
    a: Tensor, index: Tensor | None = None, weights: Tensor | None = None, min_var: float = 1e-10
) -> Tensor:
    """Pearson correlation between the columns of `a` (..., n, k) -> (..., k, k), optionally only
    for the columns in `index` and weighting rows by `weights` (..., n) (a token mask): every
    correlation penalty and metric reads it. A constant column correlates 0 with everything
    (and 1 with itself), so silent latents never produce NaNs or gradients."""
    if index is not None:
        a = a[..., index]
    if weights is None:
        weights = a.new_ones(a.shape[:-1])
    w = weights.to(a.dtype).unsqueeze(-1)  # (..., n, 1)
    total = w.sum(-2, keepdim=True).clamp_min(1e-12)
    centred = a - (w * a).sum(-2, keepdim=True) / total
    cov = (w * centred).transpose(-1, -2) @ centred / total  # (..., k, k)
    var = torch.diagonal(cov, dim1=-2, dim2=-1)
    live = var > min_var
    std = var.clamp_min(min_var).sqrt()
    corr = cov / (std.unsqueeze(-1) * std.unsqueeze(-2))
    both = live.unsqueeze(-1) & live.unsqueeze(-2)
    corr = torch.where(both, corr, torch.zeros_like(corr)).clamp(-1.0, 1.0)
    eye = torch.eye(corr.shape[-1], dtype=torch.bool, device=corr.device)
    return torch.where(eye, torch.ones_like(corr), corr)


def mean_abs_correlation(latents: Tensor, max_latents: int | None = 4096, chunk: int = 1024) -> float:
    """Mean |Pearson correlation| over off-diagonal pairs of latents that fire at least once in the
    batch (mi_ortho's headline measure; the platform logs it for every variant). `latents` is
    (..., d_sae); above `max_latents` firing latents an evenly spaced subset is used, and the
    k x k matrix is built `chunk` rows at a time so memory stays O(chunk * k)."""
    a = latents.detach().reshape(-1, latents.shape[-1])
    a = a.to(torch.promote_types(a.dtype, torch.float32))  # float64 stays float64 (exact references)
    fired = torch.nonzero((a > 0).any(0)).squeeze(-1)
    if max_latents is not None and fired.numel() > max_latents:
        fired = fired[torch.linspace(0, fired.numel() - 1, max_latents).round().long()]
    k = fired.numel()
    if k < 2 or a.shape[0] < 2:
        return 0.0
    a = a[:, fired]
    centred = a - a.mean(0)
    std = centred.pow(2).mean(0).sqrt()
    live = std > 1e-5
    z = centred / std.clamp_min(1e-5) * live
    total = 0.0
    for start in range(0, k, chunk):
        block = (z[:, start : start + chunk].T @ z / a.shape[0]).abs().clamp(max=1.0)
        rows = torch.arange(start, min(start + chunk, k), device=a.device)
        block[torch.arange(rows.numel(), device=a.device), rows] = 0.0
        total += float(block.sum())
    return total / (k * (k - 1))


def gram_matrix(rows: Tensor) -> Tensor:
    """Inner products between rows, (..., n, d) -> (..., n, n): the B x B Gram matrices of HSAE's
    disentanglement term and the <w_i, w_j> matrix of decoder directions."""
    return rows @ rows.transpose(-1, -2)


# -- mutual information --------------------------------------------------------------------------
def kde_bandwidth(n: int, factor: float) -> float:
    """Scott-style bandwidth h = factor * n^(-1/5) (mi_ortho: factor 0.15)."""
    return factor * n ** (-0.2)


def kde_mutual_information(x: Tensor, y: Tensor, bandwidth: float, chunk_elems: int = 1 << 22) -> Tensor:
    """Mutual information (nats) of each pair of sample rows x[p], y[p] (P, n) by a Gaussian
    product-kernel density estimate, I = mean_t log p(x_t, y_t) / (p(x_t) p(y_t)) with the
    densities evaluated at the samples themselves: mi_ortho's dependence measure. Kernel
    normalising constants cancel in the ratio. Cost O(P n^2), done `chunk_elems` at a time."""
    dtype = torch.promote_types(x.dtype, torch.float32)  # never estimate in half precision
    x, y = x.to(dtype), y.to(dtype)
    n = x.shape[-1]
    out = []
    step = max(1, chunk_elems // max(1, n * n))
    for start in range(0, x.shape[0], step):
        xs, ys = x[start : start + step], y[start : start + step]
        kx = torch.exp(-(xs.unsqueeze(-1) - xs.unsqueeze(-2)).pow(2) / (2 * bandwidth**2))  # (p, n, n)
        ky = torch.exp(-(ys.unsqueeze(-1) - ys.unsqueeze(-2)).pow(2) / (2 * bandwidth**2))
        joint = (kx * ky).mean(-1)
        out.append((joint.log() - kx.mean(-1).log() - ky.mean(-1).log()).mean(-1))
    return torch.cat(out) if out else x.new_zeros(0)


# -- group structure -----------------------------------------------------------------------------
def membership_centroids(directions: Tensor, membership: Tensor) -> Tensor:
    """Centroid of each group, the membership-weighted mean of the directions (n, d) under soft
    membership (n, G) -> (G, d): the anchors of group_ib's and contrastive_hier's InfoNCE."""
    return membership.T @ directions / membership.sum(0).unsqueeze(-1).clamp_min(1e-8)


def info_nce_to_centroids(directions: Tensor, centroids: Tensor, positive: Tensor, temperature: float) -> Tensor:
    """InfoNCE of each direction (n, d) against every group centroid (G, d) by cosine / temperature,
    the positive being its own group `positive` (n,): makes features compete for groups."""
    logits = F.normalize(directions, dim=-1) @ F.normalize(centroids, dim=-1).T / temperature
    return F.cross_entropy(logits, positive)


def categorical_entropy(p: Tensor, dim: int = -1) -> Tensor:
    """Entropy (nats) of distributions along `dim`: group-usage regularisers and diagnostics."""
    p = p / p.sum(dim, keepdim=True).clamp_min(1e-12)
    return -(p * p.clamp_min(1e-12).log()).sum(dim)


def mean_offdiag_cosine(vectors: Tensor) -> float:
    """Mean cosine similarity between distinct rows (group centroids: how separated the groups are)."""
    k = vectors.shape[0]
    if k < 2:
        return 0.0
    cos = gram_matrix(F.normalize(vectors.detach().float(), dim=-1))
    return float((cos.sum() - cos.diagonal().sum()) / (k * (k - 1)))


def topk_family_terms(
    x: Tensor, x_hat: Tensor, pre: Tensor, w_dec: Tensor, dead: Tensor, aux_k: int, aux_coeff: float
) -> dict[str, Tensor]:
    """The top-k family's loss terms (topk, batchtopk): MSE plus AuxK on the `dead` latents, on
    one scale. Gao et al. add aux_coeff x AuxK (a variance ratio) to an MSE normalised by the
    data's variance; our MSE is summed over d_in, i.e. total_variance(x) times theirs, so AuxK is
    multiplied by total_variance(x) too and aux_coeff = 1/32 is their weight exactly. Every input
    is explicit, so this module knows no variant's config."""
    auxk = auxk_loss(x, x_hat, pre, w_dec, dead, aux_k)
    return {"mse": mse_loss(x_hat, x), "auxk": aux_coeff * total_variance(x) * auxk}
