"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse
Autoencoders"): one path decides which latents fire, another how strongly, sharing W_enc.

  pi_gate = (x - b_dec) W_enc + b_gate,   pi_mag = exp(r_mag) * ((x - b_dec) W_enc) + b_mag,
  f = 1[pi_gate > 0] * ReLU(pi_mag),       x_hat = f W_dec + b_dec,
  loss = MSE + paper_weight(l1_coeff, d_in) * sum_i ReLU(pi_gate)_i ||w_i||
             + aux_coeff * ||x - (ReLU(pi_gate) sg(W_dec) + sg(b_dec))||^2,

sg = stop-gradient: the auxiliary reconstruction reads a frozen copy of the decoder, so it only
trains the gate path (the Heaviside passes no gradient, so without it the gate would learn from
the L1 alone and shut every latent). The L1 prices only the gate, never the magnitudes: that is
how the paper removes shrinkage.

Conventions: MSE and the auxiliary reconstruction summed over d_in, averaged over tokens (the
paper's squared L2 norms on normalised activations); the L1 summed over latents, averaged over
tokens. l1_coeff is on relu's per-element scale (the same number weighs the L1 as relu's does),
applied as l1_coeff * d_in (`paper_weight`); the paper's lambda, stated against the summed
squared error, is that product: lambda = l1_coeff * d_in, so a lambda of the paper is
l1_coeff = lambda / d_in. aux_coeff = 1 is the paper's (it adds the auxiliary term unweighted).
Decoder rows are unit norm after every step (the paper's constraint), so the decoder-norm
weighting is 1 and the L1 is the paper's plain L1; with normalize_decoder = false it is
Anthropic's weighted L1 (SAELens's gated training uses that, with the decoder not frozen in the
auxiliary term; the saved SAE is the same either way).

Defaults: l1_coeff 0.0022 (lambda 1.41 at d_in 640) and the shared recipe (lr 2e-3, held, decayed
over the last 20%, batches of 1024). The paper sweeps lambda per model and layer rather than
fixing one, so the default is the one measured sparse and faithful in a default-scale run; relu's
0.04 leaves it nearly silent, since the L1 reaches only the gate and shrinking the gate costs the
main reconstruction nothing. The papers' lr: `--set lr=3e-4 lr_schedule=constant`. Measured:
docs/recipe.md#gated.

Rescaling: W_enc, b_gate and b_mag times c (r_mag unchanged) scale both paths by c, so with W_dec
times 1/c the output, the weighted L1 and the auxiliary reconstruction are exactly unchanged
(and unit-norm rows undo the move). Shrinking the gate alone (`rescalings`' "gate": W_enc and
b_gate times c, r_mag - log c) keeps the output and lowers the L1 by c, but the auxiliary
reconstruction from the shrunk gate gets worse: that term, not an invariance, pins the gate's
scale (the contract test checks the total does not fall under it).

