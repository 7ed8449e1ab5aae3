"""Hierarchical SAE with a skip connection, from "Beyond Sparsity: Hierarchical Feature Organization
Reveals Fundamental Limits in Language Model Unlearning" (anonymous, under review). The latents
are [z1, z2], two levels of d_sae / 2 (the paper's k/2 + k/2):

  z1 = ReLU((x - bd1) W1 + b1),   z2 = ReLU(z1 W2 + b2),   x_hat = (z2 Wd2 + bd2) Wd1 + z1 Ws + bd1,
  loss = MSE + w(l1_level1) ||z1||_1 + w(l1_level2) ||z2||_1 + w(gram_coeff) ||G1 * G2||_F^2,

G_l = Z_l Z_l^T the batch's B x B Gram matrices, w(c) = c * d_in (`paper_weight`). MSE summed over
d_in, each L1 over its level's latents, both averaged over tokens; the Gram term, as the paper's,
summed over all B x B token pairs (diagonal included), so it grows with B^2 and the latents'
scale^8. The paper weighs its terms against an MSE averaged over d_in, so each coefficient is
applied x d_in: the paper's 0.03, 0.05 and 0.02.

Defaults: l1_level1 0.002, l1_level2 0.003, gram_coeff 1e-10, the shared recipe (Adam at 2e-3,
batches of 1024, decayed over the last 20%). At the paper's weight the Gram term dominates the loss
of a default-scale run and one level dies; at 1e-10 it still acts and the code is hierarchical (a
few level-1 parents, many level-2 children per token). The paper's setting: `--set l1_level1=0.03
l1_level2=0.05 gram_coeff=0.02 optimizer=adamw weight_decay=0.01 lr_schedule=cosine
batch_size=2048`. Measured: docs/recipe.md#hsae; the runs behind the defaults:
docs/recipe.md#behind-hsae.

The encoder reads x - bd1 (`center_input`; bd1 starts at the first batch's geometric median): the
paper's x W1 + b1 with b1 absorbing bd1 W1, but the offset follows the decoder bias; otherwise the
data's mean, most of each activation's norm, reaches every level-1 latent as W1 grows, faster than
b1 can follow. After each step Ws, W2 (the readers of z1) and Wd1 get unit rows and each Wd2 row is
scaled so that level-2 latent j's direction, row j of Wd2 Wd1 (`decoder_directions`), is unit: with
the paper's unit rows of Wd2 and Wd1 alone, Wd1's rows can align and z2 shrink behind longer
directions, lowering its L1 and the Gram term for free. `rescalings`: all latents, level 1 (z1 by c,
W2 and Ws by 1/c), level 2 (W2 and b2 by c, Wd2 by 1/c); the unit rows undo each.

Cost per step: three B x d_in x d_sae/2 matmuls, two B x (d_sae/2)^2, two B x B x d_sae/2 Gram
matrices (B^2 memory: 4 MiB at B = 1024), and after the step Wd2 Wd1 ((d_sae/2)^2 x d_in).
"""

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from variants import register
from variants.base import ConfigError, LatentGroups, LossOut, Variant, VariantConfig, param
from variants.common import geometric_median, gram_matrix, mse_loss, paper_weight, tied_init


@dataclass(kw_only=True)
class HSAEConfig(VariantConfig):
    l1_level1: float = param(
        0.002, "lambda_1: L1 weight on the level-1 latents z1 (paper's scale, applied x d_in; the paper's is 0.03)"
    )
    l1_level2: float = param(
        0.003, "lambda_2: L1 weight on the level-2 latents z2 (paper's scale, applied x d_in; the paper's is 0.05)"
    )
    gram_coeff: float = param(
        1.0e-10,
        "lambda_d: weight of ||G1 * G2||_F^2 summed over the B x B token pairs (paper's scale, applied x d_in; "
        "the paper's is 0.02)",
    )
    normalize_decoder: bool = param(
        True, "after each step: unit rows for Ws, W2 and Wd1, and unit level-2 directions (the rows of Wd2 Wd1)"
    )
    center_input: bool = param(
        True,
        "the encoder reads x - bd1 (as every linear SAE's reads x - b_dec; the same functions as the paper's "
        "W1 x + b1); false: the paper's W1 x + b1, with b1 shifted once at the start",
    )
    seed: int = param(42, "seed for the initial weights")

    def __post_init__(self):
        if self.d_sae < 2 or self.d_sae % 2:
            raise ConfigError(f"d_sae must be even (two levels of d_sae / 2), got {self.d_sae}")


