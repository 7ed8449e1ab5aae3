"""TopK SAE (Gao et al. 2024): keep the k largest pre-activations, plus the AuxK loss that
revives dead latents.

Cost per step: the linear SAE's matmuls plus a top-k over d_sae per token, and one extra
(B x aux_k x d_in) decode for AuxK when latents are dead.
"""

from dataclasses import dataclass

from torch import Tensor

from variants import register
from variants.base import LinearSAE, VariantConfig, param
from variants.common import mse_plus_auxk, topk_relu


@dataclass(kw_only=True)
class TopKConfig(VariantConfig):
    k: int = param(32, "latents kept per token")
    aux_k: int = param(256, "dead latents used by the auxiliary loss")
    aux_coeff: float = param(1 / 32, "weight of the AuxK loss")
    dead_tokens: int = param(10_000_000, "a latent silent for this many tokens counts as dead for AuxK")


@register("topk")
class TopK(LinearSAE):
    Config = TopKConfig
    description = "TopK SAE: k largest pre-activations per token, AuxK loss on dead latents"
    architecture = "topk"

    def encode(self, x: Tensor) -> Tensor:
        return topk_relu(self.pre_activations(x), self.cfg.k)

    def loss(self, x, step=0, mask=None):
        pre = self.pre_activations(x)
        f = topk_relu(pre, self.cfg.k)
        return mse_plus_auxk(self, x, pre, f)
