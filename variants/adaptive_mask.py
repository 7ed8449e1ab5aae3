"""Adaptive-mask SAE, a comparison variant of "Beyond Sparsity: Hierarchical Feature Organization
Reveals Fundamental Limits in Language Model Unlearning" (the hsae paper): a ReLU SAE whose
latents are multiplied by a learnt per-latent importance gate m_i = sigmoid(mask_logit_i), with an
L1 on the gates, each weighted by the norm of the encoder column it gates:

  u = ReLU((x - b_dec) W_enc + b_enc),   f = u * m,   x_hat = f W_dec + b_dec,
  loss = MSE + w(l1_coeff) ||f||_1 + w(mask_l1_coeff) sum_i m_i ||W_enc[:, i]||,
  w(c) = c * d_in (`paper_weight`).

The gate must mean something: a plain sum_i m_i is absorbed into the encoder (m_i times c and
column i of W_enc and b_i times 1/c leave f unchanged and lower the gate penalty for free), and f
into the decoder (f times c, W_dec rows times 1/c lower both L1s). Weighting each gate by its
encoder column's norm penalises the latent's whole gain m_i ||W_enc[:, i]||, which that move
leaves unchanged (as the decoder-norm-weighted L1 does for the decoder), and the decoder's rows
are renormalised to unit norm after each step. `normalize_encoder` (off by default) renormalises
the encoder columns instead, so the norms are 1 and the penalty is the plain sum of the gates; it
costs fidelity, because an encoder of unit columns cannot undo the L1's shrinkage and the gate
(<= 1) can only shrink further.

Conventions: MSE summed over d_in, averaged over tokens; ||f||_1 summed over latents, averaged
over tokens; the gate penalty summed over latents (once per batch). l1_coeff is on the papers'
per-element scale (their 0.04, applied times d_in); the paper gives no gate penalty or initial
gate, so both are config fields (mask_l1_coeff on the same per-element scale; gates start at
sigmoid(mask_init_logit) ~ 0.88, nearly open).

Defaults: l1_coeff 0.002 and mask_l1_coeff 1e-5 with free encoder columns, and the shared recipe
(Adam at 2e-3, batches of 1024, decayed over the last 20%), which is sparser and more faithful
than the hsae paper's training (AdamW, cosine, batches of 2048: half the steps). The papers' 0.04
silences it in a default-scale run; a gate penalty much heavier than 1e-5 shrinks the encoder
norms instead of the gates. At 1e-5 the gates stay near their start in a run this short: here the
gate is a learnt per-latent scale. `--set l1_coeff=0.04` is the papers' L1; `--set
normalize_encoder=true` the unit encoder columns; `--set optimizer=adamw weight_decay=0.01
lr_schedule=cosine batch_size=2048` the hsae paper's training. Measured:
docs/recipe.md#adaptive_mask.

Rescaling moves: the latents (W_enc, b_enc by c, W_dec by 1/c) and the gates (m by c, W_enc and
b_enc by 1/c): unit decoder rows undo the first, the gain weighting makes the second change
nothing.

Cost per step: the linear SAE's two (B x d_in x d_sae) matmuls plus d_sae gates and encoder norms.
"""

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from variants import register
from variants.base import LinearSAE, Variant, VariantConfig, param
from variants.common import paper_weight


@dataclass(kw_only=True)
class AdaptiveMaskConfig(VariantConfig):
    l1_coeff: float = param(
        0.002, "weight of ||f||_1 on the gated latents (per-element scale, applied x d_in; the papers' is 0.04)"
    )
    mask_l1_coeff: float = param(
        1.0e-5, "weight of sum_i m_i ||W_enc[:, i]||, the gates times their encoder norms (per-element scale, x d_in)"
    )
    mask_init_logit: float = param(2.0, "initial gate logit of every latent (sigmoid(2) ~ 0.88)")
    normalize_encoder: bool = param(
        False,
        "renormalise encoder columns to unit norm after each step (the gate penalty then reads the gates alone)",
    )
    seed: int = param(42, "seed for the initial weights")


@register("adaptive_mask")
class AdaptiveMask(LinearSAE):
    Config = AdaptiveMaskConfig
    description = "ReLU SAE with a learnt per-latent sigmoid importance gate and an L1 on the gates"
    term_coefficients = {"l1": "l1_coeff", "mask_l1": "mask_l1_coeff"}
    sparsity_fields = ("l1_coeff",)

    def __init__(self, cfg: AdaptiveMaskConfig):
        super().__init__(cfg)
        self.mask_logit = nn.Parameter(torch.full((cfg.d_sae,), cfg.mask_init_logit))

    def gates(self) -> Tensor:
        return torch.sigmoid(self.mask_logit)

    def encode(self, x: Tensor) -> Tensor:
        return torch.relu(self.pre_activations(x)) * self.gates()

    def penalties(self, x, f, x_hat, step):
        d_in = self.cfg.d_in
        return {
            "l1": paper_weight(self.cfg.l1_coeff, d_in) * f.sum(-1).mean(),
            "mask_l1": paper_weight(self.cfg.mask_l1_coeff, d_in) * (self.gates() * self.W_enc.norm(dim=0)).sum(),
        }

    def after_step(self, step: int) -> None:
        super().after_step(step)
        if self.cfg.normalize_encoder:
            with torch.no_grad():
                self.W_enc.div_(self.W_enc.norm(dim=0, keepdim=True).clamp_min(1e-8))

    def rescalings(self, c: float) -> dict[str, Variant]:
        """The latents move, and the gate move: m times c absorbed by the encoder (f unchanged)."""
        gated = copy.deepcopy(self)
        with torch.no_grad():
            gated.mask_logit.copy_(torch.logit(c * gated.gates()))
            gated.W_enc.div_(c)
            gated.b_enc.div_(c)
        return {**super().rescalings(c), "gates": gated}

    @torch.no_grad()
    def diagnostics(self, x, mask=None):
        gates = self.gates()
        return {
            "mask_mean": float(gates.mean()),
            "mask_below_half": float((gates < 0.5).float().mean()),
            "zero_fraction": float((self.encode(x) == 0).float().mean()),
        }
