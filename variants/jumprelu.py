"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"): f_i = z_i * H(z_i - theta_i) with
learnt per-latent thresholds theta = exp(log_threshold), trained directly on an L0 penalty.

H has no useful gradient, so the thresholds learn through straight-through estimators with a
rectangle kernel K(u) = 1{|u| < 1/2} of width `bandwidth` (epsilon):
  d JumpReLU / d theta = -(theta / eps) K((z - theta) / eps),   d H / d theta = -(1 / eps) K((z - theta) / eps),
and d JumpReLU / d z = H(z - theta) while H itself passes no gradient to z (as in the paper).
Pre-activations subtract b_dec first (save with apply_b_dec_to_input = true).

Conventions: loss = MSE + lambda(t) * L0, MSE summed over d_in and L0 summed over latents, both
averaged over tokens: the paper's own form (its reconstruction term is the squared L2 norm, on
normalised activations), so l0_coeff is on the paper's scale with no conversion. The L0 term is
a count, independent of d_in while the MSE grows with it, so lambda is tuned per model and layer
(the paper tunes it per sparsity target). lambda ramps linearly from 0 over l0_warmup_steps
(10,000 in the paper), capped at 10% of the run once the platform calls `begin_run`, like the lr
warm-up, so runs and search trials shorter than 100,000 steps still reach their own lambda.

Defaults: the shared recipe (lr 2e-3 held and decayed over the last 20%, batches of 1024) and
threshold_init 0.2, so that a default-scale run ends sparse: with the paper's lr and starting
threshold the thresholds barely move in a short run and the code stays dense, and the starting
threshold sets where a short run's L0 lands. The paper's setting: `--set lr=7e-5 batch_size=4096
lr_schedule=constant threshold_init=0.001`. Measured: docs/recipe.md#jumprelu.

Rescaling: L0 counts latents, so scaling z, theta and the thresholds by c and W_dec by 1/c
changes no term; decoder rows are unit norm anyway (after_step).

Cost per step: the linear SAE's two (B x d_in x d_sae) matmuls plus elementwise work.
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from variants import register
from variants.base import ConfigError, LinearSAE, LossOut, VariantConfig, param
from variants.common import linear_ramp, mse_loss


@dataclass(kw_only=True)
class JumpReLUConfig(VariantConfig):
    bandwidth: float = param(0.001, "width epsilon of the rectangle kernel of the thresholds' gradient estimator")
    threshold_init: float = param(
        0.2, "initial threshold theta of every latent (on activations normalised to E||x|| = sqrt(d_in))"
    )
    l0_coeff: float = param(1.0, "weight lambda of the L0 penalty (tuned per model and layer; 1.0 is a starting point)")
    l0_warmup_steps: int = param(
        10_000, "steps over which lambda ramps linearly from 0 (Rajamanoharan et al.; capped at 10% of the run)"
    )

    def __post_init__(self):
        if self.bandwidth <= 0 or self.threshold_init <= 0:
            raise ConfigError("bandwidth and threshold_init must be positive")


def rectangle(u: Tensor) -> Tensor:
    """Rectangle kernel K(u) = 1 on |u| < 1/2."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, threshold, bandwidth):
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return z * (z > threshold)

    @staticmethod
    def backward(ctx, grad):
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = grad * (z > threshold)
        grad_theta = -(threshold / eps) * rectangle((z - threshold) / eps) * grad
        return grad_z, grad_theta.reshape(-1, z.shape[-1]).sum(0), None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, threshold, bandwidth):
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = -(1.0 / eps) * rectangle((z - threshold) / eps) * grad
        return torch.zeros_like(z), grad_theta.reshape(-1, z.shape[-1]).sum(0), None


def jumprelu(z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """z * H(z - theta) with the straight-through gradient to theta."""
    return _JumpReLU.apply(z, threshold, bandwidth)


def step_fn(z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """H(z - theta) with the straight-through gradient to theta (and none to z)."""
    return _Step.apply(z, threshold, bandwidth)


@register("jumprelu")
class JumpReLU(LinearSAE):
    Config = JumpReLUConfig
    description = "JumpReLU SAE: learnt thresholds via straight-through estimators, L0 penalty"
    saelens_architecture = "jumprelu"
    term_coefficients = {"l0": "l0_coeff"}
    sparsity_fields = ("l0_coeff",)

    def __init__(self, cfg: JumpReLUConfig):
        super().__init__(cfg)
        self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), math.log(cfg.threshold_init)))

    def saelens_tensors(self) -> dict[str, Tensor]:
        """SAELens's jumprelu tensors: the linear ones folded, and the thresholds, which are in
        pre-activation units and so unchanged by the fold."""
        return {**super().saelens_tensors(), "threshold": self.jumprelu_threshold()}

    def jumprelu_threshold(self) -> Tensor:
        """(d_sae,) thresholds theta, as saved in the jumprelu format."""
        return self.log_threshold.exp()

    def _scale_latents(self, c: float) -> None:
        """The thresholds are in latent units, so they scale with the pre-activations."""
        super()._scale_latents(c)
        self.log_threshold.add_(math.log(c))

    def encode(self, x: Tensor) -> Tensor:
        return jumprelu(self.pre_activations(x), self.jumprelu_threshold(), self.cfg.bandwidth)

    def loss(self, x, step=0, mask=None):
        pre = self.pre_activations(x)
        theta = self.jumprelu_threshold()
        f = jumprelu(pre, theta, self.cfg.bandwidth)
        x_hat = self.decode(f)
        l0 = step_fn(pre, theta, self.cfg.bandwidth).sum(-1).mean()
        coeff = linear_ramp(step, self.penalty_warmup(self.cfg.l0_warmup_steps), end=self.cfg.l0_coeff)
        terms = {"mse": mse_loss(x_hat, x), "l0": coeff * l0}
        return LossOut(total=sum(terms.values()), terms=terms, latents=f, recon=x_hat)

    def diagnostics(self, x, mask=None):
        theta = self.jumprelu_threshold().detach()
        return {"threshold_mean": float(theta.mean()), "threshold_median": float(theta.median())}
