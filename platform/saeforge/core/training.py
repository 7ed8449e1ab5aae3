"""The SAE training loop: an iterator of activation batches in, a trained variant out.

It knows nothing of Ray (the Ray Train worker in `saeforge.jobs.train.worker` wraps it), so it is
tested on CPU in milliseconds. It owns what every variant shares: the optimiser, the
learning-rate schedule, the activation scale and data-dependent initialisation of a fresh SAE,
gradient clipping, the shared metrics and the cadence of logs and checkpoints. Batches are raw
whole contexts (see `saeforge.core.batches`).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
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
    _start_from(variant, first[0], first[1], average)
    return itertools.chain([first], batches)


@torch.no_grad()
def start_fresh_side_by_side(
    saes: Sequence[Variant], batches: Iterable[tuple[Sequence[Tensor], Tensor]], average=lambda v: v
) -> Iterator[tuple[Sequence[Tensor], Tensor]]:
    """`start_fresh` for SAEs trained side by side (`train_side_by_side`): each from its own
    activations in the first batch."""
    batches = iter(batches)
    first = next(batches)
    for variant, acts in zip(saes, first[0], strict=True):
        _start_from(variant, acts, first[1], average)
    return itertools.chain([first], batches)


def _start_from(variant: Variant, acts: Tensor, mask: Tensor, average: Callable[[float], float]) -> None:
    variant.act_scale.fill_(average(estimate_act_scale(acts, mask)))
    x, m = sae_input(variant, acts, mask)
    variant.init_from_data(real_rows(x, m))


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
    (data parallelism: one all-reduce per step). One SAE of `train_side_by_side`.
    """
    (final,) = train_side_by_side(
        [model],
        (((acts,), mask, *ids) for acts, mask, *ids in batches),
        settings,
        states=[state or LoopState()],
        on_log=on_log and (lambda step, values: on_log(step, values[0])),
        on_checkpoint=on_checkpoint and (lambda snapshots: on_checkpoint(snapshots[0])),
        sum_over_workers=sum_over_workers,
    )
    return final


class _OneSae:
    """One SAE of a side-by-side loop: its optimiser, schedule, loop state and metric window."""

    def __init__(self, model: torch.nn.Module, state: LoopState, total_steps: int):
        self.model, self.state = model, state
        self.variant: Variant = getattr(model, "module", model)
        self.variant.begin_run(total_steps)
        self.optimizer = make_optimizer(self.variant)
        warmup = effective_warmup(self.variant, total_steps)
        schedule = self.variant.cfg.lr_schedule
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, warmup, total_steps, schedule)
        )
        if state.optimizer:
            self.optimizer.load_state_dict(state.optimizer)
            self.scheduler.load_state_dict(state.scheduler)
        self.window = metrics.RunningMeans()
        self.last: tuple[Tensor, Tensor, Tensor | None] | None = None  # (x, latents, mask) of the last step

    def step(self, acts: Tensor, mask: Tensor, step: int) -> None:
        """One optimiser step on this SAE's activations of the step's contexts."""
        variant = self.variant
        x, m = sae_input(variant, acts, mask)
        out = self.model(x, step, m)
        if not torch.isfinite(out.total):
            raise FloatingPointError(f"loss is {out.total.item()} at step {step}")
        self.optimizer.zero_grad(set_to_none=True)
        out.total.backward()
        if variant.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(variant.parameters(), variant.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        variant.after_step(step)
        self.window.add({"loss": out.total, **{f"loss/{k}": v for k, v in out.terms.items()}})
        self.window.add(metrics.batch_metrics(x, out.recon, out.latents, m))
        self.last = (x, out.latents, m)

    def logged(self, tokens_per_s: float) -> dict[str, float]:
        """The window's means and the periodic metrics; starts a new window."""
        x, latents, m = self.last
        values = self.window.means()
        values.update(metrics.periodic_metrics(self.variant, x, latents, m))
        values.update(
            tokens_seen=self.state.tokens_seen,
            lr=self.scheduler.get_last_lr()[0],
            tokens_per_s=tokens_per_s,
            dead_fraction=metrics.dead_fraction(self.variant.tokens_since_fired, self.state.tokens_seen),
        )
        self.window = metrics.RunningMeans()
        return values

    def snapshot(self) -> LoopState:
        s = self.state
        return LoopState(
            s.step, s.tokens_seen, self.optimizer.state_dict(), self.scheduler.state_dict(), replace(s.contexts)
        )


def train_side_by_side(
    models: Sequence[torch.nn.Module],
    batches: Iterable[tuple],
    settings: LoopSettings,
    *,
    states: Sequence[LoopState] | None = None,
    on_log: Callable[[int, list[dict[str, float]]], None] | None = None,
    on_checkpoint: Callable[[list[LoopState]], None] | None = None,
    sum_over_workers: Callable[[list[int]], list[int]] = lambda values: values,
) -> list[LoopState]:
    """Train k SAEs on the same steps, each on its own activations of the step's contexts: batches
    are (one raw activation tensor per SAE, mask[, context ids]), e.g. the k hooks of one model
    pass. Each SAE keeps its own optimiser, schedule and loop state and trains exactly as
    `train_loop` would train it alone on its activations (same steps, same order); the SAEs take
    their steps one after another and share one all-reduce of the step's counts.

    `on_log` gets every SAE's values (a list, in order) on the log steps, `on_checkpoint` every
    SAE's loop state on the checkpoint steps and at the end (one checkpoint holds them all).
    """
    states = list(states or [LoopState() for _ in models])
    total_steps = settings.total_steps
    saes = [_OneSae(model, state, total_steps) for model, state in zip(models, states, strict=True)]
    step = saes[0].state.step
    if any(s.state.step != step for s in saes):
        raise ValueError(f"SAEs trained side by side are at different steps: {[s.state.step for s in saes]}")
    window_start, window_tokens = time.perf_counter(), 0
    for model in models:
        model.train()
    for acts, mask, *ids in batches:
        if step >= total_steps:
            break
        for i, (sae, sae_acts) in enumerate(zip(saes, acts, strict=True)):
            try:
                sae.step(sae_acts, mask, step)
            except FloatingPointError as err:
                if len(saes) == 1:
                    raise
                raise FloatingPointError(f"{err} (SAE {i + 1} of {len(saes)})") from None
        n_tokens, *tally = sum_over_workers([int(mask.sum()), *(ContextTally.of_step(ids[0]) if ids else [])])
        step += 1
        for sae in saes:
            if tally:
                sae.state.contexts.update(tally)
            sae.state.step = step
            sae.state.tokens_seen += n_tokens
        window_tokens += n_tokens
        if on_log and (step % settings.log_every == 0 or step == total_steps):
            rate = window_tokens / max(time.perf_counter() - window_start, 1e-9)
            on_log(step, [sae.logged(rate) for sae in saes])
            window_start, window_tokens = time.perf_counter(), 0
        if on_checkpoint and settings.checkpoint_every and step % settings.checkpoint_every == 0:
            on_checkpoint([sae.snapshot() for sae in saes])
    final = [sae.snapshot() for sae in saes]
    if on_checkpoint and not (settings.checkpoint_every and step % settings.checkpoint_every == 0):
        on_checkpoint(final)
    return final
