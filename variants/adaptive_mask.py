"""Adaptive-mask SAE (the HSAE paper's comparison variant): a ReLU SAE whose latents are
multiplied by a learnt per-latent importance gate m_i = sigmoid(mask_logit_i), with an L1 on the
gates (they are positive, so it is their sum):

  f = ReLU((x - b_dec) W_enc + b_enc) * m,   loss = MSE + l1_coeff ||f||_1 + mask_l1_coeff sum_i m_i.

The paper gives no gate penalty or initial gate; both are config fields (gates start at
sigmoid(mask_init_logit) ~ 0.88, nearly open). Training settings match hsae's.

Cost per step: the linear SAE's two (B x d_in x d_sae) matmuls plus d_sae gates.
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from variants import register
from variants.base import LinearSAE, VariantConfig, param


@dataclass(kw_only=True)
class AdaptiveMaskConfig(VariantConfig):
    l1_coeff: float = param(0.04, "weight of the L1 penalty ||f||_1 on the gated latents")
    mask_l1_coeff: float = param(0.001, "weight of the L1 penalty sum_i sigmoid(mask_logit_i) on the gates")
    mask_init_logit: float = param(2.0, "initial gate logit of every latent (sigmoid(2) ~ 0.88)")
    optimizer: str = param("adamw", "'adam' or 'adamw' (matched to hsae's training settings)")
    weight_decay: float = param(0.01, "AdamW weight decay")
    lr_schedule: str = param("cosine", "after warm-up: 'constant' or 'cosine' decay to 0")
    batch_size: int = param(2048, "activation tokens per optimiser step")
    seed: int = param(42, "seed for the initial weights")


@register("adaptive_mask")
class AdaptiveMask(LinearSAE):
    Config = AdaptiveMaskConfig
    description = "ReLU SAE with a learnt per-latent sigmoid importance gate and an L1 on the gates"
    architecture = "adaptive_mask"

    def __init__(self, cfg: AdaptiveMaskConfig):
        super().__init__(cfg)
        self.mask_logit = nn.Parameter(torch.full((cfg.d_sae,), cfg.mask_init_logit))

    def gates(self) -> Tensor:
        return torch.sigmoid(self.mask_logit)

    def encode(self, x: Tensor) -> Tensor:
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc) * self.gates()

    def penalties(self, x, f, x_hat, step):
        return {"l1": self.cfg.l1_coeff * f.sum(-1).mean(), "mask_l1": self.cfg.mask_l1_coeff * self.gates().sum()}

    @torch.no_grad()
    def diagnostics(self, x, mask=None):
        gates = self.gates()
        return {"mask_mean": float(gates.mean()), "mask_below_half": float((gates < 0.5).float().mean()),
                "zero_fraction": float((self.encode(x) == 0).float().mean())}
