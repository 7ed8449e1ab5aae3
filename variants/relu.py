"""ReLU SAE with the decoder-norm-weighted L1 penalty (the papers' baseline).

Cost per step: two (B x d_in x d_sae) matmuls forward, as for every linear SAE.
"""

from dataclasses import dataclass




from variants import register
from variants.base import LinearSAE, VariantConfig, param
from variants.common import decoder_norm_weighted_l1


@dataclass(kw_only=True)
class ReluConfig(VariantConfig):
    l1_coeff: float = param(0.04, "weight of the L1 penalty sum_i f_i * ||w_i||")
    normalize_decoder: bool = param(False, "the L1 is weighted by decoder norms instead")


@register("relu")
class Relu(LinearSAE):
    Config = ReluConfig
    description = "ReLU SAE, loss = MSE + l1_coeff * sum_i f_i ||w_i|| (standard baseline)"
    architecture = "standard"

    def penalties(self, x, f, x_hat, step):
        return {"l1": self.cfg.l1_coeff * decoder_norm_weighted_l1(f, self.W_dec)}
