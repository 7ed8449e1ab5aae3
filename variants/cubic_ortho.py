"""Progressive orthogonality with cubic scaling, from "Progressive Feature Separation in Sparse
Autoencoders via Cubic Scaling Orthogonality" (anonymous, under review): a ReLU SAE whose decoder
directions of correlated latents are pushed apart, more steeply the more correlated they are.

  Omega = sum over i != j of |c_ij|^power * max(0, |<w_i, w_j>| - eps_ij),
  eps_ij = eps0 * (1 + mean_a_i * mean_a_j)^(-beta)      (the paper's exp(-beta log(1 + a_i a_j))),
  loss = MSE + w(l1_coeff) ||f||_1 + w(gamma(t)) Omega,  w(c) = c * d_in (`paper_weight`),
  gamma(t) ramping 0 -> alpha over the lr warm-up.

c_ij is the Pearson correlation of the latent activation vectors over the batch. A latent silent in
the batch has zero variance and c_ij = 0, so Omega is computed exactly on the active latents
only; beyond `omega_max_latents` active latents the most often firing ones are kept (the top-m
approximation). The tolerance eps_ij is a target, not something to optimise, so it carries no
gradient; c_ij and <w_i, w_j> both do. gamma(t) reads `warmup_steps`, the same field as the lr
warm-up, and is capped the same way (at 10% of the run, once the platform calls `begin_run`), so
it stays aligned with the lr warm-up as the paper asks, in short runs too.

Conventions: MSE summed over d_in, averaged over tokens; ||f||_1 summed over latents, averaged
over tokens; Omega summed over ordered pairs i != j, as in the paper (scale free: correlations
and unit-norm decoder rows). The paper's lambda 0.04 and alpha 0.001 weigh their terms against an
MSE averaged over d_in, so both are applied times d_in.

Defaults: l1_coeff 0.0022, ortho_alpha 1e-5 and batches of 2048, not the paper's 0.04, 0.001 and
4096. In a default-scale run the paper's three leave the SAE nearly silent; at the default L1 the
paper's alpha costs most of the fidelity, while 1e-5 costs none and Omega still decorrelates the
latents; batches of 2048 give twice the steps of 4096. The paper's setting: `--set l1_coeff=0.04
ortho_alpha=0.001 batch_size=4096`. Measured: docs/recipe.md#cubic_ortho.

Initialisation: every variant's tied start by default (`init`), which a short run undoes faster;
`init=kaiming` is the paper's Kaiming-uniform weights and uniform +-init_bias_noise biases. With
b_dec_init = 'geometric_median' (the default) init_from_data then moves b_dec to the first batch's
geometric median ('init' keeps the paper's noise).

Rescaling: the L1 falls with the latents, but decoder rows are unit norm (after_step).

Cost per step: the linear SAE's two (B x d_in x d_sae) matmuls, plus for the m active latents
(m <= omega_max_latents) a (B x m x m) correlation and an (m x m x d_in) decoder Gram matrix.
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from variants import register
from variants.base import ConfigError, LinearSAE, VariantConfig, param
from variants.common import correlation_matrix, gram_matrix, linear_ramp, paper_weight

INITS = ("tied", "kaiming")


@dataclass(kw_only=True)
class CubicOrthoConfig(VariantConfig):
    l1_coeff: float = param(
        0.0022, "weight lambda of the L1 penalty ||f||_1 (per-element scale, applied x d_in; the paper's is 0.04)"
    )
    ortho_alpha: float = param(
        1.0e-5,
        "final weight alpha of Omega (per-element scale, applied x d_in; the paper's is 0.001); gamma(t) ramps "
        "0 -> alpha over warmup_steps, capped like the lr warm-up",
    )
    power: float = param(3.0, "exponent on |c_ij|: 3 the paper's cubic form, 2 its quadratic ablation")
    eps0: float = param(0.0, "base tolerance on |<w_i, w_j>|; 0 gives the paper's plain cubic form")
    beta: float = param(1.0, "activation-aware tolerance eps_ij = eps0 * (1 + a_i a_j)^(-beta)")
    omega_max_latents: int = param(4096, "Omega uses at most this many active latents (the most often firing)")
    init: str = param(
        "tied",
        "'tied' (every variant's start: decoder rows of norm init_norm, the encoder their transpose) or "
        "'kaiming' (the paper's: Kaiming-uniform weights, biases uniform in +-init_bias_noise)",
    )
    init_bias_noise: float = param(0.01, "with init = 'kaiming', biases start uniform in +-init_bias_noise")
    batch_size: int = param(
        2048, "activation tokens per optimiser step (the paper's is 4096, for correlations; 2048 gives twice the steps)"
    )

    def __post_init__(self):
        if self.omega_max_latents < 2:
            raise ConfigError("omega_max_latents must be >= 2")
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")


def omega(f: Tensor, w_dec: Tensor, power: float, eps0: float, beta: float, max_latents: int | None = None) -> Tensor:
    """The orthogonality penalty Omega on latents f (N, d_sae) and decoder rows w_dec (d_sae, d_in)."""
    counts = (f.detach() > 0).sum(0)
    active = torch.nonzero(counts).squeeze(-1)
    if max_latents is not None and active.numel() > max_latents:
        active = active[counts[active].topk(max_latents).indices]
    if active.numel() < 2:
        return f.new_zeros(())
    corr = correlation_matrix(f, index=active).abs().pow(power)
    overlap = gram_matrix(w_dec[active]).abs()
    if eps0 > 0:
        mean_act = f.detach()[:, active].mean(0)
        eps = eps0 * (1 + mean_act.unsqueeze(-1) * mean_act.unsqueeze(0)).pow(-beta)
        overlap = (overlap - eps).clamp_min(0.0)
    off = ~torch.eye(active.numel(), dtype=torch.bool, device=f.device)
    return (corr * overlap)[off].sum()


@register("cubic_ortho")
class CubicOrtho(LinearSAE):
    Config = CubicOrthoConfig
    description = "ReLU SAE + gamma(t) * sum |c_ij|^3 |<w_i,w_j>| orthogonality of correlated latents"
    term_coefficients = {"l1": "l1_coeff", "ortho": "ortho_alpha"}
    sparsity_fields = ("l1_coeff",)

    def __init__(self, cfg: CubicOrthoConfig):
        super().__init__(cfg)  # the linear SAE's layout and tied start
        self.register_buffer("last_step", torch.tensor(0, dtype=torch.long))
        if cfg.init == "kaiming":
            self.kaiming_init()

    @torch.no_grad()
    def kaiming_init(self) -> None:
        """The paper's start: Kaiming-uniform weights, biases uniform in +-init_bias_noise."""
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        # nn.Linear layout (out, in) so Kaiming's fan_in is each map's input width.
        w_enc = nn.init.kaiming_uniform_(torch.empty(cfg.d_sae, cfg.d_in), generator=gen)
        w_dec = nn.init.kaiming_uniform_(torch.empty(cfg.d_in, cfg.d_sae), generator=gen).T
        self.W_enc = nn.Parameter(w_enc.T.contiguous())
        self.W_dec = nn.Parameter(w_dec / w_dec.norm(dim=-1, keepdim=True))
        noise = cfg.init_bias_noise
        self.b_enc = nn.Parameter(torch.empty(cfg.d_sae).uniform_(-noise, noise, generator=gen))
        self.b_dec = nn.Parameter(torch.empty(cfg.d_in).uniform_(-noise, noise, generator=gen))

    def gamma(self, step: int) -> float:
        """gamma(t): 0 -> alpha over the (capped) lr warm-up, on the paper's scale."""
        return linear_ramp(step, self.penalty_warmup(self.cfg.warmup_steps), end=self.cfg.ortho_alpha)

    def omega(self, f: Tensor) -> Tensor:
        c = self.cfg
        return omega(f.reshape(-1, c.d_sae), self.W_dec, c.power, c.eps0, c.beta, c.omega_max_latents)

    def penalties(self, x, f, x_hat, step):
        if self.training:
            self.last_step.fill_(step)
        d_in = self.cfg.d_in
        return {
            "l1": paper_weight(self.cfg.l1_coeff, d_in) * f.sum(-1).mean(),
            "ortho": paper_weight(self.gamma(step), d_in) * self.omega(f),
        }

    @torch.no_grad()
    def diagnostics(self, x, mask=None):
        return {"omega": float(self.omega(self.encode(x))), "gamma": self.gamma(int(self.last_step))}
