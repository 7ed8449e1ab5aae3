"""The SAE training loop: an iterator of activation batches in, a trained variant out.

It knows nothing of Ray (the Ray Train worker in `saeforge.jobs.train_worker` wraps it), so it is
tested on CPU in milliseconds. It owns what every variant shares: the optimiser, the
learning-rate schedule, the activation scale and data-dependent initialisation of a fresh SAE,
gradient clipping, the shared metrics and the cadence of logs and checkpoints. Batches are raw
whole contexts (see `saeforge.core.batches`).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from saeforge.core import metrics
from saeforge.core.batches import real_rows, sae_input
from variants import Variant
from variants.common import capped_warmup


@dataclass(frozen=True)
class LoopSettings:
    """The loop's cadence: how many steps, and how often to log, checkpoint and report."""

    total_steps: int
    log_every: int = 10
    checkpoint_every: int = 100  # 0: only at the end
    report_every: int = 0  # Tune's intermediate reports (a multiple of log_every); 0: none


@dataclass
class ContextTally:
    """Which contexts the run has trained, as the count, sum and sum of squares of their ids (over
    every worker): two runs that trained the same set of contexts once each agree on all three,
    and a context trained twice or skipped shows (the exact-resume tests compare them)."""

    count: int = 0
    id_sum: int = 0
    id_square_sum: int = 0

    @staticmethod
    def of_step(ids: Tensor) -> list[int]:
        """This step's (count, sum, sum of squares) of `ids` (int64), to be summed over workers."""
        ids = ids.to("cpu", torch.int64)
        return [ids.numel(), int(ids.sum()), int((ids * ids).sum())]

    def update(self, totals: list[int]) -> None:
        self.count += totals[0]
        self.id_sum += totals[1]
        self.id_square_sum += totals[2]

    def as_dict(self) -> dict[str, int]:
        return {
            "contexts_trained": self.count,
            "context_id_sum": self.id_sum,
            "context_id_square_sum": self.id_square_sum,
        }

    @classmethod
    def from_dict(cls, raw: dict) -> ContextTally:
        return cls(raw.get("contexts_trained", 0), raw.get("context_id_sum", 0), raw.get("context_id_square_sum", 0))


@dataclass
class LoopState:
    """What a checkpoint must carry besides the weights to resume exactly where it stopped."""

    step: int = 0
    tokens_seen: int = 0
    optimizer: dict = field(default_factory=dict)
    scheduler: dict = field(default_factory=dict)
    contexts: ContextTally = field(default_factory=ContextTally)


