"""ReLU SAE with the decoder-norm-weighted L1 penalty (the papers' baseline).

  f = ReLU((x - b_dec) W_enc + b_enc),   x_hat = f W_dec + b_dec,
  loss = MSE + paper_weight(l1_coeff, d_in) * sum_i f_i ||w_i||.

Conventions: MSE summed over d_in, averaged over tokens; the L1 summed over latents, averaged
over tokens. l1_coeff is on the papers' per-element scale (their baseline 0.04 weighs the L1
against an MSE averaged over d_in), so the code applies l1_coeff * d_in (`paper_weight`): 0.04 is
about 25.6 at d_in 640.

Defaults: l1_coeff 0.0017 with unit-norm decoder rows (`normalize_decoder`, so the weighting is 1
and the L1 is the plain L1 of the earlier papers) and the shared recipe (lr 2e-3 held and decayed
over the last 20%, batches of 1024). In a default-scale run unit-norm rows give a sparser, more
faithful code than free rows with the norm-weighted L1, and the papers' 0.04 a sparse code that
reconstructs little. The papers' setting: `--set l1_coeff=0.04 lr=3e-4 lr_schedule=constant
normalize_decoder=false`. Anthropic's April 2024 recipe (lambda ~5 on our MSE convention, decoder
rows free and the L1 weighted by their norms, an L1 warm-up capped at 10% of a run like every
penalty warm-up): `--set l1_coeff=0.0078 normalize_decoder=false l1_warmup_steps=1000` at d_in 640
(l1_coeff = 5 / d_in). Measured: docs/recipe.md#relu.

Rescaling: the L1 weighs each latent by its decoder norm, so scaling f_i by c and w_i by 1/c
leaves the loss exactly unchanged (and unit-norm rows undo the move).

Cost per step: two (B x d_in x d_sae) matmuls forward, as for every linear SAE.
"""

from dataclasses import dataclass

from variants import register
from variants.base import LinearSAE, VariantConfig, param
from variants.common import decoder_norm_weighted_l1, linear_ramp, paper_weight


@dataclass(kw_only=True)
class ReluConfig(VariantConfig):
    l1_coeff: float = param(0.0017, "weight of sum_i f_i ||w_i|| on the papers' per-element scale (applied x d_in)")
    l1_warmup_steps: int = param(0, "steps over which the L1 weight ramps from 0 (capped at 10% of a run); 0: none")
    normalize_decoder: bool = param(
        True, "renormalise decoder rows to unit norm after each step (false: rows free, the L1 weighted by their norms)"
    )


@register("relu")
class Relu(LinearSAE):
    Config = ReluConfig
    description = "ReLU SAE, loss = MSE + l1_coeff * sum_i f_i ||w_i|| (standard baseline)"
    saelens_architecture = "standard"
    term_coefficients = {"l1": "l1_coeff"}
    sparsity_fields = ("l1_coeff",)

    def penalties(self, x, f, x_hat, step):
        ramp = linear_ramp(step, self.penalty_warmup(self.cfg.l1_warmup_steps))
        return {"l1": ramp * paper_weight(self.cfg.l1_coeff, self.cfg.d_in) * decoder_norm_weighted_l1(f, self.W_dec)}