Cost per step: the linear SAE's two (B x d_in x d_sae) matmuls, plus one more (B x d_sae x d_in)
decode for the auxiliary reconstruction.
"""

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from variants import register
from variants.base import LossOut, Variant, VariantConfig, param
from variants.common import decoder_norm_weighted_l1, geometric_median, linear_ramp, mse_loss, paper_weight, tied_init


@dataclass(kw_only=True)
class GatedConfig(VariantConfig):
    l1_coeff: float = param(
        0.0022, "weight of sum_i ReLU(pi_gate)_i ||w_i|| on relu's per-element scale (applied x d_in)"
    )
    l1_warmup_steps: int = param(0, "steps over which the L1 weight ramps from 0 (capped at 10% of a run); 0: none")
    aux_coeff: float = param(
        1.0, "weight of the reconstruction from ReLU(pi_gate) through the frozen decoder (paper: 1)"
    )


@register("gated")
class Gated(Variant):
    Config = GatedConfig
    description = "Gated SAE: a gate path picks latents (L1 on it), a magnitude path sharing W_enc sizes them"
    saelens_architecture = "gated"
    term_coefficients = {"l1": "l1_coeff", "aux": "aux_coeff"}
    sparsity_fields = ("l1_coeff",)

    def __init__(self, cfg: GatedConfig):
        super().__init__(cfg)
        self.W_enc, self.W_dec = tied_init(cfg.d_in, cfg.d_sae, cfg.seed, cfg.init_norm)
        self.b_gate = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae))
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))

    def gate_and_magnitude(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(pi_gate, pi_mag): the two pre-activations, from one shared (x - b_dec) W_enc."""
        shared = (x - self.b_dec) @ self.W_enc
        return shared + self.b_gate, shared * self.r_mag.exp() + self.b_mag

    def encode(self, x: Tensor) -> Tensor:
        gate, mag = self.gate_and_magnitude(x)
        return (gate > 0).to(mag.dtype) * torch.relu(mag)

    def decode(self, f: Tensor) -> Tensor:
        return f @ self.W_dec + self.b_dec

    def loss(self, x, step=0, mask=None):
        gate, mag = self.gate_and_magnitude(x)
        f = (gate > 0).to(mag.dtype) * torch.relu(mag)
        x_hat = self.decode(f)
        gate_acts = torch.relu(gate)
        ramp = linear_ramp(step, self.penalty_warmup(self.cfg.l1_warmup_steps))
        l1 = ramp * paper_weight(self.cfg.l1_coeff, self.cfg.d_in) * decoder_norm_weighted_l1(gate_acts, self.W_dec)
        via_gate = gate_acts @ self.W_dec.detach() + self.b_dec.detach()
        terms = {"mse": mse_loss(x_hat, x), "l1": l1, "aux": self.cfg.aux_coeff * mse_loss(via_gate, x)}
        return LossOut(total=sum(terms.values()), terms=terms, latents=f, recon=x_hat)

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        """b_dec at the batch's geometric median, as for every linear SAE (LinearSAE.init_from_data)."""
        if self.cfg.b_dec_init == "geometric_median":
            self.b_dec.copy_(geometric_median(x.reshape(-1, x.shape[-1])).to(self.b_dec))

    def _scale_latents(self, c: float) -> None:
        """Both paths scale with W_enc, b_gate and b_mag (r_mag multiplies, so it stays)."""
        self.W_enc.mul_(c)
        self.b_gate.mul_(c)
        self.b_mag.mul_(c)
        self.W_dec.div_(c)

    def rescalings(self, c: float) -> dict[str, Variant]:
        """The latents move, and the gate alone: the gate pre-activation times c (W_enc and
        b_gate), the magnitude path unchanged (r_mag - log c undoes the shared W_enc)."""
        gate = copy.deepcopy(self)
        with torch.no_grad():
            gate.W_enc.mul_(c)
            gate.b_gate.mul_(c)
            gate.r_mag.sub_(math.log(c))
        return {**super().rescalings(c), "gate": gate}

    def saelens_tensors(self) -> dict[str, Tensor]:
        """SAELens's gated tensors with the activation scale s (x_normalised = s * x_raw) folded
        in: (s x_raw - b_dec) W_enc = (x_raw - b_dec / s)(s W_enc), so W_enc * s and b_dec / s
        give both pre-activations on raw activations exactly as ours on normalised ones; b_gate,
        b_mag (pre-activation units) and r_mag (a factor) are unchanged; W_dec / s and b_dec / s
        put the reconstruction in raw units. No b_enc: SAELens's GatedSAE has none."""
        s = self.act_scale
        return {
            "W_enc": self.W_enc * s,
            "W_dec": self.W_dec / s,
            "b_dec": self.b_dec / s,
            "b_gate": self.b_gate,
            "b_mag": self.b_mag,
            "r_mag": self.r_mag,
        }

    def diagnostics(self, x, mask=None):
        """How often the gate opens where the magnitude is not positive (those latents output 0),
        and the mean magnitude scale exp(r_mag)."""
        with torch.no_grad():
            gate, mag = self.gate_and_magnitude(x.reshape(-1, x.shape[-1]))
            opened = gate > 0
            wasted = (opened & (mag <= 0)).sum() / opened.sum().clamp_min(1)
            return {"gate_open_mag_zero": float(wasted), "r_mag_scale_mean": float(self.r_mag.exp().mean())}
