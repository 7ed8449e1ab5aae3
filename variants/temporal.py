"""Multi-scale temporal SAE, a comparison variant of "Beyond Sparsity: Hierarchical Feature
Organization Reveals Fundamental Limits in Language Model Unlearning" (the hsae paper). It reads
whole contexts (B, T, d_in) with a mask (B, T) of real tokens. The encoder input of token t is the
token plus dilated causal convolutions over the preceding tokens of the same context:

  u_t = x_t + sum over offsets o in O of W_o x_{t - o},
  O = {k d : d in dilations, k = 1..kernel_size - 1}   (distinct offsets),
  f_t = ReLU((u_t - b_dec) W_enc + b_enc),   x_hat_t = f_t W_dec + b_dec   (reconstructs x_t),
  loss = MSE + paper_weight(l1_coeff, d_in) * ||f||_1 over masked-in tokens.

A kernel of size K at dilation d reads offsets 0, d, ..., (K - 1) d (size 2 at dilation d reads 0
and d). Offset 0 is the token itself for every dilation: one shared identity path, not a tap per
dilation (a learnt tap there would only repeat W_enc). Offsets that several dilations reach (2 is
1 x 2 and 2 x 1 when K = 3) get one tap, since two taps on the same offset are one parameter in
two places. Default K = 2, dilations 1, 2, 4: taps at 1, 2 and 4.

W_o is a per-channel scale (depthwise, `depthwise`) or a full d_in x d_in map; the taps start
at zero, so training starts from a plain ReLU SAE. Masked-out positions (BOS, padding) are
zeroed before the convolutions so they never leak into later tokens; `encode(x, mask)` takes the
same mask (without one, every position counts as real). Positions before the context start read
zeros. `encode` and `decode` accept (B, T, d_in) or a single context (T, d_in).

Conventions: MSE summed over d_in, averaged over masked-in tokens; ||f||_1 summed over latents,
averaged over tokens; l1_coeff is on the papers' per-element scale (their baseline is 0.04),
applied times d_in.

Defaults: l1_coeff 0.002 and the shared recipe (Adam at 2e-3, batches of 1024, decayed over the
last 20%). The papers' 0.04, tuned for lr 3e-4 and tens of millions of tokens, silences it in a
default-scale run, and the shared recipe is sparser and more faithful than the hsae paper's
training (AdamW, cosine, batches of 2048: half the steps) at the same L1. `--set l1_coeff=0.04` is
the papers' effective weight; `--set optimizer=adamw weight_decay=0.01 lr_schedule=cosine
batch_size=2048` the hsae paper's training. Measured: docs/recipe.md#temporal.

Rescaling: the L1 falls with the latents, but decoder rows are unit norm (after_step).

Cost per step: the linear SAE's two (B*T x d_in x d_sae) matmuls plus the convolutions:
len(offsets) * B*T*d_in (depthwise) or len(offsets) * B*T*d_in^2 (full).
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from variants import register
from variants.base import ConfigError, LinearSAE, LossOut, VariantConfig, param
from variants.common import mse_loss, paper_weight


def parse_dilations(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"dilations must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ConfigError(f"dilations must be positive integers, got {text!r}")
    return values


@dataclass(kw_only=True)
class TemporalConfig(VariantConfig):
    dilations: str = param("1,2,4", "comma-separated dilations of the causal convolutions ('1' is single-scale)")
    kernel_size: int = param(2, "kernel size K: at dilation d it reads offsets 0, d, ..., (K-1) d (1: the token only)")
    depthwise: bool = param(True, "per-channel convolution taps; false: a full d_in x d_in map per tap")
    l1_coeff: float = param(
        0.002, "weight of ||f||_1 (per-element scale, applied x d_in; the papers' baseline is 0.04)"
    )
    seed: int = param(42, "seed for the initial weights")

    def __post_init__(self):
        parse_dilations(self.dilations)
        if self.kernel_size < 1:
            raise ConfigError(f"kernel_size must be >= 1, got {self.kernel_size}")


def tap_offsets(dilations: list[int], kernel_size: int) -> list[int]:
    """The distinct offsets k * d (k = 1..kernel_size - 1) the taps read; offset 0 is the identity."""
    return sorted({k * d for d in dilations for k in range(1, kernel_size)})


def shift_back(x: Tensor, offset: int) -> Tensor:
    """x_{t - offset} along the token axis (-2), zeros before the context start."""
    if offset >= x.shape[-2]:
        return torch.zeros_like(x)
    return F.pad(x, (0, 0, offset, 0))[..., : x.shape[-2], :]


@register("temporal")
class Temporal(LinearSAE):
    Config = TemporalConfig
    description = "Multi-scale temporal SAE: encoder reads the token plus dilated causal convolutions (1, 2, 4)"
    batch_layout = "contexts"
    term_coefficients = {"l1": "l1_coeff"}
    sparsity_fields = ("l1_coeff",)

    def __init__(self, cfg: TemporalConfig):
        super().__init__(cfg)
        self.offsets = tap_offsets(parse_dilations(cfg.dilations), cfg.kernel_size)
        shape = (len(self.offsets), cfg.d_in) if cfg.depthwise else (len(self.offsets), cfg.d_in, cfg.d_in)
        # No taps at all for kernel_size 1: DistributedDataParallel refuses parameters a step never uses.
        self.taps = nn.Parameter(torch.zeros(shape)) if self.offsets else None

    def encoder_input(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """u = x + the dilated causal convolutions of the (masked) preceding tokens."""
        if self.taps is None:
            return x
        src = x if mask is None else x * mask.unsqueeze(-1).to(x.dtype)
        u = x
        for tap, offset in zip(self.taps, self.offsets):
            past = shift_back(src, offset)
            u = u + (past * tap if self.cfg.depthwise else past @ tap)
        return u

    def encode(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return torch.relu((self.encoder_input(x, mask) - self.b_dec) @ self.W_enc + self.b_enc)

    def loss(self, x, step=0, mask=None):
        if mask is None:
            mask = torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
        f = self.encode(x, mask)
        x_hat = self.decode(f)
        terms = {
            "mse": mse_loss(x_hat[mask], x[mask]),
            "l1": paper_weight(self.cfg.l1_coeff, self.cfg.d_in) * f[mask].sum(-1).mean(),
        }
        return LossOut(total=sum(terms.values()), terms=terms, latents=f, recon=x_hat)

    @torch.no_grad()
    def diagnostics(self, x, mask=None):
        if mask is None:
            mask = torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
        u = self.encoder_input(x, mask)
        temporal = (u - x)[mask].norm(dim=-1) / x[mask].norm(dim=-1).clamp_min(1e-8)
        return {
            "temporal_input_ratio": float(temporal.mean()),
            "zero_fraction": float((self.encode(x, mask)[mask] == 0).float().mean()),
        }