def make_optimizer(variant: Variant) -> torch.optim.Optimizer:
    cfg = variant.cfg
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer]  # variants.base.OPTIMIZERS
    return cls(variant.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def effective_warmup(variant: Variant, total_steps: int) -> int:
    """The paper's warm-up, capped at 10% of the run so short runs still train at full lr (the
    same rule caps every penalty warm-up: variants.common.capped_warmup)."""
    return capped_warmup(variant.cfg.warmup_steps, total_steps)


def lr_factor(step: int, warmup: int, total_steps: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "decay":
        decay_start = max(warmup, int(0.8 * total_steps))
        if step >= decay_start:
            return max(0.0, (total_steps - step) / max(1, total_steps - decay_start))
    return 1.0


@torch.no_grad()
def estimate_act_scale(acts: Tensor, mask: Tensor | None = None) -> float:
    """Scale that makes E||x|| = sqrt(d_in) over the real tokens (estimated once per run, stored with the SAE)."""
    rows = real_rows(acts.float(), mask)
    return math.sqrt(rows.shape[-1]) / rows.norm(dim=-1).mean().clamp_min(1e-8).item()


@torch.no_grad()
def start_fresh(
    variant: Variant, batches: Iterable[tuple[Tensor, Tensor]], average: Callable[[float], float] = lambda v: v
) -> Iterator[tuple[Tensor, Tensor]]:
    """A fresh SAE's data-dependent start, from its first batch: the activation scale (averaged
    over data-parallel workers by `average`), then the variant's own initialisation. Returns the
    batches, the first one included. Call it before wrapping the variant for DDP, which then
    broadcasts rank 0's start to every rank."""
    batches = iter(batches)
    first = next(batches)
    acts, mask = first[0], first[1]
    variant.act_scale.fill_(average(estimate_act_scale(acts, mask)))
    x, m = sae_input(variant, acts, mask)
    variant.init_from_data(real_rows(x, m))
    return itertools.chain([first], batches)


def train_loop(
    model: torch.nn.Module,
    batches: Iterable[tuple[Tensor, ...]],
    settings: LoopSettings,
    *,
    state: LoopState | None = None,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    on_checkpoint: Callable[[LoopState], None] | None = None,
    sum_over_workers: Callable[[list[int]], list[int]] = lambda values: values,
) -> LoopState:
    """Train `model` (a Variant, or a DDP wrapper around one) on (raw activations, mask) batches of
    whole contexts, or (activations, mask, context ids) ones whose ids the state tallies, until
    `settings.total_steps` or the batches run out (a fresh SAE has been through `start_fresh`).

    `on_log` gets averaged loss terms and shared metrics every
    `log_every` steps; `on_checkpoint` the loop state every `checkpoint_every` steps and once at the
    end. `sum_over_workers` turns this rank's counts (tokens, context tally) into the global ones
    (data parallelism: one all-reduce per step).
    """
    variant: Variant = getattr(model, "module", model)
    state = state or LoopState()
    total_steps = settings.total_steps
    variant.begin_run(total_steps)
    optimizer = make_optimizer(variant)
    warmup = effective_warmup(variant, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup, total_steps, variant.cfg.lr_schedule)
    )
    if state.optimizer:
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
    window = metrics.RunningMeans()
    window_start, window_tokens = time.perf_counter(), 0
    model.train()
    for acts, mask, *ids in batches:
        if state.step >= total_steps:
            break
        x, m = sae_input(variant, acts, mask)
        out = model(x, state.step, m)
        if not torch.isfinite(out.total):
            raise FloatingPointError(f"loss is {out.total.item()} at step {state.step}")
        optimizer.zero_grad(set_to_none=True)
        out.total.backward()
        if variant.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(variant.parameters(), variant.cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        variant.after_step(state.step)
        n_tokens, *tally = sum_over_workers([int(mask.sum()), *(ContextTally.of_step(ids[0]) if ids else [])])
        if tally:
            state.contexts.update(tally)
        state.step += 1
        state.tokens_seen += n_tokens
        window_tokens += n_tokens
        window.add({"loss": out.total, **{f"loss/{k}": v for k, v in out.terms.items()}})
        window.add(metrics.batch_metrics(x, out.recon, out.latents, m))
        if on_log and (state.step % settings.log_every == 0 or state.step == total_steps):
            elapsed = time.perf_counter() - window_start
            logged = window.means()
            logged.update(metrics.periodic_metrics(variant, x, out.latents, m))
            logged.update(
                tokens_seen=state.tokens_seen,
                lr=scheduler.get_last_lr()[0],
                tokens_per_s=window_tokens / max(elapsed, 1e-9),
                dead_fraction=metrics.dead_fraction(variant.tokens_since_fired, state.tokens_seen),
            )
            on_log(state.step, logged)
            window = metrics.RunningMeans()
            window_start, window_tokens = time.perf_counter(), 0
        if on_checkpoint and settings.checkpoint_every and state.step % settings.checkpoint_every == 0:
            on_checkpoint(_snapshot(state, optimizer, scheduler))
    final = _snapshot(state, optimizer, scheduler)
    if on_checkpoint and not (settings.checkpoint_every and state.step % settings.checkpoint_every == 0):
        on_checkpoint(final)
    return final


def _snapshot(state: LoopState, optimizer, scheduler) -> LoopState:
    return LoopState(
        state.step, state.tokens_seen, optimizer.state_dict(), scheduler.state_dict(), replace(state.contexts)
    )
