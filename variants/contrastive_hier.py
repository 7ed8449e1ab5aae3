"""Contrastive hierarchical SAE, from "The Limits of Structural Approaches to Knowledge Separation: A
Systematic Study of Hierarchical Sparse Autoencoders" (anonymous, under review): a ReLU SAE
(LayerNorm on its input) whose latents are assigned to n_coarse coarse groups of n_fine fine
sub-groups each (8 x 8 = 64 fine groups), with orthogonality of co-activation between groups and
an InfoNCE term pulling each latent's decoder direction to its fine group's centroid.

Assignment: keys K = W_dec W_key (decoder directions, detached: the assignment reads them but
does not move them) and learnt queries per group at each level give coarse membership
softmax(q1 K^T / tau) over the coarse groups and fine membership softmax(q2 K^T / tau) over the
children of each coarse group (joint = coarse x child); tau = exp(log_tau) is learnt (init 1.0).
The hard assignment the losses use (coarse = argmax, fine = argmax child of that coarse group)
is refreshed every `refresh_interval` steps into a buffer, so checkpoints carry it. An entropy
regulariser, entropy_coeff * sum over levels of (log G - H(mean membership)), keeps groups in use.

  L_ortho = coarse_ortho_coeff * sum_{coarse i != j} ||H_i^T H_j||_F
          + fine_ortho_coeff * sum_{coarse c} sum_{siblings j != k in c} ||H_cj^T H_ck||_F
over ordered pairs, H_g the batch columns of group g. Only latents active in the batch have
non-zero columns, so the blocks are computed on the m active latents, one coarse block-row
H_i^T H_active (m_i x m) at a time.

  loss = MSE + w(l1_coeff) ||f||_1 + w(1) L_ortho + w(contrast_coeff) L_contrast
         + w(entropy_coeff) entropy gap,   w(c) = c * d_in (`paper_weight`).

Conventions: MSE summed over d_in, averaged over tokens; ||f||_1 summed over latents, averaged
over tokens. L_ortho is the paper's: Frobenius norms of co-activation blocks summed over the
batch's tokens and over ordered group pairs, with no division by B, so it grows with B, as in the
paper. InfoNCE is averaged over latents, the entropy gap summed over the two levels. Every
coefficient is on the paper's per-element scale (weighed against an MSE averaged over d_in), so
each is applied times d_in.

Defaults: the contrast (0.1) and entropy (0.01) weights and the training (AdamW, weight decay
0.01, batches of 2048) are the paper's; the L1 (0.001, the paper's 0.04) and the orthogonality
weights (2e-7 / 1e-7) are not. The paper writes its loss as MSE + lambda_1 L1 + lambda_2 L_ortho
with alpha_L1 = 0.4 and alpha_L2 = 0.2 inside L_ortho and never gives lambda_2; read as
lambda_2 = 1, the term is orders of magnitude above the MSE at the start of a run and silences
the SAE at any L1. At 2e-7 / 1e-7 (the paper's 2:1 ratio) it acts at a small cost. With the
shared recipe's batches of 1024 its groups stop separating, so it keeps the paper's training.
The paper's reading: `--set l1_coeff=0.04 coarse_ortho_coeff=0.4 fine_ortho_coeff=0.2`.
Measured: docs/recipe.md#contrastive_hier.

Rescaling: L1 and L_ortho fall with the latents, but decoder rows are unit norm (after_step).

Cost per step: the linear SAE's matmuls, B x m^2 for the ortho blocks (peak memory m^2 / n_coarse
per block-row), d_sae x d_in x key_dim for the keys and d_sae x 64 x d_in for the centroids and
InfoNCE. d_sae must be at least n_coarse * n_fine (64).
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from variants import register
from variants.base import ConfigError, LatentGroups, LinearSAE, LossOut, VariantConfig, param
from variants.common import (
    categorical_entropy,
    info_nce_to_centroids,
    mean_abs_correlation,
    mean_offdiag_cosine,
    membership_centroids,
    mse_loss,
    paper_weight,
)


@dataclass(kw_only=True)
class ContrastiveHierConfig(VariantConfig):
    n_coarse: int = param(8, "coarse groups (d_sae must be >= n_coarse * n_fine)")
    n_fine: int = param(8, "fine sub-groups per coarse group")
    key_dim: int = param(64, "width of the key projection and the group queries")
    assign_temperature_init: float = param(1.0, "initial value of the learnt assignment temperature tau")
    refresh_interval: int = param(50, "steps between refreshes of the hard group assignment")
    entropy_coeff: float = param(
        0.01, "weight of the entropy regulariser on the mean group assignment (paper's scale, applied x d_in)"
    )
    l1_coeff: float = param(
        0.001, "weight of the L1 penalty ||f||_1 (per-element scale, applied x d_in; the paper's is 0.04)"
    )
    coarse_ortho_coeff: float = param(
        2.0e-7,
        "lambda_2 alpha_L1: weight of ||H_i^T H_j||_F between coarse groups (applied x d_in; the paper's reading: 0.4)",
    )
    fine_ortho_coeff: float = param(
        1.0e-7,
        "lambda_2 alpha_L2: weight of ||H^T H||_F between sibling fine groups (x d_in; the paper's reading: 0.2)",
    )
    contrast_coeff: float = param(
        0.1, "weight of the InfoNCE term against fine-group centroids (paper's scale, applied x d_in)"
    )
    contrast_temperature: float = param(0.1, "temperature of the InfoNCE term")
    input_layernorm: bool = param(True, "LayerNorm on the encoder input x - b_dec")
    optimizer: str = param("adamw", "'adam' or 'adamw'")
    weight_decay: float = param(0.01, "AdamW weight decay")
    batch_size: int = param(2048, "activation tokens per optimiser step")
    seed: int = param(42, "seed for the initial weights")

    def __post_init__(self):
        if self.d_sae < self.n_coarse * self.n_fine:
            groups = self.n_coarse * self.n_fine
            raise ConfigError(f"d_sae ({self.d_sae}) must be >= n_coarse * n_fine ({groups})")
        if self.refresh_interval < 1 or self.assign_temperature_init <= 0:
            raise ConfigError("refresh_interval must be >= 1 and assign_temperature_init > 0")


def group_block_norms(products: Tensor, row_ids: Tensor, col_ids: Tensor, n_row: int, n_col: int) -> Tensor:
    """||A_r^T B_c||_F for every row group r and column group c (n_row, n_col), from the products
    A^T B (k_a, k_b) and the group id of each of their rows and columns."""
    sq = products.pow(2)
    blocks = F.one_hot(row_ids, n_row).to(sq.dtype).T @ sq @ F.one_hot(col_ids, n_col).to(sq.dtype)
    return torch.where(blocks > 0, blocks.clamp_min(1e-30).sqrt(), torch.zeros_like(blocks))


def hierarchical_ortho(f: Tensor, fine_id: Tensor, n_coarse: int, n_fine: int) -> tuple[Tensor, Tensor]:
    """(sum over coarse i != j of ||H_i^T H_j||_F, sum over sibling fine groups j != k of
    ||H_j^T H_k||_F), unnormalised (the paper's scale). f is (B, d_sae), fine_id (d_sae,) holds
    coarse * n_fine + child. Inactive latents have zero columns, so only active ones are used."""
    active = torch.nonzero((f.detach() > 0).any(0)).squeeze(-1)
    fa, ids = f[:, active], fine_id[active]
    coarse, child = ids // n_fine, ids % n_fine
    coarse_total = f.new_zeros(())
    fine_total = f.new_zeros(())
    for c in range(n_coarse):
        in_c = coarse == c
        if not bool(in_c.any()):
            continue
        products = fa[:, in_c].T @ fa  # one coarse block-row: (m_c, m)
        rows = torch.zeros_like(child[in_c])
        to_coarse = group_block_norms(products, rows, coarse, 1, n_coarse)[0]
        coarse_total = coarse_total + to_coarse.sum() - to_coarse[c]
        siblings = group_block_norms(products[:, in_c], child[in_c], child[in_c], n_fine, n_fine)
        fine_total = fine_total + siblings.sum() - siblings.diagonal().sum()
    return coarse_total, fine_total


@register("contrastive_hier")
class ContrastiveHier(LinearSAE):
    Config = ContrastiveHierConfig
    description = "ReLU SAE with 8x8 learnt latent groups: hierarchical co-activation orthogonality + InfoNCE"
    term_coefficients = {
        "l1": "l1_coeff",
        "ortho_coarse": "coarse_ortho_coeff",
        "ortho_fine": "fine_ortho_coeff",
        "contrast": "contrast_coeff",
        "entropy": "entropy_coeff",
    }
    sparsity_fields = ("l1_coeff",)

    def __init__(self, cfg: ContrastiveHierConfig):
        super().__init__(cfg)
        self.input_norm = nn.LayerNorm(cfg.d_in) if cfg.input_layernorm else nn.Identity()
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.W_key = nn.Parameter(torch.randn(cfg.d_in, cfg.key_dim, generator=gen) / math.sqrt(cfg.d_in))
        self.q_coarse = nn.Parameter(torch.randn(cfg.n_coarse, cfg.key_dim, generator=gen) / math.sqrt(cfg.key_dim))
        self.q_fine = nn.Parameter(
            torch.randn(cfg.n_coarse * cfg.n_fine, cfg.key_dim, generator=gen) / math.sqrt(cfg.key_dim)
        )
        self.log_tau = nn.Parameter(torch.tensor(math.log(cfg.assign_temperature_init)))
        self.register_buffer("assignment", torch.zeros(cfg.d_sae, dtype=torch.long))
        self.refresh_assignment()

    @property
    def n_groups(self) -> int:
        return self.cfg.n_coarse * self.cfg.n_fine

    def encode(self, x: Tensor) -> Tensor:
        return torch.relu(self.input_norm(x - self.b_dec) @ self.W_enc + self.b_enc)

    def latent_groups(self) -> LatentGroups:
        """Each latent's fine group (coarse group x n_fine + child), its hard assignment."""
        return LatentGroups("group", self.assignment.clone())

    # -- assignment ----------------------------------------------------------------------------
    def membership(self) -> tuple[Tensor, Tensor]:
        """Soft memberships: coarse (d_sae, n_coarse) and joint fine (d_sae, n_coarse * n_fine)."""
        keys = self.W_dec.detach() @ self.W_key
        tau = self.log_tau.exp()
        coarse = torch.softmax(keys @ self.q_coarse.T / tau, dim=-1)
        child = torch.softmax((keys @ self.q_fine.T / tau).view(-1, self.cfg.n_coarse, self.cfg.n_fine), dim=-1)
        return coarse, (coarse.unsqueeze(-1) * child).flatten(1)

    @torch.no_grad()
    def refresh_assignment(self) -> None:
        coarse, fine = self.membership()
        c = coarse.argmax(-1)
        child = fine.view(-1, self.cfg.n_coarse, self.cfg.n_fine)[torch.arange(c.numel()), c].argmax(-1)
        self.assignment.copy_(c * self.cfg.n_fine + child)

    def loss(self, x, step=0, mask=None):
        c = self.cfg
        if self.training and step % c.refresh_interval == 0:
            self.refresh_assignment()
        f = self.encode(x)
        x_hat = self.decode(f)
        coarse_m, fine_m = self.membership()
        coarse_ortho, fine_ortho = hierarchical_ortho(f.reshape(-1, c.d_sae), self.assignment, c.n_coarse, c.n_fine)
        centroids = membership_centroids(self.W_dec, fine_m)
        entropy_gap = (
            math.log(c.n_coarse)
            - categorical_entropy(coarse_m.mean(0))
            + math.log(self.n_groups)
            - categorical_entropy(fine_m.mean(0))
        )
        contrast = info_nce_to_centroids(self.W_dec, centroids, self.assignment, c.contrast_temperature)
        terms = {
            "mse": mse_loss(x_hat, x),
            "l1": paper_weight(c.l1_coeff, c.d_in) * f.sum(-1).mean(),
            "ortho_coarse": paper_weight(c.coarse_ortho_coeff, c.d_in) * coarse_ortho,
            "ortho_fine": paper_weight(c.fine_ortho_coeff, c.d_in) * fine_ortho,
            "contrast": paper_weight(c.contrast_coeff, c.d_in) * contrast,
            "entropy": paper_weight(c.entropy_coeff, c.d_in) * entropy_gap,
        }
        return LossOut(total=sum(terms.values()), terms=terms, latents=f, recon=x_hat)

    @torch.no_grad()
    def diagnostics(self, x, mask=None):
        f = self.encode(x).reshape(-1, self.cfg.d_sae)
        _, fine_m = self.membership()
        occupancy = torch.bincount(self.assignment, minlength=self.n_groups).float()
        signals = f @ F.one_hot(self.assignment, self.n_groups).to(f.dtype)  # (B, groups)
        conds = []
        for g in range(self.n_groups):
            rows = self.W_dec[self.assignment == g]
            if rows.shape[0] >= 2:
                s = torch.linalg.svdvals(rows.float())
                conds.append(float(s[0] / s[-1].clamp_min(1e-8)))
        return {
            "assignment_entropy": float(categorical_entropy(occupancy)),
            "membership_entropy": float(categorical_entropy(fine_m).mean()),
            "groups_used": float((occupancy > 0).sum()),
            "inter_group_correlation": mean_abs_correlation(signals),
            "centroid_cosine": mean_offdiag_cosine(membership_centroids(self.W_dec, fine_m)),
            "group_condition_number": sum(conds) / len(conds) if conds else 0.0,
        }
