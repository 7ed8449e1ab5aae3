"""ReLU SAE with the decoder-norm-weighted L1 penalty (the papers' baseline).

  f = ReLU((x - b_dec) W_enc + b_enc),   x_hat = f W_dec + b_dec,
  loss = MSE + paper_weight(l1_coeff, d_in) * sum_i f_i ||w_i||.

Conventions: MSE summed over d_in, averaged over tokens; the L1 summed over latents, averaged
over tokens. l1_coeff is on the seed papers' per-element scale (their baseline 0.04 weighs the
L1 against an MSE averaged over d_in), so the code applies l1_coeff * d_in (`paper_weight`):
0.04 is about 25.6 at d_in 640. Anthropic's April 2024 recipe (lambda ~5 on our MSE convention,
decoder rows free and the L1 weighted by their norms, an L1 warm-up: `l1_warmup_steps`, capped
at 10% of a run like every penalty warm-up) is `--set l1_coeff=0.0078 normalize_decoder=false
l1_warmup_steps=1000` at d_in 640 (l1_coeff = 5 / d_in).

Defaults, measured (VARIANTS.md: whatever gives a sparse, faithful SAE in the default run's
budget; docs/recipe.md has the sweep): l1_coeff 0.0017 with unit-norm decoder rows
(`normalize_decoder`, so the weighting is 1 and the L1 is the plain L1 of the earlier papers) and
the shared recipe (lr 2e-3 held and decayed over the last 20%, batches of 1024). On Gemma 3 270M
layer 6 (d_sae 5120, 100k tokens) unit-norm rows reach explained variance 0.79 at L0 43 where
free rows with the norm-weighted L1 reach 0.59 at L0 62 (l1_coeff 0.006); at the default run's
300k tokens the defaults give L0 40, CE loss recovered 0.80 and explained variance 0.87 (at L0
75 the previous best relu recipe, free rows, reached 0.58 and 0.70). The papers' 0.04
gives L0 36 with explained variance 0.09 at 300k tokens; `--set l1_coeff=0.04 lr=3e-4
lr_schedule=constant normalize_decoder=false` is the previous default (the papers' setting).

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
