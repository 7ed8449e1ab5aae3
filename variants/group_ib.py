"""Group-wise information bottleneck SAE (seed 000). Latents are split into G = d_sae / group_size
groups (32 each). It trains on whole contexts (B, T, d_in) with a mask (B, T) of real tokens;
every term counts masked-in positions only.

- Soft membership M = softmax(A / membership_temperature) over groups, A (d_sae x G) learnt
  (`membership_logits`, initialised to the contiguous blocks); group signal s_g = sum_i M[i, g] f_i per token.
- Group transform f' = Dropout(f) + Linear_g(f_g) within each contiguous group (one group_size^2
  map per group, zero-initialised), then a LayerNorm over each group (`group_layernorm`); the
  decoder reads f'. `encode` returns the sparse f, `decode` applies the transform, so
  decode(encode(x)) is the SAE's reconstruction. The W_dec rows are the directions of the
  transformed latents f'_i, which `decoder_directions` reports as the latents' directions.
- Independence: windows of `window` consecutive tokens of one context, every `window_stride`
  tokens (the paper names no stride; a stride of one window keeps the cost at B*T*G^2 rather than
  window times that); per window the Pearson correlation of the group signals over its real
  tokens (windows with fewer than 2 are skipped), L_MI = mean over windows and i != j of
  -log(1 - |corr_ij| + mi_eps).
- Competition: InfoNCE (contrast_temperature) of each latent's decoder direction against the
  membership-weighted group centroids, positive = its argmax group.
- Loss = MSE + l1_coeff * sum_g ||f_g||_1 + mi_coeff * L_MI + contrast_coeff * L_contrast.

Cost per step: the linear SAE's two matmuls, B*T*d_sae*group_size for the group maps,
B*T*d_sae*G for the group signals, B*T*G^2 for the window correlations and d_sae*G*d_in for the
centroids. d_sae must be a multiple of group_size (32); the independence term needs G >= 2.
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from variants import register
from variants.base import ConfigError, LinearSAE, LossOut, VariantConfig, mse_loss, param
from variants.common import (categorical_entropy, correlation_matrix, info_nce_to_centroids,
                             mean_abs_correlation, mean_offdiag_cosine, membership_centroids)


@dataclass(kw_only=True)
class GroupIBConfig(VariantConfig):
    group_size: int = param(32, "latents per group; d_sae must be a multiple of it (G = d_sae / group_size)")
    membership_temperature: float = param(0.1, "tau of the soft group membership softmax(A / tau)")
    identity_dropout: float = param(0.2, "dropout on the identity path of the group transform, in training")
    group_layernorm: bool = param(True, "LayerNorm over each group after the group transform")
    window: int = param(32, "consecutive tokens per window of the independence term")
    window_stride: int = param(32, "tokens between window starts (1: every sliding window)")
    l1_coeff: float = param(0.2, "weight of the group-wise L1 sum_g ||f_g||_1")
    mi_coeff: float = param(0.02, "weight of the window independence term L_MI")
    mi_eps: float = param(1.0e-6, "eps in -log(1 - |corr| + eps)")
    contrast_coeff: float = param(0.1, "weight of the InfoNCE group-competition term")
    contrast_temperature: float = param(0.1, "temperature of the InfoNCE group-competition term")
    lr: float = param(1.0e-4, "learning rate")
    grad_clip: float = param(1.0, "clip the gradient norm at this value; 0 turns clipping off")
    batch_size: int = param(2048, "activation tokens per optimiser step (whole contexts)")

    def __post_init__(self):
        if self.group_size < 1 or self.d_sae % self.group_size:
            raise ConfigError(f"d_sae ({self.d_sae}) must be a multiple of group_size ({self.group_size})")
        if self.window < 2 or self.window_stride < 1:
            raise ConfigError("window must be >= 2 and window_stride >= 1")


def window_correlations(s: Tensor, mask: Tensor, window: int, stride: int) -> tuple[Tensor, Tensor]:
    """Pearson correlations between the columns of s (B, T, G) over each window of `window` tokens
    starting every `stride` tokens, counting masked-in tokens only. The last window is padded with
    masked-out tokens so every token is covered. Returns (B, W, G, G) and the valid windows (B, W)."""
    b, t, g = s.shape
    n_windows = 1 if t <= window else math.ceil((t - window) / stride) + 1
    padded = (n_windows - 1) * stride + window
    s = F.pad(s, (0, 0, 0, padded - t))
    mask = F.pad(mask, (0, padded - t), value=False)
    sw = s.unfold(1, window, stride).transpose(-1, -2)  # (B, W, window, G)
    mw = mask.unfold(1, window, stride)  # (B, W, window)
    return correlation_matrix(sw, weights=mw), mw.sum(-1) >= 2


@register("group_ib")
class GroupIB(LinearSAE):
    Config = GroupIBConfig
    description = "Group-wise information bottleneck: 32-latent groups, window MI independence, InfoNCE"
    architecture = "group_ib"
    batch_layout = "contexts"

    def __init__(self, cfg: GroupIBConfig):
        super().__init__(cfg)
        g, size = self.n_groups, cfg.group_size
        # Membership logits start at the contiguous blocks (1 on the own block, 0 elsewhere).
        self.membership_logits = nn.Parameter(F.one_hot(torch.arange(cfg.d_sae) // size, g).float())
        self.group_weight = nn.Parameter(torch.zeros(g, size, size))
        self.group_bias = nn.Parameter(torch.zeros(g, size))
        self.ln_weight = nn.Parameter(torch.ones(g, size))
        self.ln_bias = nn.Parameter(torch.zeros(g, size))

    @property
    def n_groups(self) -> int:
        return self.cfg.d_sae // self.cfg.group_size

    def transform(self, f: Tensor) -> Tensor:
        """f' = Dropout(f) + Linear_g(f_g) per group, then LayerNorm per group."""
        fg = f.reshape(*f.shape[:-1], self.n_groups, self.cfg.group_size)
        mixed = torch.einsum("...gi,gij->...gj", fg, self.group_weight) + self.group_bias
        out = F.dropout(fg, self.cfg.identity_dropout, self.training) + mixed
        if self.cfg.group_layernorm:
            out = F.layer_norm(out, (self.cfg.group_size,)) * self.ln_weight + self.ln_bias
        return out.reshape(f.shape)

    def decode(self, f: Tensor) -> Tensor:
        return self.transform(f) @ self.W_dec + self.b_dec

    def membership(self) -> Tensor:
        return torch.softmax(self.membership_logits / self.cfg.membership_temperature, dim=-1)

    def group_signals(self, f: Tensor) -> Tensor:
        """s_g = sum_i M[i, g] f_i: (..., d_sae) -> (..., G)."""
        return f @ self.membership()

    def independence(self, f: Tensor, mask: Tensor) -> Tensor:
        """L_MI: mean over valid windows and group pairs i != j of -log(1 - |corr| + eps)."""
        g = self.n_groups
        if g < 2:
            return f.new_zeros(())
        corr, valid = window_correlations(self.group_signals(f), mask, self.cfg.window, self.cfg.window_stride)
        if not bool(valid.any()):
            return f.new_zeros(())
        off = ~torch.eye(g, dtype=torch.bool, device=f.device)
        per_window = -torch.log(1 - corr[valid][:, off].abs() + self.cfg.mi_eps)
        return per_window.mean()

    def contrast(self) -> Tensor:
        m = self.membership()
        return info_nce_to_centroids(self.W_dec, membership_centroids(self.W_dec, m), m.argmax(-1),
                                     self.cfg.contrast_temperature)

    def loss(self, x, step=0, mask=None):
        c = self.cfg
        if mask is None:
            mask = torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
        f = self.encode(x)
        x_hat = self.decode(f)
        terms = {
            "mse": mse_loss(x_hat[mask], x[mask]),
            "l1": c.l1_coeff * f[mask].sum(-1).mean(),
            "mi": c.mi_coeff * self.independence(f, mask),
            "contrast": c.contrast_coeff * self.contrast(),
        }
        return LossOut(total=sum(terms.values()), terms=terms, latents=f, recon=x_hat)

    @torch.no_grad()
    def diagnostics(self, x, mask=None):
        if mask is None:
            mask = torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
        f = self.encode(x)
        m = self.membership()
        occupancy = torch.bincount(m.argmax(-1), minlength=self.n_groups).float()
        return {
            "assignment_entropy": float(categorical_entropy(occupancy)),
            "membership_entropy": float(categorical_entropy(m).mean()),
            "inter_group_correlation": mean_abs_correlation(self.group_signals(f[mask])),
            "centroid_cosine": mean_offdiag_cosine(membership_centroids(self.W_dec, m)),
            "window_mi": float(self.independence(f, mask)),
        }
