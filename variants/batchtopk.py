"""BatchTopK SAE (Bussmann et al. 2024): in training keep the k x B largest activations of the
whole batch rather than k per token; at inference a single learnt threshold replaces the batch
top-k, so the SAE is exactly a JumpReLU SAE (saved as architecture "jumprelu").

The threshold is Bussmann et al.'s estimate E[smallest kept activation], tracked during training
as an exponential moving average (`threshold_beta`) so it follows the encoder as it trains; the
first update sets it directly. The EMA's window (1 / (1 - threshold_beta) steps) is capped at 10%
of the run, the rule every warm-up follows, so short runs end with a threshold that matches
their encoder. It lives in a (d_sae,) buffer named `threshold`, one equal value per
latent, so checkpoints carry it and the saved weights are exactly a JumpReLU SAE's.

Conventions (as topk's): MSE summed over d_in, averaged over tokens; AuxK times the batch's
variance so aux_coeff = 1/32 is Gao et al.'s weight relative to a variance-normalised MSE
(Bussmann et al. use the same 1/32). aux_k keeps Bussmann et al.'s top_k_aux = 512 (their
paper's number; 0 gives Gao's d_in / 2); dead_tokens 0 is topk's 10 * d_sae (Bussmann et al.
count a latent dead after 5 silent batches, 20,480 tokens at their batch of 4096).

Defaults: topk's recipe for a default-scale (300k-token) run, k = 64, lr 2e-3 with the late
linear decay, batches of 1024 tokens; Bussmann et al.'s batch (`--set batch_size=4096`) would
leave such a run 72 steps. Measured: docs/recipe.md#batchtopk.

Rescaling: the batch top-k choice is scale free and the threshold moves with the latents
(`_scale_latents`), so MSE and AuxK are unchanged; decoder rows are unit norm (after_step).

Cost per step: the linear SAE's two (B x d_in x d_sae) matmuls, one top-(k*B) over B*d_sae
values, and AuxK's extra (B x aux_k x d_in) decode when latents are dead.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from variants import register
from variants.base import ConfigError, param
from variants.topk import TopK, TopKConfig


@dataclass(kw_only=True)
class BatchTopKConfig(TopKConfig):
    k: int = param(64, "mean latents kept per token: the top k*B activations of a batch of B tokens")
    aux_k: int = param(512, "dead latents used by the auxiliary loss (Bussmann et al.'s top_k_aux; 0: d_in // 2)")
    threshold_beta: float = param(0.999, "EMA factor of the inference threshold (mean smallest kept activation)")
    batch_size: int = param(1024, "activation tokens per optimiser step (Bussmann et al.: 4096, for long runs)")

    def __post_init__(self):
        if not 0 < self.k <= self.d_sae:
            raise ConfigError(f"k must be in 1..d_sae ({self.d_sae}), got {self.k}")
        if not 0.0 <= self.threshold_beta < 1.0:
            raise ConfigError(f"threshold_beta must be in [0, 1), got {self.threshold_beta}")


def batch_topk_relu(pre: Tensor, k: int) -> Tensor:
    """ReLU, then keep the k * n_tokens largest values over all tokens (any leading shape)."""
    acts = pre.relu()
    flat = acts.reshape(-1)
    n_tokens = flat.numel() // pre.shape[-1]
    values, indices = flat.topk(min(k * n_tokens, flat.numel()))
    return torch.zeros_like(flat).scatter_(0, indices, values).reshape(pre.shape)


@register("batchtopk")
class BatchTopK(TopK):
    Config = BatchTopKConfig
    description = "BatchTopK SAE: top k*B activations per batch in training, a learnt threshold at inference"
    saelens_architecture = "jumprelu"

    def __init__(self, cfg: BatchTopKConfig):
        super().__init__(cfg)
        # Inference threshold, one (equal) value per latent: exactly a JumpReLU SAE's `threshold`.
        # threshold_updates counts the batches that have updated it (0: not estimated yet).
        self.register_buffer("threshold", torch.zeros(cfg.d_sae))
        self.register_buffer("threshold_updates", torch.tensor(0, dtype=torch.long))

    def encode(self, x: Tensor) -> Tensor:
        pre = self.pre_activations(x)
        if self.training:
            return batch_topk_relu(pre, self.cfg.k)
        return self.threshold_activation(pre)

    def threshold_activation(self, pre: Tensor) -> Tensor:
        """JumpReLU with the learnt threshold: what a jumprelu loader computes from the saved SAE."""
        return pre * (pre > self.jumprelu_threshold())

    def jumprelu_threshold(self) -> Tensor:
        """(d_sae,) per-latent thresholds in the jumprelu format (the same value for every latent)."""
        return self.threshold.clamp_min(0.0)

    def _scale_latents(self, c: float) -> None:
        """The inference threshold is in latent units, so it scales with them."""
        super()._scale_latents(c)
        self.threshold.mul_(c)

    def threshold_ema_beta(self) -> float:
        """threshold_beta, with its averaging window (1 / (1 - beta) steps) capped at 10% of the
        run like every warm-up (`penalty_warmup`): uncapped, 0.999 would leave a 300-step run's
        threshold near its first estimate (docs/recipe.md#behind-batchtopk)."""
        window = round(1 / (1 - self.cfg.threshold_beta)) if self.cfg.threshold_beta > 0 else 1
        return 1 - 1 / max(1, self.penalty_warmup(window))

    @torch.no_grad()
    def update_threshold(self, f: Tensor) -> None:
        kept = f[f > 0]
        if kept.numel() == 0:
            return
        smallest = kept.min()
        if int(self.threshold_updates) == 0:
            self.threshold.fill_(smallest)
        else:
            beta = self.threshold_ema_beta()
            self.threshold.mul_(beta).add_((1 - beta) * smallest)
        self.threshold_updates += 1

    def batch_code(self, pre: Tensor) -> Tensor:
        """The code in training (the batch's top k*B, which updates the threshold) or at inference
        (the threshold)."""
        if not self.training:
            return self.threshold_activation(pre)
        f = batch_topk_relu(pre, self.cfg.k)
        self.update_threshold(f)
        return f

    def loss(self, x, step=0, mask=None):
        pre = self.pre_activations(x)
        return self.topk_loss(x, pre, self.batch_code(pre))

    def saelens_fields(self) -> dict:
        return {}  # saved as a plain JumpReLU SAE: the threshold is all SAELens needs

    def saelens_tensors(self) -> dict[str, Tensor]:
        """A JumpReLU SAE's tensors: the linear ones folded, the learnt threshold for every latent."""
        return {**super().saelens_tensors(), "threshold": self.jumprelu_threshold()}

    def diagnostics(self, x, mask=None):
        return {"threshold": float(self.threshold[0]), "threshold_updates": float(self.threshold_updates)}
