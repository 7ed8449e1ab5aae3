"""Group-wise information bottleneck SAE, from "Feature Disentanglement in Large Language Models:
Group-wise Information Bottleneck for Sparse Autoencoders" (anonymous, under review). The latents
form G = d_sae / group_size groups of 32; it reads whole contexts (B, T, d_in) and every term
counts the real tokens of the mask (B, T) only.

  z = ReLU((x - b_dec) W_enc + b_enc),   f = ReLU(Dropout(z) + Linear_g(z_g)) * 1[z > 0],
  x_hat = f W_dec + b_dec,   loss = MSE + w(l1_coeff) sum_g ||f_g||_1 + w(mi_coeff) L_MI
                                   + w(contrast_coeff) L_contrast,   w(c) = c * d_in.

MSE summed over d_in, the L1 over latents, both averaged over tokens; L_MI summed over group pairs
as in the paper, averaged over windows; InfoNCE averaged over latents. The paper weighs its terms
against an MSE averaged over d_in, so each coefficient is applied x d_in (its 0.2, 0.02 and 0.1).
The group transform (the paper's residual connection, a zero-initialised group_size^2 map per
group) acts on z's support only and `encode` returns f, so L0, the L1 and the decoder rows describe
the code the decoder reads. Group signals s_g = sum_i M[i, g] f_i under a learnt soft membership M;
L_MI sums -log(1 - |corr(s_i, s_j)| + mi_eps) over ordered pairs of groups live in a window of
`window` tokens (a silent group carries only the membership leak, which looks perfectly
correlated); L_contrast is InfoNCE of each decoder direction against the group centroids.

Defaults: l1_coeff 0.002, mi_coeff 2e-6, contrast_coeff 0.01, lr 2e-3, batches of 2048, and the
paper's LayerNorm per group off (`group_layernorm`: it is scale-invariant, so a penalty before it
can be lowered for free by shrinking z). At the paper's weights L_MI outweighs the reconstruction
by orders of magnitude in a default-scale run; at 2e-6 it costs nothing and still decorrelates the
groups; the paper's lr 1e-4 barely moves the code in a short run. The paper's setting: `--set
l1_coeff=0.2 mi_coeff=0.02 contrast_coeff=0.1 lr=1e-4 group_layernorm=true`. Measured:
docs/recipe.md#group_ib.

Rescaling: z and the group biases (or the LayerNorm's affine map) by c, W_dec by 1/c; L_MI and
InfoNCE are scale free and unit-norm decoder rows undo the move. Cost per step: the linear SAE's
matmuls, B*T*d_sae*(group_size + G) for the group maps and signals, B*T*G^2 for the correlations
(windows every `window_stride` tokens, one window apart by default: the paper names no stride) and
d_sae*G*d_in for the centroids. d_sae must be a multiple of group_size; L_MI needs G >= 2.
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from variants import register
from variants.base import ConfigError, LatentGroups, LinearSAE, LossOut, VariantConfig, param
from variants.common import (
    categorical_entropy,
    correlation_matrix,
    info_nce_to_centroids,
    mean_abs_correlation,
    mean_offdiag_cosine,
    membership_centroids,
    mse_loss,
    paper_weight,
)


@dataclass(kw_only=True)
class GroupIBConfig(VariantConfig):
    group_size: int = param(32, "latents per group; d_sae must be a multiple of it (G = d_sae / group_size)")
    membership_temperature: float = param(0.1, "tau of the soft group membership softmax(A / tau)")
    identity_dropout: float = param(0.2, "dropout on the identity path of the group transform, in training")
    group_layernorm: bool = param(
        False, "LayerNorm per group in the group transform (paper: on; scale-invariant, so off by default)"
    )
    window: int = param(32, "consecutive tokens per window of the independence term")
    window_stride: int = param(32, "tokens between window starts (1: every sliding window)")
    l1_coeff: float = param(
        0.002, "weight of the group-wise L1 sum_g ||f_g||_1 (per-element scale, applied x d_in; the paper's is 0.2)"
    )
    mi_coeff: float = param(
        2.0e-6, "weight of L_MI, summed over live group pairs (per-element scale, applied x d_in; the paper's is 0.02)"
    )
    mi_eps: float = param(1.0e-6, "eps in -log(1 - |corr| + eps)")
    contrast_coeff: float = param(
        0.01, "weight of the InfoNCE group competition (per-element scale, applied x d_in; the paper's is 0.1)"
    )
    contrast_temperature: float = param(0.1, "temperature of the InfoNCE group-competition term")
    lr: float = param(2.0e-3, "learning rate (the shared recipe's; the paper's is 1e-4)")
    grad_clip: float = param(1.0, "clip the gradient norm at this value; 0 turns clipping off")
    batch_size: int = param(2048, "activation tokens per optimiser step (whole contexts)")

    def __post_init__(self):
        if self.group_size < 1 or self.d_sae % self.group_size:
            raise ConfigError(f"d_sae ({self.d_sae}) must be a multiple of group_size ({self.group_size})")
        if self.window < 2 or self.window_stride < 1:
            raise ConfigError("window must be >= 2 and window_stride >= 1")


def unfold_windows(t: Tensor, mask: Tensor, window: int, stride: int) -> tuple[Tensor, Tensor]:
    """Windows of `window` tokens starting every `stride` tokens: t (B, T, G) -> (B, W, window, G)
    and mask (B, T) -> (B, W, window). The last window is padded with masked-out tokens so every
    token is covered."""
    length = t.shape[1]
    n_windows = 1 if length <= window else math.ceil((length - window) / stride) + 1
    pad = (n_windows - 1) * stride + window - length
    t = F.pad(t, (0, 0, 0, pad))
    mask = F.pad(mask, (0, pad), value=False)
    return t.unfold(1, window, stride).transpose(-1, -2), mask.unfold(1, window, stride)


def window_correlations(s: Tensor, mask: Tensor, window: int, stride: int) -> tuple[Tensor, Tensor]:
    """Pearson correlations between the columns of s (B, T, G) over each window, counting
    masked-in tokens only: (B, W, G, G), and the windows with at least 2 real tokens (B, W)."""
    sw, mw = unfold_windows(s, mask, window, stride)
    return correlation_matrix(sw, weights=mw), mw.sum(-1) >= 2


def window_live_groups(active: Tensor, mask: Tensor, window: int, stride: int) -> Tensor:
    """(B, W, G): whether each group is active (`active` (B, T, G)) at a real token of each window."""
    aw, mw = unfold_windows(active.to(torch.float32), mask, window, stride)
    return ((aw > 0) & mw.unsqueeze(-1)).any(-2)


@register("group_ib")
class GroupIB(LinearSAE):
    Config = GroupIBConfig
    description = "Group-wise information bottleneck: 32-latent groups, window MI independence, InfoNCE"
    batch_layout = "contexts"
    term_coefficients = {"l1": "l1_coeff", "mi": "mi_coeff", "contrast": "contrast_coeff"}
    sparsity_fields = ("l1_coeff",)

    def __init__(self, cfg: GroupIBConfig):
        super().__init__(cfg)
        g, size = self.n_groups, cfg.group_size
        # Membership logits start at the contiguous blocks (1 on the own block, 0 elsewhere).
        self.membership_logits = nn.Parameter(F.one_hot(torch.arange(cfg.d_sae) // size, g).float())
        self.group_weight = nn.Parameter(torch.zeros(g, size, size))
        self.group_bias = nn.Parameter(torch.zeros(g, size))
        if cfg.group_layernorm:  # only then: DistributedDataParallel refuses parameters a step never uses
            self.ln_weight = nn.Parameter(torch.ones(g, size))
            self.ln_bias = nn.Parameter(torch.zeros(g, size))

    @property
    def n_groups(self) -> int:
        return self.cfg.d_sae // self.cfg.group_size

    def transform(self, z: Tensor) -> Tensor:
        """Dropout(z) + Linear_g(z_g) per group, then the optional LayerNorm (before the ReLU)."""
        zg = z.reshape(*z.shape[:-1], self.n_groups, self.cfg.group_size)
        mixed = torch.einsum("...gi,gij->...gj", zg, self.group_weight) + self.group_bias
        out = F.dropout(zg, self.cfg.identity_dropout, self.training) + mixed
        if self.cfg.group_layernorm:
            out = F.layer_norm(out, (self.cfg.group_size,)) * self.ln_weight + self.ln_bias
        return out.reshape(z.shape)

    def encode(self, x: Tensor) -> Tensor:
        """f = ReLU(transform(z)) on z's support: the sparse code the decoder reads."""
        z = torch.relu(self.pre_activations(x))
        return torch.relu(self.transform(z)) * (z > 0)

    def membership(self) -> Tensor:
        return torch.softmax(self.membership_logits / self.cfg.membership_temperature, dim=-1)

    def own_groups(self) -> Tensor:
        """(d_sae, G) one-hot: each latent's own (argmax membership) group."""
        return F.one_hot(self.membership().argmax(-1), self.n_groups).to(self.membership_logits.dtype)

    def latent_groups(self) -> LatentGroups:
        """Each latent's own group (its argmax membership)."""
        return LatentGroups("group", self.membership().argmax(-1).detach())

    def group_signals(self, f: Tensor) -> Tensor:
        """s_g = sum_i M[i, g] f_i: (..., d_sae) -> (..., G)."""
        return f @ self.membership()

    def independence(self, f: Tensor, mask: Tensor) -> Tensor:
        """L_MI: mean over valid windows of the sum over ordered live group pairs i != j of
        -log(1 - |corr| + eps); pairs with a group silent in the window are left out."""
        g, c = self.n_groups, self.cfg
        if g < 2:
            return f.new_zeros(())
        corr, valid = window_correlations(self.group_signals(f), mask, c.window, c.window_stride)
        if not bool(valid.any()):
            return f.new_zeros(())
        active = (f.detach() > 0).to(f.dtype) @ self.own_groups().to(f.dtype)
        live = window_live_groups(active, mask, c.window, c.window_stride)
        off = ~torch.eye(g, dtype=torch.bool, device=f.device)
        pairs = live.unsqueeze(-1) & live.unsqueeze(-2) & off  # (B, W, G, G)
        per_pair = -torch.log(1 - corr.abs() + c.mi_eps)
        return torch.where(pairs, per_pair, torch.zeros_like(per_pair)).sum((-1, -2))[valid].mean()

    def contrast(self) -> Tensor:
        m = self.membership()
        return info_nce_to_centroids(
            self.W_dec, membership_centroids(self.W_dec, m), m.argmax(-1), self.cfg.contrast_temperature
        )

    def loss(self, x, step=0, mask=None):
        c = self.cfg
        if mask is None:
            mask = torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
        f = self.encode(x)
        x_hat = self.decode(f)
        terms = {
            "mse": mse_loss(x_hat[mask], x[mask]),
            "l1": paper_weight(c.l1_coeff, c.d_in) * f[mask].sum(-1).mean(),
            "mi": paper_weight(c.mi_coeff, c.d_in) * self.independence(f, mask),
            "contrast": paper_weight(c.contrast_coeff, c.d_in) * self.contrast(),
        }
        return LossOut(total=sum(terms.values()), terms=terms, latents=f, recon=x_hat)

    def _scale_latents(self, c: float) -> None:
        """f scales with z and the group biases, or with the LayerNorm's affine map when it is on
        (the LayerNorm output does not scale with z)."""
        if self.cfg.group_layernorm:
            self.ln_weight.mul_(c)
            self.ln_bias.mul_(c)
            self.W_dec.div_(c)
        else:
            super()._scale_latents(c)  # W_enc, b_enc times c, W_dec / c
            self.group_bias.mul_(c)

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
            "inter_group_correlation": mean_abs_correlation(f[mask] @ self.own_groups()),
            "centroid_cosine": mean_offdiag_cosine(membership_centroids(self.W_dec, m)),
            "window_mi": float(self.independence(f, mask)),
        }
