"""What every evaluation suite works with: the model, its tokenizer, the SAE and its hook point,
plus the batched forward passes the suites share.

Suites that only need the hooked activations (probing, disentanglement, absorption, latent
selection) run the model up to the hook and stop there, like the training producers: the later
layers and the LM head never run. Suites that need the model's predictions (core, unlearning) run
the whole model with the SAE spliced in at the hook (`hooks.replace`).

Units: the SAE works in normalised activation space (raw activations x `act_scale`, see
variants/base.py); `sae_latents` does that scaling, and BOS/padding positions are masked out
everywhere (they never reach an SAE in training either).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

import variants
from saeforge.core import corpus
from saeforge.core.batches import scaled_positions
from saeforge.core.hooks import HookPoint
from saeforge.core.model import run_slice


@dataclass
class SuiteResult:
    """What a suite returns."""

    metrics: dict[str, float]  # flat numbers: logged to MLflow as eval/<suite>/<key>
    headline: tuple[str, ...] = ()  # keys shown in the printed summary table
    tables: dict[str, list[dict]] = field(default_factory=dict)  # per-task rows, the unlearning grid, ...
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SuiteResult:
        return cls(
            metrics=d["metrics"],
            headline=tuple(d.get("headline", ())),
            tables=d.get("tables", {}),
            seconds=d.get("seconds", 0.0),
        )


@dataclass
class EvalContext:
    """The loaded model (whole: CE loss and unlearning need its predictions) and the SAE."""

    model: torch.nn.Module
    tokenizer: object
    sae: variants.Variant
    hook: HookPoint
    context_size: int = 128
    dataset: str = corpus.BUILTIN  # text source of the held-out contexts (the SAE's training source)
    text_column: str = "text"
    batch_contexts: int = 8  # sequences per forward pass
    progress: Callable[[str], None] | None = None

    @property
    def special_ids(self) -> list[int]:
        return corpus.special_ids(self.tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def say(self, message: str) -> None:
        if self.progress:
            self.progress(message)


# -- token batches -------------------------------------------------------------------------------


def heldout_contexts(ctx: EvalContext, n_contexts: int) -> np.ndarray:
    """(n, context_size) packed contexts from the held-out split of the SAE's text source."""
    texts = corpus.split_texts(ctx.dataset, "eval", ctx.text_column)
    return corpus.pack_contexts(texts, ctx.tokenizer, ctx.context_size, n_contexts)


def pack_texts(ctx: EvalContext, texts: Iterable[str], n_contexts: int) -> np.ndarray:
    """Texts packed into (n, context_size) contexts, each document preceded by BOS."""
    return corpus.pack_contexts(texts, ctx.tokenizer, ctx.context_size, n_contexts)


def encode_texts(tokenizer, texts: list[str], max_tokens: int) -> list[list[int]]:
    """One sequence per text: BOS + its first max_tokens - 1 tokens."""
    bos = tokenizer.bos_token_id
    return [[bos, *tokenizer.encode(t, add_special_tokens=False)[: max_tokens - 1]] for t in texts]


def padded_batches(seqs: list[list[int]], batch: int, pad: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """(indices, (b, longest) ids) batches of sequences of similar length, right-padded. Attention
    is causal, so right padding never changes the real positions' activations."""
    order = np.argsort([len(s) for s in seqs], kind="stable")
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        width = max(len(seqs[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, : len(seqs[i])] = torch.tensor(seqs[i], dtype=torch.long)
        yield idx, ids


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.bos_token_id


# -- forward passes ------------------------------------------------------------------------------


class _ReachedHook(Exception):
    """Raised from the hook to stop the forward pass once the activation is recorded."""


@torch.no_grad()
def hook_activations(model, hook: HookPoint, ids: torch.Tensor) -> torch.Tensor:
    """Raw activations at the hook point, (b, t, d_in) float32 on the CPU; the layers after the
    hook (and the LM head) never run."""
    captured: dict[str, torch.Tensor] = {}

    def stop(module, inputs, output):
        captured["acts"] = output[0] if isinstance(output, tuple) else output
        raise _ReachedHook

    handle = hook.module(model).register_forward_hook(stop)
    try:
        run_slice(model, ids.to(next(model.parameters()).device))
    except _ReachedHook:
        pass
    finally:
        handle.remove()
    return captured["acts"].float().cpu()


@torch.no_grad()
def sae_latents(sae: variants.Variant, acts: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised activations, latents) at every position of raw activations (b, t, d_in)."""
    x = scaled_positions(sae, acts, mask)
    return x, sae.encode(x)


def context_batches(
    ctx: EvalContext, contexts: np.ndarray, batch: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(ids, mask) torch batches of `batch` (default ctx.batch_contexts) contexts; mask is True at
    real tokens."""
    batch = batch or ctx.batch_contexts
    for start in range(0, len(contexts), batch):
        ids = torch.from_numpy(np.asarray(contexts[start : start + batch], dtype=np.int64))
        yield ids, corpus.valid_mask(ids, ctx.special_ids)


@torch.no_grad()
def token_latents(ctx: EvalContext, contexts: np.ndarray) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per batch of contexts: (normalised activations, latents, mask), (b, t, ...) each."""
    ctx.sae.eval()
    for ids, mask in context_batches(ctx, contexts):
        x, f = sae_latents(ctx.sae, hook_activations(ctx.model, ctx.hook, ids), mask)
        yield x, f, mask.to(f.device)


def firing_frequency(ctx: EvalContext, contexts: np.ndarray) -> torch.Tensor:
    """Fraction of real tokens on which each latent fires (> 0)."""
    counts, tokens = torch.zeros(ctx.sae.cfg.d_sae), 0
    for _, f, mask in token_latents(ctx, contexts):
        rows = f[mask]
        counts += (rows > 0).sum(0).float().cpu()
        tokens += rows.shape[0]
    return counts / max(tokens, 1)
