"""Exact streaming statistics of an SAE's latents for the feature browser (pure torch).

`LatentStats` reads latents batch by batch ((b, T, d_sae) per batch of whole contexts, with the
mask of real tokens and each context's id) and keeps, for every latent:
- firing count, activation sum and maximum, and the per-token L0 distribution;
- its top-k contexts by peak activation (ties broken by the lower context id), each with a window
  of its activations around the peak token;
- a uniform sample of the contexts it fires on (the `samples` contexts with the smallest hash key
  of (context id, latent): priority sampling, so the sample does not depend on batch order), from
  which the browser draws examples at several activation quantiles;
- a histogram of its activations on the tokens it fires on, over [0, 2^e) in `bins` equal bins,
  where e grows (merging bins pairwise, which is exact) as larger activations arrive.
Every part merges exactly (`merge`): producer actors each keep one and the driver merges them,
and the result equals one pass over all the contexts in any order. Memory is d_sae x (top_k +
samples) x window, whatever the number of tokens.

The decoder-side measures (cosine histogram, most similar latents, tokens promoted and
suppressed through the unembedding) are here too: plain matrix maths, done in chunks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

WINDOW_BEFORE, WINDOW_AFTER = 24, 8  # tokens kept around an example's peak token
HIST_START_EXP = -20  # a histogram first spans [0, 2^-20); it doubles as larger values arrive
MASK32 = 0xFFFFFFFF


def sample_keys(context_ids: Tensor, latents: Tensor, seed: int) -> Tensor:
    """Hash of (context id, latent) in [0, 1): the priority of a context in a latent's sample.
    A function of the pair only (not of the batch it came in), so merged samples are exact."""
    h = (context_ids.long()[:, None] & MASK32) * 0x2545F491 + latents.long()[None, :] * 0x1B873593 + seed * 0x27D4EB2F
    h = h & MASK32
    for mult, shift in ((0x2C1B3C6D, 15), (0x297A2D39, 12), (0x3C6EF372, 15)):
        h = h ^ (h >> shift)
        h = (h * mult) & MASK32
    return (h ^ (h >> 16)).double() / 2.0**32


@dataclass
class Examples:
    """Up to `k` contexts per latent: each with a sort score, its context id (-1: empty slot), its
    peak activation and position, and its activations over the window around the peak (NaN
    outside the context)."""

    score: Tensor  # (L, k) float64, higher is kept
    context: Tensor  # (L, k) long
    value: Tensor  # (L, k) float32 peak activation
    peak: Tensor  # (L, k) long position of the peak token in its context
    window: Tensor  # (L, k, WINDOW_BEFORE + 1 + WINDOW_AFTER) float32

    @classmethod
    def empty(cls, n_latents: int, k: int) -> Examples:
        width = WINDOW_BEFORE + 1 + WINDOW_AFTER
        return cls(
            torch.full((n_latents, k), -math.inf, dtype=torch.float64),
            torch.full((n_latents, k), -1, dtype=torch.long),
            torch.zeros(n_latents, k),
            torch.zeros(n_latents, k, dtype=torch.long),
            torch.full((n_latents, k, width), math.nan),
        )

    def kept(self, latent: int) -> list[int]:
        """Slots of `latent` that hold a context, best first."""
        return [j for j in range(self.context.shape[1]) if int(self.context[latent, j]) >= 0]

    def merge(self, other: Examples) -> Examples:
        """The best k of both, per latent: by score, ties by the lower context id (so the result
        does not depend on which side a context came from)."""
        score = torch.cat([self.score, other.score], 1)
        context = torch.cat([self.context, other.context], 1)
        order = best_order(score, context, self.score.shape[1])
        window = torch.cat([self.window, other.window], 1)
        return Examples(
            score.gather(1, order),
            context.gather(1, order),
            torch.cat([self.value, other.value], 1).gather(1, order),
            torch.cat([self.peak, other.peak], 1).gather(1, order),
            window.gather(1, order.unsqueeze(-1).expand(-1, -1, window.shape[-1])),
        )


def best_order(score: Tensor, context: Tensor, k: int) -> Tensor:
    """(L, k) column indices of the k best entries per row: highest score first, equal scores in
    increasing context id (empty slots, context -1, last). One rule for a batch and for a merge,
    so the kept contexts never depend on how the contexts were split into batches or actors."""
    by_id = torch.argsort(torch.where(context < 0, torch.iinfo(torch.long).max, context), dim=1, stable=True)
    return by_id.gather(1, torch.argsort(score.gather(1, by_id), dim=1, descending=True, stable=True))[:, :k]


def context_windows(f: Tensor) -> Tensor:
    """(b, T, L, W) view: [r, p, l] is latent l's activations in batch row r over the window
    around position p (NaN beyond the context's ends), from latents f (b, T, L)."""
    b, t, n = f.shape
    padded = torch.full((b, WINDOW_BEFORE + t + WINDOW_AFTER, n), math.nan)
    padded[:, WINDOW_BEFORE : WINDOW_BEFORE + t] = f
    return padded.unfold(1, WINDOW_BEFORE + 1 + WINDOW_AFTER, 1)


def batch_examples(
    windows: Tensor, context_ids: Tensor, score: Tensor, value: Tensor, peak: Tensor, k: int
) -> Examples:
    """The best k contexts of one batch per latent (score (L, b); -inf: not a candidate), with
    their windows (`context_windows` of the batch)."""
    n, b = score.shape
    top = best_order(score, context_ids.long().unsqueeze(0).expand(n, b), min(k, b))  # (L, k) batch rows
    s = score.gather(1, top)
    ctx = torch.where(torch.isfinite(s), context_ids.long()[top], torch.full_like(top, -1))
    pk = peak.gather(1, top)
    window = windows[top, pk, torch.arange(n).unsqueeze(1)]  # (L, k, W)
    window = torch.where((ctx >= 0).unsqueeze(-1), window, torch.full_like(window, math.nan))
    return Examples(s, ctx, value.gather(1, top).float(), pk, window)


def rebin(counts: Tensor, grow: Tensor) -> Tensor:
    """Histogram counts (L, bins) over [0, 2^e) re-expressed over [0, 2^(e + grow)) per latent:
    old bin i falls in new bin i >> grow (bins is a power of two, so the edges line up exactly)."""
    bins = counts.shape[1]
    target = torch.arange(bins).unsqueeze(0) >> grow.clamp(0, 62).unsqueeze(1)
    return torch.zeros_like(counts).scatter_add_(1, target, counts)


class LatentStats:
    """Streaming, mergeable statistics of all d_sae latents (see the module docstring)."""

    def __init__(self, d_sae: int, top_k: int = 20, samples: int = 32, bins: int = 32, seed: int = 0):
        if bins & (bins - 1):
            raise ValueError(f"bins must be a power of two, got {bins}")
        self.d_sae, self.top_k, self.samples, self.bins, self.seed = d_sae, top_k, samples, bins, seed
        self.tokens = 0
        self.contexts = 0
        self.fire_counts = torch.zeros(d_sae, dtype=torch.long)
        self.act_sum = torch.zeros(d_sae, dtype=torch.float64)
        self.act_max = torch.zeros(d_sae)
        self.l0_counts = torch.zeros(d_sae + 1, dtype=torch.long)  # tokens by how many latents fire
        self.top = Examples.empty(d_sae, top_k)
        self.sample = Examples.empty(d_sae, samples)
        self.hist = torch.zeros(d_sae, bins, dtype=torch.long)
        self.hist_exp = torch.full((d_sae,), HIST_START_EXP, dtype=torch.long)

    # -- reading batches -------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, latents: Tensor, mask: Tensor, context_ids: Tensor) -> None:
        """Add a batch: latents (b, T, d_sae), mask (b, T) true at real tokens, context ids (b,)."""
        mask = mask.bool().cpu()
        f = latents.detach().float().cpu() * mask.unsqueeze(-1)
        f = f.clamp_min(0)  # a latent "fires" when > 0; no variant emits negative latents
        context_ids = context_ids.long().cpu()
        rows = f[mask]  # (N, d_sae) real tokens
        self.tokens += rows.shape[0]
        self.contexts += int(mask.any(1).sum())
        # Every firing as (token, latent, value): the counts, sums and histogram read these alone.
        token, latent = (rows > 0).nonzero(as_tuple=True)
        values = rows[token, latent]
        self.fire_counts += torch.bincount(latent, minlength=self.d_sae)
        self.act_sum.index_add_(0, latent, values.double())
        self.act_max = self.act_max.scatter_reduce(0, latent, values, "amax")
        self.l0_counts += torch.bincount(torch.bincount(token, minlength=len(rows)), minlength=self.d_sae + 1)
        self._add_histogram(latent, values)

        windows = context_windows(f)
        peak_value, peak = f.max(1)  # (b, d_sae): each context's peak per latent
        value, peak = peak_value.T.contiguous(), peak.T.contiguous()  # (d_sae, b)
        fires = value > 0
        top_score = torch.where(fires, value.double(), torch.full_like(value, -math.inf, dtype=torch.float64))
        self.top = self.top.merge(batch_examples(windows, context_ids, top_score, value, peak, self.top_k))
        keys = sample_keys(context_ids, torch.arange(self.d_sae), self.seed).T  # (d_sae, b)
        sample_score = torch.where(fires, -keys, torch.full_like(keys, -math.inf))
        self.sample = self.sample.merge(batch_examples(windows, context_ids, sample_score, value, peak, self.samples))

    def _add_histogram(self, latent: Tensor, values: Tensor) -> None:
        if not len(values):
            return
        need = torch.zeros(self.d_sae, dtype=torch.long)
        top = torch.zeros(self.d_sae).scatter_reduce_(0, latent, values, "amax")
        fired = top > 0
        # the smallest e with top < 2^e
        need[fired] = torch.floor(torch.log2(top[fired].double())).long() + 1
        self._grow_to(torch.maximum(self.hist_exp, need))
        width = torch.pow(2.0, self.hist_exp.double())[latent] / self.bins
        bin_ = torch.floor(values.double() / width).long().clamp(0, self.bins - 1)
        self.hist += torch.bincount(latent * self.bins + bin_, minlength=self.d_sae * self.bins).view(-1, self.bins)

    def _grow_to(self, exp: Tensor) -> None:
        if bool((exp > self.hist_exp).any()):
            self.hist = rebin(self.hist, exp - self.hist_exp)
            self.hist_exp = exp.clone()

    # -- merging ---------------------------------------------------------------------------------
    def merge(self, other: LatentStats) -> LatentStats:
        """Add another accumulator's contexts to this one (exact; returns self)."""
        if (other.d_sae, other.top_k, other.samples, other.bins, other.seed) != (
            self.d_sae,
            self.top_k,
            self.samples,
            self.bins,
            self.seed,
        ):
            raise ValueError("cannot merge LatentStats built with different settings")
        self.tokens += other.tokens
        self.contexts += other.contexts
        self.fire_counts += other.fire_counts
        self.act_sum += other.act_sum
        self.act_max = torch.maximum(self.act_max, other.act_max)
        self.l0_counts += other.l0_counts
        self.top = self.top.merge(other.top)
        self.sample = self.sample.merge(other.sample)
        exp = torch.maximum(self.hist_exp, other.hist_exp)
        self._grow_to(exp)
        self.hist += rebin(other.hist, exp - other.hist_exp)
        return self

    # -- reading the results ---------------------------------------------------------------------
    @property
    def frequency(self) -> Tensor:
        """Fraction of real tokens on which each latent fires."""
        return self.fire_counts.double() / max(self.tokens, 1)

    @property
    def mean_activation(self) -> Tensor:
        """Mean activation over the tokens a latent fires on (0 for a dead latent)."""
        return self.act_sum / self.fire_counts.clamp_min(1).double()

    def histogram(self, latent: int) -> tuple[list[float], list[int]]:
        """(bin edges, counts) of a latent's activations on the tokens it fires on."""
        top = 2.0 ** int(self.hist_exp[latent])
        edges = [top * i / self.bins for i in range(self.bins + 1)]
        return edges, [int(c) for c in self.hist[latent]]

    def quantile_examples(self, latent: int, bands: int = 4, per_band: int = 3) -> list[tuple[float, float, list[int]]]:
        """From the uniform sample of a latent's contexts: per activation-quantile band (lowest
        first), (band's lower quantile, upper quantile, sample slots of up to `per_band` examples
        spread over the band)."""
        slots = self.sample.kept(latent)
        slots.sort(key=lambda j: float(self.sample.value[latent, j]))
        out = []
        n = len(slots)
        for band in range(bands):
            lo, hi = band * n // bands, (band + 1) * n // bands
            chosen = slots[lo:hi]
            if len(chosen) > per_band:
                step = len(chosen) / per_band
                chosen = [chosen[int(i * step + step / 2)] for i in range(per_band)]
            out.append((band / bands, (band + 1) / bands, chosen))
        return out


# -- the decoder's side ----------------------------------------------------------------------------


@torch.no_grad()
def cosine_histogram(directions: Tensor, bins: int = 50, chunk: int = 1024) -> tuple[list[float], list[int]]:
    """(edges over [-1, 1], counts) of the cosine between every pair of distinct decoder directions."""
    w = directions.float() / directions.float().norm(dim=-1, keepdim=True).clamp_min(1e-8)
    counts = torch.zeros(bins, dtype=torch.long)
    n = len(w)
    for start in range(0, n, chunk):
        cos = w[start : start + chunk] @ w.T  # (c, n)
        rows = torch.arange(start, min(start + chunk, n))
        upper = torch.arange(n).unsqueeze(0) > rows.unsqueeze(1)  # each pair once
        idx = ((cos[upper].clamp(-1, 1) + 1) / 2 * bins).long().clamp(0, bins - 1)
        counts += torch.bincount(idx, minlength=bins)
    return [-1 + 2 * i / bins for i in range(bins + 1)], [int(c) for c in counts]


@torch.no_grad()
def most_similar(directions: Tensor, latents: Tensor, n: int = 10) -> tuple[Tensor, Tensor]:
    """For each of `latents`: the n other latents with the highest decoder cosine ((L, n) ids, cosines)."""
    w = directions.float() / directions.float().norm(dim=-1, keepdim=True).clamp_min(1e-8)
    cos = w[latents] @ w.T
    cos[torch.arange(len(latents)), latents] = -math.inf
    top = cos.topk(min(n, len(w) - 1), dim=1)
    return top.indices, top.values


@torch.no_grad()
def logit_effects(directions: Tensor, unembed: Tensor, n: int = 10, chunk: int = 64) -> tuple[Tensor, ...]:
    """Tokens each decoder direction (L, d_in) most promotes and suppresses through the
    unembedding (vocab, d_in): (top ids, top values, bottom ids, bottom values), (L, n) each."""
    unembed = unembed.float()
    parts: list[tuple[Tensor, ...]] = []
    for start in range(0, len(directions), chunk):
        logits = directions[start : start + chunk].float().to(unembed.device) @ unembed.T
        up, down = logits.topk(n, dim=1), logits.topk(n, dim=1, largest=False)
        parts.append((up.indices.cpu(), up.values.cpu(), down.indices.cpu(), down.values.cpu()))
    if not parts:
        empty = torch.zeros(0, n)
        return empty.long(), empty, empty.long(), empty
    return tuple(torch.cat(p) for p in zip(*parts))
