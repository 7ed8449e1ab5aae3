"""The SAE training loop: an iterator of activation batches in, a trained variant out.

It knows nothing of Ray (the Ray Train glue in `train_workers.py` wraps it), so it is tested on
CPU in milliseconds. It owns what every variant shares: the optimiser, the learning-rate
schedule, activation normalisation, gradient clipping, the shared metrics and the cadence of
logs and checkpoints.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import Tensor

from variants import Variant

from saeforge import metrics


@dataclass
class LoopState:
    """What a checkpoint must carry besides the weights to resume exactly where it stopped."""

    step: int = 0
    tokens_seen: int = 0
    optimizer: dict = field(default_factory=dict)
    scheduler: dict = field(default_factory=dict)


def make_optimizer(variant: Variant) -> torch.optim.Optimizer:
    cfg = variant.cfg
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(variant.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(variant.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer '{cfg.optimizer}' (known: adam, adamw)")


def effective_warmup(variant: Variant, total_steps: int) -> int:
    """The paper's warm-up, capped at 10% of the run so short runs still train at full lr."""
    return min(variant.cfg.warmup_steps, max(1, total_steps // 10))


def lr_factor(step: int, warmup: int, total_steps: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


@torch.no_grad()
def estimate_act_scale(batch: Tensor, mask: Tensor | None = None) -> float:
    """Scale that makes E||x|| = sqrt(d_in) (estimated once per run, stored with the SAE)."""
    rows = batch[mask] if mask is not None else batch.reshape(-1, batch.shape[-1])
    return math.sqrt(rows.shape[-1]) / rows.norm(dim=-1).mean().clamp_min(1e-8).item()


def train_loop(
    model: torch.nn.Module,
    batches: Iterable[tuple[Tensor, Tensor | None]],
    total_steps: int,
    *,
    state: LoopState | None = None,
    log_every: int = 20,
    checkpoint_every: int = 0,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    on_checkpoint: Callable[[LoopState], None] | None = None,
    world_size: int = 1,
) -> LoopState:
    """Train `model` (a Variant, or a DDP wrapper around one) on (activations, mask) batches.

    Activations are raw; they are multiplied by the variant's act_scale (set beforehand). Stops
    when the batches run out or `total_steps` is reached. `on_log` gets averaged loss terms and
    shared metrics every `log_every` steps; `on_checkpoint` the loop state every
    `checkpoint_every` steps and once at the end. Token counts are global: each of the
    `world_size` data-parallel ranks sees an equal share of every batch.
    """
    variant: Variant = getattr(model, "module", model)
    state = state or LoopState()
    optimizer = make_optimizer(variant)
    warmup = effective_warmup(variant, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup, total_steps, variant.cfg.lr_schedule))
    if state.optimizer:
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
    window = metrics.RunningMeans()
    window_start, window_tokens = time.perf_counter(), 0
    model.train()
    for acts, mask in batches:
        if state.step >= total_steps:
            break
        x = acts * variant.act_scale
        out = model(x, state.step, mask)
        if not torch.isfinite(out.total):
            raise FloatingPointError(f"loss is {out.total.item()} at step {state.step}")
        optimizer.zero_grad(set_to_none=True)
        out.total.backward()
        if variant.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(variant.parameters(), variant.cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        variant.after_step(state.step)
        n_tokens = (int(mask.sum()) if mask is not None else acts.shape[0]) * world_size
        state.step += 1
        state.tokens_seen += n_tokens
        window_tokens += n_tokens
        window.add({"loss": out.total, **{f"loss/{k}": v for k, v in out.terms.items()}})
        window.add(metrics.batch_metrics(x, out.recon, out.latents, mask))
        if on_log and (state.step % log_every == 0 or state.step == total_steps):
            elapsed = time.perf_counter() - window_start
            logged = window.means()
            logged.update(metrics.periodic_metrics(variant, x, out.latents, mask))
            logged.update(
                tokens_seen=state.tokens_seen, lr=scheduler.get_last_lr()[0],
                tokens_per_s=window_tokens / max(elapsed, 1e-9),
                dead_fraction=metrics.dead_fraction(variant.tokens_since_fired, state.tokens_seen))
            on_log(state.step, logged)
            window = metrics.RunningMeans()
            window_start, window_tokens = time.perf_counter(), 0
        if on_checkpoint and checkpoint_every and state.step % checkpoint_every == 0:
            on_checkpoint(_snapshot(state, optimizer, scheduler))
    final = _snapshot(state, optimizer, scheduler)
    if on_checkpoint and not (checkpoint_every and state.step % checkpoint_every == 0):
        on_checkpoint(final)
    return final


def _snapshot(state: LoopState, optimizer, scheduler) -> LoopState:
    return LoopState(state.step, state.tokens_seen, optimizer.state_dict(), scheduler.state_dict())
