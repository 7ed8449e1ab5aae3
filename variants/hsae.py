"""Hierarchical SAE with a skip connection (seed 004). The d_sae latents are two levels of
d_sae / 2 each (the paper's k/2 + k/2):

  z1 = ReLU((x - bd1) W1 + b1),   z2 = ReLU(z1 W2 + b2),
  x_hat = (z2 Wd2 + bd2) Wd1 + z1 Ws + bd1,
  loss = MSE + w(l1_level1) ||z1||_1 + w(l1_level2) ||z2||_1 + w(gram_coeff) ||G1 * G2||_F^2,
  w(c) = c * d_in (`paper_weight`),

with G_l = Z_l Z_l^T the B x B Gram matrices of the batch. Rows are the per-latent maps: Ws
(d_sae/2 x d_in, level 1's skip path), W2 (d_sae/2 x d_sae/2, how each z1 latent feeds level 2),
Wd2 (d_sae/2 x d_sae/2) and Wd1 (d_sae/2 x d_in). The paper constrains Wd1 and Wd2 to unit rows;
here, after each step, the maps that read z1 (Ws, W2) and Wd1 have unit rows, and each Wd2 row is
scaled so that level-2 latent j's whole direction, row j of Wd2 Wd1, has unit norm. Otherwise Ws
and W2 absorb a shrinking z1 (the level-1 L1 stops controlling the per-level zero fraction, the
paper's headline number), and unit rows of Wd2 and Wd1 alone do not bound level 2's gain: Wd1's
d_sae/2 unit rows in d_in dimensions can align, and measured in the default run's budget the
level-2 directions grew to a median norm of 2.9-3.7 (max 6.5), so z2 shrank by that factor under
its L1 and by its fourth power under the Gram term, with the reconstruction unchanged. The
latents are [z1, z2] concatenated; `decode` takes that vector.

Conventions: MSE summed over d_in, averaged over tokens. The paper's coefficients (0.03, 0.05,
0.02) weigh its terms against an MSE averaged over d_in, so each is applied times d_in. The L1s
are summed over a level's latents and averaged over tokens. The Gram term is the paper's: summed
over all B x B token pairs, no division by B^2 (the first implementation divided by B^2, which
made its weight 1 / B^2 of the paper's: 1 / 4.2M at B = 2048); it grows with B^2 and with the
latents' scale^8, so at the paper's weight it dominates the loss. Its diagonal (a = b) penalises
||z1_a||^2 ||z2_a||^2, as the paper's formula does.

The encoder reads x - bd1 (`center_input`), as every linear SAE's reads x - b_dec: the same
functions as the paper's z1 = ReLU(x W1 + b1) (b1 absorbs bd1 W1), but the offset follows the
decoder bias as W1 grows. Without it (the paper's form, b1 shifted by the median once at the
start) the data's mean, most of each activation's norm here (E||x||^2 = 640 with a variance of
about 80 after normalisation), reaches every level-1 latent through W1 as W1 grows, faster than
b1 can follow: at 100k tokens (lr 2e-3) level 1 ended with mean |corr| 0.74 between latents,
level 2 silent and explained variance 0.27 (docs/recipe.md).

Defaults, measured (issue 15; docs/recipe.md has the runs): l1_level1 0.002, l1_level2 0.003,
gram_coeff 1e-10, the shared recipe (Adam at 2e-3, batches of 1024, decayed over the last 20%). In
the default run's 300k tokens on Gemma 3 270M layer 6 (d_sae 5120) the Gram term at the paper's
0.02 is about 1e7 times the MSE when both levels fire: it silences level 2 and, since for a given
L1 a code spread over many small latents has the smallest ||z1||^2, it makes level 1 dense
(measured with unit Wd2 rows, before the level-2 directions were made unit: the paper's weights and
training gave L0 419 and explained variance 0.35; L1s 0.002 / 0.003 with it L0 1,172, all of it
level 1; at 1e-8 L0 429, level 1 again). At 1e-10 it cuts the Gram penalty 140x at a cost of 0.01
explained variance. Without it, or at 1e-10, the code is hierarchical: about 16 level-1 latents per
token (the parents, 0.5% of level 1) and 200 level-2 latents (their children, 8%), explained
variance 0.75 (the defaults: L0 211, CE loss recovered 0.70); larger L1s do not make it sparser
(0.003 / 0.005: L0 203, 0.49; 0.005 / 0.008: L0 141, 0.37, mean |corr| 0.93): level 2 keeps about
150-200 latents firing whatever its L1. `--set l1_level1=0.03 l1_level2=0.05 gram_coeff=0.02
optimizer=adamw weight_decay=0.01 lr_schedule=cosine batch_size=2048` is the paper's setting.

Initialisation from data (`b_dec_init`): bd1 at the batch's geometric median.

Decoder directions: x_hat is linear in (z1, z2), so each latent's exact direction is its column of
the Jacobian: Ws row i for level-1 latent i (its skip path, the only way z1 reaches x_hat
linearly) and (Wd2 Wd1) row j for level-2 latent j.

Rescaling moves (`rescalings`): all latents, level 1 only (z1 by c, W2 and Ws by 1/c) and level 2
only (W2 and b2 by c, Wd2 by 1/c); after_step's unit rows undo each.

Cost per step: three matmuls B x d_in x d_sae/2 (encode, skip, Wd1), two B x (d_sae/2)^2
(W2, Wd2), two B x B x d_sae/2 Gram matrices (B^2 memory: 4 MiB at B = 1024), and after the step
Wd2 Wd1, (d_sae/2)^2 x d_in, for the level-2 norms.
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
