"""ReLU SAE with the decoder-norm-weighted L1 penalty (the papers' baseline).

Cost per step: two (B x d_in x d_sae) matmuls forward, as for every linear SAE.
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from variants import register
from variants.base import Variant, VariantConfig, param
from variants.common import decoder_norm_weighted_l1, tied_init


@dataclass(kw_only=True)
class ReluConfig(VariantConfig):
    l1_coeff: float = param(0.04, "weight of the L1 penalty sum_i f_i * ||w_i||")
    normalize_decoder: bool = param(False, "the L1 is weighted by decoder norms instead")


@register("relu")
class Relu(Variant):
    Config = ReluConfig
    description = "ReLU SAE, loss = MSE + l1_coeff * sum_i f_i ||w_i|| (standard baseline)"
    architecture = "standard"

    def __init__(self, cfg: ReluConfig):
        super().__init__(cfg)
        self.W_enc, self.W_dec = tied_init(cfg.d_in, cfg.d_sae, cfg.seed)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))

    def encode(self, x: Tensor) -> Tensor:
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def decode(self, f: Tensor) -> Tensor:
        return f @ self.W_dec + self.b_dec

    def penalties(self, x, f, x_hat, step):
        return {"l1": self.cfg.l1_coeff * decoder_norm_weighted_l1(f, self.W_dec)}
