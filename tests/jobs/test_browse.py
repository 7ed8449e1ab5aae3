"""The browser's activation pass on Ray (two producer actors, statistics merged in the driver)
equals one plain in-process pass over the same held-out contexts: the top contexts of every
latent, their peaks and the firing counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from saeforge.core import corpus
from saeforge.core.eval_suites.context import hook_activations, sae_latents
from saeforge.core.hooks import HookPoint
from saeforge.core.model import ByteTokenizer, load_model, resolve_model
from saeforge.core.sae_files import load_sae
from saeforge.jobs.arguments import BrowseArgs
from saeforge.jobs.browse import run_browse

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread
TOP_K = 4


def test_ray_pass_equals_an_in_process_pass(tiny_run, tmp_path):
    folder = Path(tiny_run["checkpoint"]) / "sae"
    args = BrowseArgs(
        uri=str(folder), out=str(tmp_path / "site"), tokens=2500, latents="0,1,2,3", top_k=TOP_K, producers=2, log=False
    )
    summary = run_browse(args, progress=None)
    stats = summary["stats"]
    assert summary["page_latents"] == [0, 1, 2, 3] and not summary["logged"]

    sae, cfg = load_sae(folder)
    contexts = corpus.pack_contexts(
        corpus.split_texts("wiki", "eval"), ByteTokenizer(), cfg["metadata"]["context_size"], summary["contexts"]
    )
    model = load_model(resolve_model("tiny"), n_layers=4)
    hook = HookPoint.parse(cfg["metadata"]["hook_name"])
    peaks, counts, tokens = [], torch.zeros(sae.cfg.d_sae, dtype=torch.long), 0
    for start in range(0, len(contexts), 16):  # the actors' chunks: the same float results
        ids = torch.from_numpy(contexts[start : start + 16].astype(np.int64))
        mask = corpus.valid_mask(ids, corpus.special_ids(ByteTokenizer()))
        with torch.no_grad():
            _, f = sae_latents(sae, hook_activations(model, hook, ids), mask)
        f = f * mask.unsqueeze(-1)
        peaks.append(f.amax(1))
        counts += (f[mask] > 0).sum(0)
        tokens += int(mask.sum())
    peaks = torch.cat(peaks)  # (contexts, d_sae)
    assert stats.tokens == tokens and torch.equal(stats.fire_counts, counts)
    checked = 0
    for latent in range(sae.cfg.d_sae):
        column = peaks[:, latent]
        order = sorted((i for i in range(len(column)) if column[i] > 0), key=lambda i: (-float(column[i]), i))
        want = order[:TOP_K]
        got = [int(c) for c in stats.top.context[latent] if c >= 0]
        assert torch.allclose(stats.top.value[latent, : len(got)], column[got], rtol=1e-5, atol=1e-6)
        gaps = [float(column[a] - column[b]) for a, b in zip(order, order[1:])][:TOP_K]
        if all(g > 1e-4 for g in gaps):  # no near-tie that the last float bits could flip
            assert got == want, latent
            checked += 1
    assert checked > sae.cfg.d_sae // 2


def test_choosing_the_latents_that_get_pages():
    from saeforge.core.browser.stats import LatentStats
    from saeforge.jobs.browse import choose_pages, parse_latents

    stats = LatentStats(6)
    stats.fire_counts = torch.tensor([5, 0, 9, 1, 0, 9])
    assert parse_latents("frequent") == ("frequent", []) and parse_latents("4, 2,4") == ("list", [4, 2])
    assert choose_pages(stats, "frequent", [], 2, 10, 0) == [2, 5]  # ties: lower id first
    assert choose_pages(stats, "frequent", [], 50, 10, 0) == [2, 5, 0, 3]  # only latents that fired
    assert choose_pages(stats, "all", [], 0, 10, 0) == [0, 2, 3, 5]
    assert choose_pages(stats, "all", [], 0, 3, 0) == [2, 5, 0]  # capped: the most frequent
    random = choose_pages(stats, "random", [], 3, 10, 7)
    assert len(random) == 3 and set(random) <= {0, 2, 3, 5} and random == choose_pages(stats, "random", [], 3, 10, 7)
    assert choose_pages(stats, "list", [4, 1], 0, 10, 0) == [4, 1]
