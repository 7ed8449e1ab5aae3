"""What a batch is, written once: whole contexts, scaled, laid out for the variant.

Every activation batch in saeforge, in training and in evaluation, is a block of whole
contexts: raw activations (n, T, d_in) and a mask (n, T), true at real tokens (BOS and padding
are false). An optimiser step trains on a fixed number of whole contexts, so what a step read is
known exactly (the step budget and resuming rely on it). The variant's `batch_layout` decides
what it is handed:
- "tokens": the real-token rows (N, d_in) and no mask (row order carries no meaning);
- "contexts": the whole contexts with BOS/padding positions zeroed, and the mask.
Activations are multiplied by the variant's act_scale on the way in, so variants work in
normalised units.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

CONTEXTS = "contexts"  # the batch layout of variants that read whole contexts; the other is "tokens"


def scaled_positions(variant, acts: Tensor, mask: Tensor) -> Tensor:
    """Every position (n, T, d) in the variant's units: scaled, and for the "contexts" layout with
    BOS/padding zeroed so they never feed token-order maths. For callers that need positions
    (splicing a reconstruction into the model, pooling latents over a text)."""
    x = acts.float().to(variant.act_scale.device) * variant.act_scale
    if variant.batch_layout == CONTEXTS:
        x = x * mask.to(device=x.device, dtype=x.dtype).unsqueeze(-1)
    return x


def for_layout(variant, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor | None]:
    """(x, mask) as the variant's loss and diagnostics take them, from scaled positions: the
    real-token rows for the "tokens" layout, the whole contexts and the mask for "contexts"."""
    mask = mask.to(device=x.device, dtype=torch.bool)
    return (x, mask) if variant.batch_layout == CONTEXTS else (x[mask], None)


def sae_input(variant, acts: Tensor, mask: Tensor) -> tuple[Tensor, Tensor | None]:
    """(x, mask) as the variant trains on them, from raw activations (n, T, d) and their mask (n, T)."""
    return for_layout(variant, scaled_positions(variant, acts, mask), mask)


def real_rows(t: Tensor, mask: Tensor | None) -> Tensor:
    """(N, d) rows at real tokens: of a token batch (mask None) or of a context batch."""
    return t.reshape(-1, t.shape[-1]) if mask is None else t[mask]


def tokens_per_context(context_size: int) -> int:
    """Real tokens in a full context: every context starts with BOS, which is never trained on."""
    return context_size - 1


def contexts_per_step(batch_tokens: int, context_size: int, workers: int) -> int:
    """Whole contexts per optimiser step: as many as fit in `batch_tokens` real tokens, at least
    one per data-parallel worker and a multiple of the workers (each reads an equal share)."""
    n = max(1, batch_tokens // tokens_per_context(context_size))
    return max(workers, n - n % workers)


@dataclass(frozen=True)
class StepBudget:
    """How long a run is: its steps, the whole contexts each reads, and the contexts it needs."""

    total_steps: int
    contexts_per_step: int
    wanted_steps: int  # what the token budget asked for, before the corpus capped it

    @property
    def contexts(self) -> int:
        return self.total_steps * self.contexts_per_step

    @property
    def short(self) -> bool:
        """True when the corpus holds fewer contexts than the token budget asked for."""
        return self.total_steps < self.wanted_steps


def step_budget(
    tokens: int, batch_tokens: int, context_size: int, workers: int, available_contexts: int | None = None
) -> StepBudget:
    """The one rule for a run's length: `tokens` real tokens in steps of whole contexts (at least
    one step), never more contexts than `available_contexts` when that is known."""
    per_step = contexts_per_step(batch_tokens, context_size, workers)
    wanted = max(1, tokens // (per_step * tokens_per_context(context_size)))
    steps = wanted if available_contexts is None else max(1, min(wanted, available_contexts // per_step))
    return StepBudget(steps, per_step, wanted)
