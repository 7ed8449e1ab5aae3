"""MI-Ortho, from "MI-Ortho: Breaking Feature Dependencies in Large Language Models via Mutual
Information Guided Constraints" (anonymous, under review): a ReLU SAE whose most dependent latent
pairs, by a kernel estimate of their mutual information, pay a co-activation penalty scaled by
that MI.

Every `refresh_interval` steps (inside `loss`, without gradients) the penalised pair set T is
rebuilt from the batch: the latents active in it (at most `max_active_latents`, the most often
firing) give candidate pairs by |Pearson correlation| (one m x m matmul), the `n_candidates` most
correlated pairs get a Gaussian-KDE MI estimate on the first `kde_tokens` tokens, standardised
per latent (bandwidth h = bandwidth_factor * n^(-1/5) in standard deviations: mutual information
does not depend on the latents' scale, so neither must its estimate, nor which pairs are kept,
nor their weights), and the pairs above the `pair_percentile` percentile of those estimates are
kept. Each kept pair (i, j) costs tau_ij * (a_i . a_j)^2 with tau_ij = base_weight *
exp(mi_scale * I_ij), a_i the batch column of latent i. T and its MI values sit in fixed-size
buffers (n_candidates slots plus a count), so checkpoints carry them.

  loss = MSE + w(l1_coeff) ||f||_1 + w(1) * sum over T of tau_ij (a_i . a_j)^2,  w(c) = c * d_in.

Conventions: MSE summed over d_in, averaged over tokens; ||f||_1 summed over latents, averaged
over tokens. The paper's penalty tau_ij ||f_i^T f_j||^2 is kept at its own scale: the
co-activation a_i . a_j is summed over the batch's tokens (not divided by B) and the penalties are
summed over the pairs of T, so the pair term grows with B^2, as in the paper. The paper's
coefficients (0.04 and the tau weights) weigh its terms against an MSE averaged over d_in, so both
terms are applied times d_in (`paper_weight`).

Defaults: the pair term keeps the paper's weights (base_weight 0.5, mi_scale 2); the L1 and the
training do not: l1_coeff 0.0037 and the shared recipe (Adam at 2e-3, batches of 1024 decayed over
the last 20%). The paper's 0.04, tuned for lr 3e-4 and tens of millions of tokens, leaves a
default-scale run a sparse code that reconstructs little, and the shared recipe is sparser and
more faithful than the paper's training at the same L1. At batches of 1024 the pair term has 1/4
of its weight at the paper's 2048. The paper's setting: `--set l1_coeff=0.04 optimizer=adamw
weight_decay=0.01 lr_schedule=cosine batch_size=2048`. Measured: docs/recipe.md#mi_ortho.

On standardised latents h = 0.15 n^(-1/5) is about 1/7 of Silverman's rule (1.06 n^(-1/5)), so the
estimate is biased upwards for dense continuous pairs (about 1.5 nats for an independent Gaussian
pair at n = 256) and much less for sparse latents, mostly exact zeros (about 0.1 nats): the ranking
that picks T does not depend on it, tau does (bandwidth_factor is a config field).

Rescaling: L1 and pair penalty fall with the latents (the pair set and tau do not move: the MI
estimate is scale free), but decoder rows are unit norm (after_step).

Cost per step: the linear SAE's two (B x d_in x d_sae) matmuls plus a (B x |T|) gather for the
penalty. A refresh step adds a (B x m x m) correlation (m <= max_active_latents) and an
(n_candidates x kde_tokens^2) KDE; none of this builds a d_sae x d_sae matrix.
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from variants import register
from variants.base import ConfigError, LinearSAE, LossOut, VariantConfig, param
from variants.common import correlation_matrix, kde_bandwidth, kde_mutual_information, mse_loss, paper_weight


@dataclass(kw_only=True)
class MIOrthoConfig(VariantConfig):
    l1_coeff: float = param(
        0.0037, "weight of the L1 penalty ||f||_1 (paper's per-element scale, applied x d_in; the paper's is 0.04)"
    )
    mi_scale: float = param(2.0, "tau_ij = base_weight * exp(mi_scale * I_ij)")
    base_weight: float = param(0.5, "tau_ij = base_weight * exp(mi_scale * I_ij)")
    bandwidth_factor: float = param(
        0.15, "KDE bandwidth h = bandwidth_factor * n^(-1/5) on standardised latents, n = tokens used"
    )
    pair_percentile: float = param(90.0, "keep candidate pairs whose MI is above this percentile")
    refresh_interval: int = param(20, "steps between refreshes of the penalised pair set")
    n_candidates: int = param(1024, "most correlated active pairs whose MI is estimated (also the pair buffer size)")
    kde_tokens: int = param(256, "tokens of the batch used by the KDE (its cost is n_candidates * kde_tokens^2)")
    max_active_latents: int = param(4096, "cap on active latents scanned for candidates (the most often firing)")
    input_batchnorm: bool = param(True, "BatchNorm on the encoder input (the paper's setup)")
    latent_dropout: float = param(0.1, "dropout on the latents the decoder reads, in training")

    def __post_init__(self):
        if not 0.0 <= self.pair_percentile < 100.0:
            raise ConfigError(f"pair_percentile must be in [0, 100), got {self.pair_percentile}")
        if self.refresh_interval < 1 or self.n_candidates < 1 or self.kde_tokens < 2:
            raise ConfigError("refresh_interval and n_candidates must be >= 1, kde_tokens >= 2")


def standardise(a: Tensor) -> Tensor:
    """Columns of a (n, k) at zero mean and unit standard deviation (constant columns at zero)."""
    centred = a - a.mean(0)
    return centred / centred.pow(2).mean(0).sqrt().clamp_min(1e-12)


@register("mi_ortho")
class MIOrtho(LinearSAE):
    Config = MIOrthoConfig
    description = "ReLU SAE + MI-scaled co-activation penalty on the KDE-most-dependent latent pairs"
    term_coefficients = {"l1": "l1_coeff", "mi_ortho": "base_weight"}
    sparsity_fields = ("l1_coeff",)

    def __init__(self, cfg: MIOrthoConfig):
        super().__init__(cfg)
        self.input_norm = nn.BatchNorm1d(cfg.d_in) if cfg.input_batchnorm else nn.Identity()
        self.register_buffer("pairs", torch.zeros(cfg.n_candidates, 2, dtype=torch.long))
        self.register_buffer("pair_mi", torch.zeros(cfg.n_candidates))
        self.register_buffer("pair_count", torch.tensor(0, dtype=torch.long))

    def encode(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        pre = self.input_norm(flat) @ self.W_enc + self.b_enc
        return torch.relu(pre).reshape(*x.shape[:-1], -1)

    # -- the pair set ------------------------------------------------------------------------
    def active_pairs(self) -> tuple[Tensor, Tensor]:
        n = int(self.pair_count)
        return self.pairs[:n], self.pair_mi[:n]

    def estimate_pair_mi(self, f: Tensor, pairs: Tensor) -> Tensor:
        """KDE MI of latent pairs (P, 2) on the first kde_tokens tokens of latents f (N, d_sae),
        each latent standardised over those tokens first (a constant latent stays at 0: MI 0)."""
        sample = standardise(f[: self.cfg.kde_tokens].detach())
        h = kde_bandwidth(sample.shape[0], self.cfg.bandwidth_factor)
        return kde_mutual_information(sample[:, pairs[:, 0]].T, sample[:, pairs[:, 1]].T, h)

    @torch.no_grad()
    def refresh_pairs(self, f: Tensor) -> None:
        f = f.detach().reshape(-1, f.shape[-1])
        counts = (f > 0).sum(0)
        active = torch.nonzero(counts).squeeze(-1)
        if active.numel() > self.cfg.max_active_latents:
            active = active[counts[active].topk(self.cfg.max_active_latents).indices]
        self.pair_count.zero_()
        m = active.numel()
        if m < 2 or f.shape[0] < 2:
            return
        corr = correlation_matrix(f, index=active).abs()
        upper = torch.triu(torch.ones(m, m, dtype=torch.bool, device=f.device), diagonal=1)
        scores = corr.masked_fill(~upper, -1.0).reshape(-1)
        top = scores.topk(min(self.cfg.n_candidates, m * (m - 1) // 2)).indices
        candidates = torch.stack([active[top // m], active[top % m]], dim=-1)
        mi = self.estimate_pair_mi(f, candidates)
        keep = mi > torch.quantile(mi, self.cfg.pair_percentile / 100.0)
        n = int(keep.sum())
        self.pairs[:n] = candidates[keep]
        self.pair_mi[:n] = mi[keep]
        self.pair_count.fill_(n)

    def pair_penalty(self, f: Tensor) -> Tensor:
        """sum over T of tau_ij * (a_i . a_j)^2, the co-activation summed over the batch's tokens."""
        pairs, mi = self.active_pairs()
        if pairs.shape[0] == 0:
            return f.new_zeros(())
        co = (f[:, pairs[:, 0]] * f[:, pairs[:, 1]]).sum(0)
        tau = self.cfg.base_weight * torch.exp(self.cfg.mi_scale * mi)
        return (tau * co.pow(2)).sum()

    def loss(self, x, step=0, mask=None):
        f = self.encode(x)
        if self.training and step % self.cfg.refresh_interval == 0:
            self.refresh_pairs(f)
        x_hat = self.decode(F.dropout(f, self.cfg.latent_dropout, self.training))
        terms = {
            "mse": mse_loss(x_hat, x),
            "l1": paper_weight(self.cfg.l1_coeff, self.cfg.d_in) * f.sum(-1).mean(),
            "mi_ortho": paper_weight(1.0, self.cfg.d_in) * self.pair_penalty(f),  # tau_ij carries the weights
        }
        return LossOut(total=sum(terms.values()), terms=terms, latents=f, recon=x_hat)

    @torch.no_grad()
    def diagnostics(self, x, mask=None):
        pairs, stored_mi = self.active_pairs()
        out = {
            "pair_count": float(pairs.shape[0]),
            "stored_pair_mi": float(stored_mi.mean()) if pairs.shape[0] else 0.0,
        }
        if pairs.shape[0]:
            f = self.encode(x).reshape(-1, self.cfg.d_sae)
            out["pair_mi"] = float(self.estimate_pair_mi(f, pairs).mean())
        else:
            out["pair_mi"] = 0.0
        return out