@register("hsae")
class HSAE(Variant):
    Config = HSAEConfig
    description = "Two-level hierarchical SAE (d_sae / 2 latents per level, d_sae even) with a skip connection"
    term_coefficients = {"l1_level1": "l1_level1", "l1_level2": "l1_level2", "gram": "gram_coeff"}
    sparsity_fields = ("l1_level1", "l1_level2")

    def __init__(self, cfg: HSAEConfig):
        super().__init__(cfg)
        half = cfg.d_sae // 2
        self.W1, self.Ws = tied_init(cfg.d_in, half, cfg.seed, cfg.init_norm)
        self.W2, self.Wd2 = tied_init(half, half, cfg.seed + 1, cfg.init_norm)
        # Level 2 starts out decoding through the same dictionary as level 1's skip path.
        self.Wd1 = nn.Parameter(self.Ws.detach().clone())
        self.b1 = nn.Parameter(torch.zeros(half))
        self.b2 = nn.Parameter(torch.zeros(half))
        self.bd1 = nn.Parameter(torch.zeros(cfg.d_in))
        self.bd2 = nn.Parameter(torch.zeros(half))

    def levels(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z1 = torch.relu((x - self.bd1 if self.cfg.center_input else x) @ self.W1 + self.b1)
        return z1, torch.relu(z1 @ self.W2 + self.b2)

    def encode(self, x: Tensor) -> Tensor:
        return torch.cat(self.levels(x), dim=-1)

    def decode(self, f: Tensor) -> Tensor:
        z1, z2 = f.split(self.cfg.d_sae // 2, dim=-1)
        return (z2 @ self.Wd2 + self.bd2) @ self.Wd1 + z1 @ self.Ws + self.bd1

    def gram_penalty(self, z1: Tensor, z2: Tensor) -> Tensor:
        """||G1 * G2||_F^2 over the B x B token pairs of z1, z2 (B, d_sae / 2), unnormalised."""
        return (gram_matrix(z1) * gram_matrix(z2)).pow(2).sum()

    def loss(self, x, step=0, mask=None):
        c = self.cfg
        z1, z2 = self.levels(x)
        f = torch.cat([z1, z2], dim=-1)
        x_hat = self.decode(f)
        terms = {
            "mse": mse_loss(x_hat, x),
            "l1_level1": paper_weight(c.l1_level1, c.d_in) * z1.sum(-1).mean(),
            "l1_level2": paper_weight(c.l1_level2, c.d_in) * z2.sum(-1).mean(),
            "gram": paper_weight(c.gram_coeff, c.d_in)
            * self.gram_penalty(z1.reshape(-1, z1.shape[-1]), z2.reshape(-1, z2.shape[-1])),
        }
        return LossOut(total=sum(terms.values()), terms=terms, latents=f, recon=x_hat)

    def decoder_directions(self) -> Tensor:
        """Level-1 latents: Ws rows (skip path); level-2 latents: rows of Wd2 Wd1."""
        return torch.cat([self.Ws, self.Wd2 @ self.Wd1], dim=0)

    def latent_groups(self) -> LatentGroups:
        """Level 1 (the first d_sae / 2 latents, z1) and level 2 (z2)."""
        return LatentGroups("level", torch.arange(self.cfg.d_sae) // (self.cfg.d_sae // 2) + 1)

    @torch.no_grad()
    def normalize_decoder_rows(self) -> None:
        """Unit rows for the maps that read z1 (Ws, W2) and for Wd1; then each Wd2 row is scaled so
        that level-2 latent j's whole direction, row j of Wd2 Wd1, has unit norm."""
        for w in (self.Ws, self.W2, self.Wd1):
            w.div_(w.norm(dim=-1, keepdim=True).clamp_min(1e-8))
        self.Wd2.div_((self.Wd2 @ self.Wd1).norm(dim=-1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        """bd1 at the batch's geometric median, so the encoder reads x - median (without
        center_input, b1 is shifted by median W1 once instead)."""
        if self.cfg.b_dec_init == "geometric_median":
            median = geometric_median(x.reshape(-1, x.shape[-1])).to(self.bd1)
            if not self.cfg.center_input:
                self.b1.sub_(median @ self.W1)
            self.bd1.copy_(median)

    def _scale_latents(self, c: float) -> None:
        """Both levels: z1 by c (W1, b1), z2 by c (b2; W2 already sees c z1), readers Ws, Wd2 by 1/c."""
        for p in (self.W1, self.b1, self.b2):
            p.mul_(c)
        self.Ws.div_(c)
        self.Wd2.div_(c)

    def rescalings(self, c: float) -> dict[str, Variant]:
        """All latents, level 1 alone (W2 and Ws absorb it) and level 2 alone (Wd2 absorbs it)."""
        level1, level2 = copy.deepcopy(self), copy.deepcopy(self)
        with torch.no_grad():
            for p in (level1.W1, level1.b1):
                p.mul_(c)
            level1.W2.div_(c)
            level1.Ws.div_(c)
            for p in (level2.W2, level2.b2):
                p.mul_(c)
            level2.Wd2.div_(c)
        return {**super().rescalings(c), "level1": level1, "level2": level2}

    @torch.no_grad()
    def diagnostics(self, x, mask=None):
        z1, z2 = self.levels(x)
        return {
            "zero_fraction_level1": float((z1 == 0).float().mean()),
            "zero_fraction_level2": float((z2 == 0).float().mean()),
            "gram_penalty": float(self.gram_penalty(z1.reshape(-1, z1.shape[-1]), z2.reshape(-1, z2.shape[-1]))),
        }
