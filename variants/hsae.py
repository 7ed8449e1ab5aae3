"""Hierarchical SAE with a skip connection (seed 004). The d_sae latents are two levels of
d_sae / 2 each (the paper's k/2 + k/2):

  z1 = ReLU(x W1 + b1),   z2 = ReLU(z1 W2 + b2),
  x_hat = (z2 Wd2 + bd2) Wd1 + z1 Ws + bd1,
  loss = MSE + l1_level1 ||z1||_1 + l1_level2 ||z2||_1 + gram_coeff ||G1 * G2||_F^2 / B^2,

with G_l = Z_l Z_l^T the B x B Gram matrices of the batch. Rows are the per-latent directions:
Wd1 (d_sae/2 x d_in), Wd2 (d_sae/2 x d_sae/2) and Ws (d_sae/2 x d_in); Wd1 and Wd2 have unit-norm
rows (renormalised after each step), Ws does not (the paper constrains only those two).
The latents are [z1, z2] concatenated; `decode` takes that vector.

Decoder directions: x_hat is linear in (z1, z2), so each latent's exact direction is its column of
the Jacobian: Ws row i for level-1 latent i (its skip path, the only way z1 reaches x_hat
linearly) and (Wd2 Wd1) row j for level-2 latent j.

Cost per step: three matmuls B x d_in x d_sae/2 (encode, skip, Wd1), two B x (d_sae/2)^2
(W2, Wd2), and two B x B x d_sae/2 Gram matrices (B^2 memory: 16 MiB at B = 2048).
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from variants import register
from variants.base import ConfigError, LossOut, Variant, VariantConfig, mse_loss, param
from variants.common import gram_matrix, tied_init


@dataclass(kw_only=True)
class HSAEConfig(VariantConfig):
    l1_level1: float = param(0.03, "lambda_1: L1 weight on the level-1 latents z1")
    l1_level2: float = param(0.05, "lambda_2: L1 weight on the level-2 latents z2")
    gram_coeff: float = param(0.02, "lambda_d: weight of ||G1 * G2||_F^2 / B^2 (disentanglement)")
    optimizer: str = param("adamw", "'adam' or 'adamw'")
    weight_decay: float = param(0.01, "AdamW weight decay (the paper names AdamW only: PyTorch's default)")
    lr_schedule: str = param("cosine", "after warm-up: 'constant' or 'cosine' decay to 0")
    batch_size: int = param(2048, "activation tokens per optimiser step")
    normalize_decoder: bool = param(True, "renormalise the rows of Wd1 and Wd2 to unit norm after each step")
    seed: int = param(42, "seed for the initial weights")

    def __post_init__(self):
        if self.d_sae < 2 or self.d_sae % 2:
            raise ConfigError(f"d_sae must be even (two levels of d_sae / 2), got {self.d_sae}")


@register("hsae")
class HSAE(Variant):
    Config = HSAEConfig
    description = "Two-level hierarchical SAE (d_sae / 2 latents per level, d_sae even) with a skip connection"
    architecture = "hsae"

    def __init__(self, cfg: HSAEConfig):
        super().__init__(cfg)
        half = cfg.d_sae // 2
        self.W1, self.Ws = tied_init(cfg.d_in, half, cfg.seed)
        self.W2, self.Wd2 = tied_init(half, half, cfg.seed + 1)
        # Level 2 starts out decoding through the same dictionary as level 1's skip path.
        self.Wd1 = nn.Parameter(self.Ws.detach().clone())
        self.b1 = nn.Parameter(torch.zeros(half))
        self.b2 = nn.Parameter(torch.zeros(half))
        self.bd1 = nn.Parameter(torch.zeros(cfg.d_in))
        self.bd2 = nn.Parameter(torch.zeros(half))

    def levels(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z1 = torch.relu(x @ self.W1 + self.b1)
        return z1, torch.relu(z1 @ self.W2 + self.b2)

    def encode(self, x: Tensor) -> Tensor:
        return torch.cat(self.levels(x), dim=-1)

    def decode(self, f: Tensor) -> Tensor:
        z1, z2 = f.split(self.cfg.d_sae // 2, dim=-1)
        return (z2 @ self.Wd2 + self.bd2) @ self.Wd1 + z1 @ self.Ws + self.bd1

    def gram_penalty(self, z1: Tensor, z2: Tensor) -> Tensor:
        """||G1 * G2||_F^2 / B^2."""
        batch = z1.shape[0]
        return (gram_matrix(z1) * gram_matrix(z2)).pow(2).sum() / batch**2

    def loss(self, x, step=0, mask=None):
        c = self.cfg
        z1, z2 = self.levels(x)
        f = torch.cat([z1, z2], dim=-1)
        x_hat = self.decode(f)
        terms = {
            "mse": mse_loss(x_hat, x),
            "l1_level1": c.l1_level1 * z1.sum(-1).mean(),
            "l1_level2": c.l1_level2 * z2.sum(-1).mean(),
            "gram": c.gram_coeff * self.gram_penalty(z1.reshape(-1, z1.shape[-1]), z2.reshape(-1, z2.shape[-1])),
        }
        return LossOut(total=sum(terms.values()), terms=terms, latents=f, recon=x_hat)

    def decoder_directions(self) -> Tensor:
        """Level-1 latents: Ws rows (skip path); level-2 latents: rows of Wd2 Wd1."""
        return torch.cat([self.Ws, self.Wd2 @ self.Wd1], dim=0)

    @torch.no_grad()
    def normalize_decoder_rows(self) -> None:
        for w in (self.Wd1, self.Wd2):
            w.div_(w.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def diagnostics(self, x, mask=None):
        z1, z2 = self.levels(x)
        return {"zero_fraction_level1": float((z1 == 0).float().mean()),
                "zero_fraction_level2": float((z2 == 0).float().mean()),
                "gram_penalty": float(self.gram_penalty(z1.reshape(-1, z1.shape[-1]), z2.reshape(-1, z2.shape[-1])))}
