"""The feature browser's bookkeeping is exact: a planted latent's top contexts, windows and
histogram match a brute-force computation, and merging accumulators (as producer actors do) in
any split and order gives the same result as one pass."""

from __future__ import annotations

import math

import pytest
import torch

from saeforge.core.browser.stats import (
    WINDOW_AFTER,
    WINDOW_BEFORE,
    LatentStats,
    cosine_histogram,
    logit_effects,
    most_similar,
    sample_keys,
)

B, T, D = 24, 16, 6  # contexts, tokens per context, latents
PLANTED = 2


def planted_batch(seed: int = 0):
    """Random sparse latents with latent PLANTED firing only in contexts 3, 7, 11 and 19, at known
    peaks (19 highest, then 7, 3, 11); BOS (position 0) masked out and carrying a decoy value."""
    gen = torch.Generator().manual_seed(seed)
    f = torch.relu(torch.randn(B, T, D, generator=gen) - 1.0)
    f[:, :, PLANTED] = 0
    for ctx, pos, value in ((3, 5, 4.0), (7, 0, 99.0), (7, 9, 6.0), (11, 15, 2.5), (19, 1, 8.0)):
        f[ctx, pos, PLANTED] = value
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, 0] = False  # BOS: the 99 at (7, 0) must never count
    return f, mask, torch.arange(B) + 100  # context ids need not start at 0


def one_pass(f, mask, ids, **kw) -> LatentStats:
    stats = LatentStats(D, **kw)
    stats.update(f, mask, ids)
    return stats


def test_planted_latent_top_contexts_windows_and_counts():
    f, mask, ids = planted_batch()
    stats = LatentStats(D, top_k=3, samples=8)
    for start in range(0, B, 5):  # uneven batches
        stats.update(f[start : start + 5], mask[start : start + 5], ids[start : start + 5])
    slots = stats.top.kept(PLANTED)
    assert [int(stats.top.context[PLANTED, j]) for j in slots] == [119, 107, 103]
    assert [float(stats.top.value[PLANTED, j]) for j in slots] == [8.0, 6.0, 4.0]
    assert [int(stats.top.peak[PLANTED, j]) for j in slots] == [1, 9, 5]
    window = stats.top.window[PLANTED, slots[1]]  # context 107, peak at 9
    expect = torch.full((WINDOW_BEFORE + 1 + WINDOW_AFTER,), math.nan)
    lo = WINDOW_BEFORE - 9
    expect[lo : lo + T] = (f[7, :, PLANTED] * mask[7])[: len(expect) - lo]
    assert torch.equal(torch.nan_to_num(window, -1.0), torch.nan_to_num(expect, -1.0))
    assert stats.tokens == int(mask.sum()) and stats.contexts == B
    assert int(stats.fire_counts[PLANTED]) == 4 and float(stats.act_max[PLANTED]) == 8.0
    real = f[mask]
    assert torch.equal(stats.fire_counts, (real > 0).sum(0))
    assert torch.equal(stats.l0_counts, torch.bincount((real > 0).sum(1), minlength=D + 1))
    assert stats.frequency[PLANTED] == pytest.approx(4 / int(mask.sum()))


def test_histogram_is_exact_on_its_final_edges():
    f, mask, ids = planted_batch(1)
    stats = LatentStats(D, bins=16)
    for start in range(0, B, 4):
        stats.update(f[start : start + 4], mask[start : start + 4], ids[start : start + 4])
    real = f[mask]
    for latent in range(D):
        edges, counts = stats.histogram(latent)
        values = real[:, latent][real[:, latent] > 0]
        assert sum(counts) == len(values) and edges[-1] > float(values.max())
        brute = [int(((values >= lo) & (values < hi)).sum()) for lo, hi in zip(edges, edges[1:])]
        assert counts == brute


def test_merging_in_any_split_and_order_equals_one_pass():
    f, mask, ids = planted_batch(2)
    whole = one_pass(f, mask, ids, top_k=4, samples=5)
    parts = [one_pass(f[s : s + 7], mask[s : s + 7], ids[s : s + 7], top_k=4, samples=5) for s in range(0, B, 7)]
    merged = parts[3]
    for part in (parts[1], parts[0], parts[2]):
        merged.merge(part)
    for name in ("fire_counts", "l0_counts", "hist", "hist_exp", "act_max"):
        assert torch.equal(getattr(merged, name), getattr(whole, name)), name
    assert torch.allclose(merged.act_sum, whole.act_sum)
    for part in ("top", "sample"):
        a, b = getattr(merged, part), getattr(whole, part)
        assert torch.equal(a.context, b.context) and torch.equal(a.value, b.value) and torch.equal(a.peak, b.peak)
        assert torch.equal(torch.nan_to_num(a.window, -1.0), torch.nan_to_num(b.window, -1.0))


def test_ties_break_by_context_id_and_sample_is_the_smallest_keys():
    f = torch.zeros(6, 4, 1)
    f[:, 2, 0] = 1.0  # every context ties
    mask = torch.ones(6, 4, dtype=torch.bool)
    ids = torch.tensor([5, 3, 9, 1, 7, 2])
    stats = LatentStats(1, top_k=3, samples=2)
    stats.update(f[:3], mask[:3], ids[:3])
    stats.update(f[3:], mask[3:], ids[3:])
    assert stats.top.context[0].tolist() == [1, 2, 3]
    keys = sample_keys(ids, torch.arange(1), 0)[:, 0]
    assert sorted(stats.sample.context[0].tolist()) == sorted(ids[keys.argsort()[:2]].tolist())


def test_memory_does_not_grow_with_tokens():
    f, mask, ids = planted_batch()
    stats = LatentStats(D, top_k=3, samples=4)
    sizes = []
    for rep in range(3):
        stats.update(f, mask, ids + rep * B)
        sizes.append(sum(t.numel() for t in (stats.top.window, stats.sample.window, stats.hist)))
    assert sizes[0] == sizes[-1]


def test_quantile_bands_cover_the_sample_lowest_first():
    f, mask, ids = planted_batch(3)
    stats = one_pass(f, mask, ids, samples=16)
    latent = 0
    bands = stats.quantile_examples(latent, bands=4, per_band=2)
    values = [[float(stats.sample.value[latent, j]) for j in slots] for _, _, slots in bands]
    flat = [v for band in values for v in band]
    assert len(bands) == 4 and all(len(v) <= 2 for v in values) and flat == sorted(flat)


def test_decoder_side_measures():
    directions = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [-1.0, 0.0]])
    edges, counts = cosine_histogram(directions, bins=4)
    assert sum(counts) == 6 and edges[0] == -1 and edges[-1] == 1
    assert counts == [2, 0, 2, 2]  # cosines -1, -0.71 | none | 0, 0 | 0.71, 0.71
    ids, cos = most_similar(directions, torch.tensor([0]), n=2)
    assert ids[0].tolist() == [2, 1] and cos[0, 0] == pytest.approx(math.sqrt(0.5))
    unembed = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    up, upv, down, downv = logit_effects(directions[:1], unembed, n=1)
    assert up.tolist() == [[0]] and down.tolist() == [[2]] and upv.item() == 1.0 and downv.item() == -1.0
