"""TopK SAE (Gao et al. 2024): keep the k largest pre-activations, plus the AuxK loss that
revives dead latents.

  f = TopK_k(ReLU((x - b_dec) W_enc + b_enc)),   x_hat = f W_dec + b_dec,
  loss = MSE + aux_coeff * Var(x) * AuxK,   AuxK = ||e - e_hat||^2 / ||e - mean e||^2,

with e = x - x_hat (no gradient) and e_hat its reconstruction (no bias) from the top aux_k
pre-activations of the dead latents only.

Conventions: MSE summed over d_in, averaged over tokens. Gao et al. normalise their MSE by the
data's variance and add AuxK (a variance ratio: both sums over d_in, averaged over tokens) at
1/32; our summed MSE is Var(x) = E||x - mean x||^2 times theirs, so the code multiplies AuxK by
the batch's Var(x) (no gradient) and aux_coeff = 1/32 is Gao's effective weight exactly
(`common.topk_family_terms`). aux_k = 0 resolves to Gao's rule d_in / 2 (`aux_latents`). Dead:
silent for `dead_tokens` tokens; 0 resolves to 10 * d_sae (`dead_after`): a latent used at the
uniform rate k / d_sae misses about 10k (320) expected firings in that time, so only latents
firing about 300x less often than average count as dead. Gao's fixed 10M tokens would never
flag a latent in a default 300k-token run; 10 * d_sae (51k tokens at d_sae 5120, 655k at 65k)
works at both scales.

Rescaling: scaling the pre-activations by c keeps the top-k choice, and MSE and AuxK are
unchanged when W_dec carries 1/c; the decoder rows are unit norm anyway (after_step).

Defaults: `saeforge train`'s recipe, chosen by the recipe sweep for a 300k-token run: k = 64,
and the shared recipe of every variant (VariantConfig): lr 2e-3 held after the warm-up and
decayed linearly to 0 over the last 20% of steps, batches of 1024. Gao et al. train far longer at
lower rates; at lr 3e-4 a 300-step run is still undoing its initialisation. Measured:
docs/recipe.md#topk (the sweep: docs/recipe.md#the-default-recipe).

Cost per step: the linear SAE's matmuls plus a top-k over d_sae per token; training decodes the k
non-zeros sparsely (`common.sparse_decode`), and AuxK adds a (B x aux_k x d_in) decode when
latents are dead.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from variants import register
from variants.base import ConfigError, LinearSAE, LossOut, VariantConfig, param
from variants.common import sparse_decode, topk_family_terms, topk_relu

DEAD_AFTER_D_SAE = 10  # dead_tokens = 0: a latent silent for 10 * d_sae tokens is dead (see the docstring)


@dataclass(kw_only=True)
class TopKConfig(VariantConfig):
    k: int = param(64, "latents kept per token")
    aux_k: int = param(0, "dead latents used by the auxiliary loss; 0: d_in // 2 (Gao et al.'s rule)")
    aux_coeff: float = param(1 / 32, "weight of AuxK relative to a variance-normalised MSE (Gao et al.)")
    dead_tokens: int = param(0, "a latent silent for this many tokens counts as dead for AuxK; 0: 10 * d_sae")

    def __post_init__(self):
        if not 0 < self.k <= self.d_sae:
            raise ConfigError(f"k must be in 1..d_sae ({self.d_sae}), got {self.k}")
        if self.aux_k < 0:
            raise ConfigError(f"aux_k must be at least 0, got {self.aux_k}")


@register("topk")
class TopK(LinearSAE):
    Config = TopKConfig
    description = "TopK SAE: k largest pre-activations per token, AuxK loss on dead latents"
    saelens_architecture = "topk"
    term_coefficients = {"auxk": "aux_coeff"}
    l0_field = "k"

    def aux_latents(self) -> int:
        """aux_k, with 0 meaning Gao et al.'s d_in / 2."""
        return self.cfg.aux_k or self.cfg.d_in // 2

    def dead_after(self) -> int:
        """Tokens of silence after which a latent counts as dead (0 in the config: 10 * d_sae)."""
        return self.cfg.dead_tokens or DEAD_AFTER_D_SAE * self.cfg.d_sae

    def encode(self, x: Tensor) -> Tensor:
        return topk_relu(self.pre_activations(x), self.cfg.k)

    def loss(self, x, step=0, mask=None):
        pre = self.pre_activations(x)
        values, indices = pre.topk(min(self.cfg.k, pre.shape[-1]), dim=-1)
        values = values.relu()
        f = torch.zeros_like(pre).scatter(-1, indices, values)
        return self.topk_loss(x, pre, f, sparse_decode(indices, values, self.W_dec) + self.b_dec)

    def topk_loss(self, x: Tensor, pre: Tensor, f: Tensor, x_hat: Tensor | None = None) -> LossOut:
        """MSE + AuxK of the code f; `x_hat`: its decode when the caller has it sparse already."""
        x_hat = self.decode(f) if x_hat is None else x_hat
        dead = self.tokens_since_fired >= self.dead_after()
        terms = topk_family_terms(x, x_hat, pre, self.W_dec, dead, self.aux_latents(), self.cfg.aux_coeff)
        return LossOut(total=sum(terms.values()), terms=terms, latents=f, recon=x_hat)

    def saelens_fields(self) -> dict:
        """SAELens 6.x reads k from the top level (without it, k silently becomes 100)."""
        return {"k": self.cfg.k, "rescale_acts_by_decoder_norm": False}
