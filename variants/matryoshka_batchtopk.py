"""Matryoshka BatchTopK SAE (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka
Sparse Autoencoders"): one dictionary whose nested prefixes (the first m_1 < m_2 < ... < m_G =
d_sae latents) must each reconstruct x on their own, so the early latents learn the general
features and later ones refine them instead of absorbing them.

  f = BatchTopK_k(ReLU((x - b_dec) W_enc + b_enc))      (the top k*B activations of the batch),
  x_hat_g = f[:, :m_g] W_dec[:m_g] + b_dec               (prefix g, its own latents plus b_dec),
  loss = sum_g ||x - x_hat_g||^2 + aux_coeff * Var(x) * AuxK,

written as terms: `mse` is the full dictionary's (g = G, the SAE's reconstruction), `prefix_mse`
is prefix_coeff times the sum over the G - 1 inner prefixes. The selection is made once, over the
whole dictionary, as batchtopk makes it, and at inference the same learnt threshold replaces it
(an EMA of the smallest kept activation, `BatchTopK.update_threshold`), so the saved SAE is
exactly a JumpReLU SAE (architecture "jumprelu", the threshold in every latent), like batchtopk
and like SAELens's own matryoshka export.

Conventions: each prefix MSE summed over d_in, averaged over tokens, and the prefix MSEs added
unweighted (prefix_coeff = 1): Bussmann et al.'s and SAELens's sum. dictionary_learning averages
them (weights 1/G) and adds AuxK at auxk_alpha to that mean; that loss is ours divided by G with
aux_coeff = G * auxk_alpha, the same optimum (Adam is blind to the overall factor). AuxK as in
topk/batchtopk (`common.topk_family_terms`): on the full SAE's residual, times the batch's
variance so aux_coeff = 1/32 is Gao et al.'s weight. k, aux_k, threshold_beta and dead_tokens
are batchtopk's. Widths default to d_sae / 16, / 8, / 4, / 2, d_sae (`matryoshka_widths` empty).

Defaults: batchtopk's (k = 64, the shared recipe: lr 2e-3 held and decayed over the last 20%,
batches of 1024). Measured: docs/recipe.md#matryoshka_batchtopk.

Rescaling: as batchtopk's (the selection is scale free, the threshold moves with the latents),
every prefix reconstruction is unchanged when W_dec carries 1/c, and decoder rows are unit norm.

Cost per step: batchtopk's, with the decode done prefix block by prefix block (the same
B x d_sae x d_in multiply-adds in total) and G - 1 extra MSEs of B x d_in.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from variants import register
from variants.base import ConfigError, LatentGroups, LossOut, param
from variants.batchtopk import BatchTopK, BatchTopKConfig
from variants.common import mse_loss, topk_family_terms

DEFAULT_DIVISORS = (16, 8, 4, 2, 1)  # matryoshka_widths empty: d_sae // each of these


@dataclass(kw_only=True)
class MatryoshkaBatchTopKConfig(BatchTopKConfig):
    matryoshka_widths: str = param(
        "", "comma-separated prefix widths, strictly increasing, ending at d_sae; empty: d_sae/16, /8, /4, /2, d_sae"
    )
    prefix_coeff: float = param(1.0, "weight of each inner prefix's MSE (1: the unweighted sum of Bussmann et al.)")

    def __post_init__(self):
        super().__post_init__()
        self.widths()  # validate now, with the message naming the field

    def widths(self) -> tuple[int, ...]:
        """The prefix widths m_1 < ... < m_G = d_sae."""
        text = self.matryoshka_widths.strip()
        if not text:
            return tuple(sorted({self.d_sae // d for d in DEFAULT_DIVISORS} - {0}))
        try:
            widths = tuple(int(part) for part in text.split(","))
        except ValueError:
            raise ConfigError(f"matryoshka_widths expects comma-separated integers, got {text!r}") from None
        increasing = all(a < b for a, b in zip(widths, widths[1:]))
        if not increasing or widths[0] <= 0 or widths[-1] != self.d_sae:
            raise ConfigError(
                f"matryoshka_widths must be positive, strictly increasing and end at d_sae ({self.d_sae})"
            )
        return widths


def prefix_reconstructions(f: Tensor, w_dec: Tensor, b_dec: Tensor, widths: tuple[int, ...]) -> list[Tensor]:
    """x_hat_g = f[..., :m_g] W_dec[:m_g] + b_dec for every prefix, accumulated block by block."""
    out, decoded, start = [], b_dec, 0
    for width in widths:
        decoded = decoded + f[..., start:width] @ w_dec[start:width]
        out.append(decoded)
        start = width
    return out


@register("matryoshka_batchtopk")
class MatryoshkaBatchTopK(BatchTopK):
    Config = MatryoshkaBatchTopKConfig
    description = "Matryoshka BatchTopK SAE: nested prefixes of one dictionary each reconstruct x; learnt threshold"
    term_coefficients = {"auxk": "aux_coeff", "prefix_mse": "prefix_coeff"}

    def __init__(self, cfg: MatryoshkaBatchTopKConfig):
        super().__init__(cfg)
        self.widths = cfg.widths()

    def loss(self, x, step=0, mask=None):
        pre = self.pre_activations(x)
        f = self.batch_code(pre)
        *inner, x_hat = prefix_reconstructions(f, self.W_dec, self.b_dec, self.widths)
        dead = self.tokens_since_fired >= self.dead_after()
        terms = topk_family_terms(x, x_hat, pre, self.W_dec, dead, self.aux_latents(), self.cfg.aux_coeff)
        terms["prefix_mse"] = self.cfg.prefix_coeff * sum((mse_loss(r, x) for r in inner), x.new_zeros(()))
        return LossOut(total=sum(terms.values()), terms=terms, latents=f, recon=x_hat)

    def latent_groups(self) -> LatentGroups:
        """Block g holds the latents m_(g-1) <= i < m_g: the latents prefix g adds."""
        return LatentGroups(
            "prefix block", torch.bucketize(torch.arange(self.cfg.d_sae), torch.tensor(self.widths), right=True)
        )

    def diagnostics(self, x, mask=None):
        """Each prefix's explained variance and L0 (the platform's formulas, on these rows)."""
        out = super().diagnostics(x, mask)
        with torch.no_grad():
            rows = x.reshape(-1, x.shape[-1])
            f = self.encode(rows)
            total = (rows - rows.mean(0)).pow(2).sum().clamp_min(1e-12)
            for width, recon in zip(self.widths, prefix_reconstructions(f, self.W_dec, self.b_dec, self.widths)):
                out[f"prefix_{width}_explained_variance"] = float(1 - (rows - recon).pow(2).sum() / total)
                out[f"prefix_{width}_l0"] = float((f[:, :width] > 0).sum()) / rows.shape[0]
        return out
