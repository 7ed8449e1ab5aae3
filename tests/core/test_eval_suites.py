"""Evaluation suites: planted cases with known answers on the tiny Gemma (end to end with a trained
SAE: tests/jobs/test_evaluate.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import variants
from conftest import SMALL_SUITES as SMALL
from saeforge.core import eval_suites
from saeforge.core.eval_suites.disentanglement import latent_statistics, pair_mutual_information
from saeforge.core.eval_suites.probing import probe_task, top_latents_by_mean_difference
from saeforge.core.eval_suites.runner import build_context
from saeforge.core.eval_suites.unlearning import clamp_edit, next_token_scores, unlearn_texts, unlearning_score
from saeforge.core.hooks import replace
from saeforge.core.sae_files import SaeMeta, sae_cfg
from saeforge.errors import UserError

TINY_META = SaeMeta("tiny", "blocks.3.hook_resid_post", 3, 48, "wiki")


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def relu_sae(d_in: int, d_sae: int) -> variants.Variant:
    return variants.build("relu", d_in=d_in, d_sae=d_sae).eval()


# -- registry ------------------------------------------------------------------------------------


def test_registry_is_the_only_list_of_suites():
    names = eval_suites.names()
    assert eval_suites.parse_suites("all") == names == eval_suites.parse_suites(None)
    assert eval_suites.parse_suites(f" {names[-1]} ,{names[0]}") == [names[-1], names[0]]
    assert set(SMALL) == set(names)  # a new suite must get a small setting here (and so a test)
    with pytest.raises(UserError, match=r"unknown evaluation suite 'nope' \(known: " + ", ".join(names)):
        eval_suites.parse_suites("core,nope")
    assert eval_suites.coerce_option("unlearning", "n_latents", "3,7") == (3, 7)
    with pytest.raises(UserError, match="unknown option 'bogus' for suite 'core'"):
        eval_suites.coerce_option("core", "bogus", "1")
    with pytest.raises(UserError, match="expects int"):
        eval_suites.coerce_option("core", "contexts", "2.5")


# -- planted cases -------------------------------------------------------------------------------


def test_latent_that_is_the_class_direction_probes_as_well_as_the_model():
    rng = np.random.default_rng(0)
    d, n = 16, 600
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, d)) + 2.0 * np.outer(2 * y - 1, u)
    sae = relu_sae(d, 32)
    with torch.no_grad():
        sae.b_dec.zero_()
        sae.W_enc[:, 0] = torch.tensor(u, dtype=torch.float32)
        sae.b_enc[0] = 20.0  # never clipped by the ReLU: latent 0 = <x, u> + 20 exactly
    f = sae.encode(torch.tensor(x, dtype=torch.float32)).detach().numpy()
    np.testing.assert_allclose(f[:, 0], x @ u + 20.0, rtol=1e-4)
    train, test = slice(0, 400), slice(400, None)
    assert top_latents_by_mean_difference(f[train], y[train], 1)[0] == 0
    accs = probe_task(x[train], x[test], f[train], f[test], y[train], y[test], ks=(1, 2))
    assert accs["llm_acc"] > 0.9
    assert accs["sae_top_1_acc"] >= accs["llm_acc"] - 0.03


def test_independent_latents_correlate_near_zero_and_a_duplicate_gives_one():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 8, generator=gen)
    sae = relu_sae(8, 8)
    with torch.no_grad():
        sae.b_dec.zero_()
        sae.b_enc.zero_()
        sae.W_enc.copy_(torch.eye(8))  # latent i = relu(x_i): independent coordinates
    independent = sae.encode(x).detach()
    stats = latent_statistics(independent, n_pairs=4, kde_tokens=400)
    assert stats["mean_abs_corr"] < 0.05
    assert stats["top_pairs_kde_mi_mean"] < 0.1
    with torch.no_grad():
        sae.W_enc[:, 1] = sae.W_enc[:, 0]  # latent 1 duplicates latent 0
    duplicated = sae.encode(x).detach()
    stats = latent_statistics(duplicated[:, :2], n_pairs=1, kde_tokens=400)
    assert stats["mean_abs_corr"] == pytest.approx(1.0, abs=1e-4)
    assert stats["top_pairs_abs_corr_mean"] == pytest.approx(1.0, abs=1e-4)
    assert stats["top_pairs_kde_mi_mean"] > 0.5


@pytest.mark.parametrize("rho, scale", [(0.0, 1.0), (0.6, 3.0), (0.9, 0.05)])
def test_pair_mutual_information_matches_the_gaussian_closed_form(rho, scale):
    """I(X; Y) = -0.5 log(1 - rho^2) whatever the scale (each latent is standardised first)."""
    n, reps = 400, 4
    z = torch.randn(reps, 2, n, generator=torch.Generator().manual_seed(1))
    x = scale * z[:, 0]
    y = scale * (rho * z[:, 0] + math.sqrt(1 - rho**2) * z[:, 1])
    estimate = pair_mutual_information(x, y).mean().item()
    assert estimate == pytest.approx(-0.5 * math.log(1 - rho**2), abs=0.12)


def test_unlearning_score_is_zero_by_construction_when_nothing_qualifies():
    grid = [{"forget_acc": 0.1, "retain_acc": 0.5}, {"forget_acc": 0.4, "retain_acc": 0.99}]
    assert unlearning_score(grid, forget_before=0.4, retain_before=1.0, retain_keep=0.99) == (0.0, grid[1])
    assert unlearning_score(grid[:1], 0.4, 1.0, 0.99) == (0.0, None)
    score, best = unlearning_score(grid + [{"forget_acc": 0.3, "retain_acc": 1.0}], 0.4, 1.0, 0.99)
    assert score == pytest.approx(0.25) and best["forget_acc"] == 0.3


def test_latent_choice_wants_forget_specific_latents():
    from saeforge.core.eval_suites.unlearning import select_latents

    forget = torch.tensor([0.30, 0.20, 0.002, 0.50, 0.0, 0.10])
    retain = torch.tensor([0.00, 0.005, 0.004, 0.20, 0.0, 0.001])
    # 3 fires too often on retain, 2 fires more on retain than on forget, 4 never fires
    assert select_latents(forget, retain, 10, retain_threshold=0.01).tolist() == [0, 1, 5]
    assert select_latents(forget, retain, 2, retain_threshold=0.01).tolist() == [0, 1]


@pytest.fixture(scope="module")
def tiny_model():
    from saeforge.core.model import build_tiny_model

    return build_tiny_model("tiny")


@pytest.fixture
def tiny_ctx(tiny_model):
    """The tiny Gemma with a fresh random ReLU SAE (d_sae 16) on layer 3; tests plant its weights."""
    from saeforge.core.model import ByteTokenizer

    sae = relu_sae(64, 16)
    return build_context(sae, sae_cfg(sae, TINY_META), tiny_model, ByteTokenizer())


def _token_acts(ctx, texts):
    from saeforge.core.corpus import valid_mask
    from saeforge.core.eval_suites.context import hook_activations, pack_texts

    ids = torch.from_numpy(pack_texts(ctx, texts, 64).astype(np.int64))
    return hook_activations(ctx.model, ctx.hook, ids)[valid_mask(ids, ctx.special_ids)]


def test_clamping_a_planted_forget_only_latent_raises_forget_loss_only(tiny_ctx):
    rng = np.random.default_rng(0)

    def spell(letters: str, n: int) -> list[str]:  # n texts of 12 five-letter random words
        return [" ".join("".join(rng.choice(list(letters), 5)) for _ in range(12)) for _ in range(n)]

    texts = {
        "forget_train": spell("zqxjk", 6),
        "forget_test": spell("zqxjk", 4),
        "retain_train": spell("aeiotns", 6),
        "retain_test": spell("aeiotns", 4),
    }
    ctx = tiny_ctx
    forget = _token_acts(ctx, texts["forget_train"] + texts["forget_test"])
    retain = _token_acts(ctx, texts["retain_train"] + texts["retain_test"])
    u = forget.mean(0) - retain.mean(0)
    u /= u.norm()
    sae = ctx.sae
    with torch.no_grad():
        sae.b_dec.zero_()
        sae.W_enc.zero_()
        sae.b_enc.fill_(-1e6)  # every other latent is silent
        sae.W_enc[:, 0] = u
        sae.b_enc[0] = -(retain @ u).max() - 1e-3  # fires on no retain token, by construction
        sae.W_dec[0] = u
    assert ((forget @ u + sae.b_enc[0]) > 0).float().mean() > 0.3  # ...and on many forget tokens
    m = 20 * forget.norm(dim=-1).mean().item()
    result = unlearn_texts(
        ctx,
        texts,
        n_latents=(1,),
        multipliers=(m,),
        retain_threshold=0.0,
        retain_keep=0.99,
        train_contexts=8,
        eval_contexts=8,
        batch_contexts=4,
    )
    (setting,) = result.tables["unlearning grid"]
    assert setting["latents_used"] == 1 and result.metrics["candidate_latents"] == 1
    # The random tiny model predicts almost uniformly (CE near log 259), so even a large edit moves
    # its loss by a few hundredths; the retain side must not move at all.
    assert setting["forget_ce"] > result.metrics["forget_ce_before"] + 0.03
    assert setting["retain_ce"] == pytest.approx(result.metrics["retain_ce_before"], abs=1e-6)
    assert setting["retain_acc"] == result.metrics["retain_acc_before"]
    assert result.metrics["settings_qualifying"] == 1


def test_splice_with_nothing_clamped_leaves_the_model_unchanged(tiny_ctx):
    """The SAE error term is kept: a clamp on latents that never fire changes nothing, even for an
    SAE that reconstructs badly."""
    from saeforge.core.eval_suites.context import heldout_contexts

    ctx = tiny_ctx
    ids = heldout_contexts(ctx, 2)
    clean = next_token_scores(ctx, ids)
    silent = torch.tensor([3, 4])
    with torch.no_grad():
        ctx.sae.b_enc[silent] = -1e6
    assert next_token_scores(ctx, ids, silent, 50.0) == pytest.approx(clean, abs=1e-6)
    from saeforge.core.corpus import valid_mask

    t = torch.from_numpy(ids.astype(np.int64))
    with replace(ctx.model, ctx.hook, clamp_edit(ctx.sae, silent, 50.0, valid_mask(t, ctx.special_ids))):
        spliced = ctx.model(input_ids=t).logits
    torch.testing.assert_close(spliced, ctx.model(input_ids=t).logits)


def test_group_measures_come_from_what_diagnostics_returns(tiny_ctx):
    ctx = tiny_ctx
    plain = eval_suites.get("disentanglement").run(ctx, contexts=2, n_pairs=4, kde_tokens=64)
    assert "group_entropy" not in plain.metrics and "inter_group_correlation" not in plain.metrics

    class Grouped(type(ctx.sae)):
        def diagnostics(self, x, mask=None):
            return {"assignment_entropy": 1.5, "inter_group_correlation": 0.25, "unrelated": 7.0}

    grouped = Grouped(ctx.sae.cfg)
    grouped.load_state_dict(ctx.sae.state_dict())
    ctx_g = build_context(grouped, sae_cfg(ctx.sae, TINY_META), ctx.model, ctx.tokenizer)
    result = eval_suites.get("disentanglement").run(ctx_g, contexts=2, n_pairs=4, kde_tokens=64)
    assert result.metrics["group_entropy"] == 1.5 and result.metrics["inter_group_correlation"] == 0.25
    assert "unrelated" not in result.metrics and "group_entropy" in result.headline


def test_probing_tasks_from_local_files_use_the_datasets_code_path(tiny_ctx, tmp_path):
    """Hub datasets plug in as declarations; here a local JSONL file stands in for one, with a
    nested column read by a dotted path and a constant field, as Europarl is declared."""
    rows = [{"body": {"en": f"sport match {i} goal team win"}, "label": 1} for i in range(60)]
    rows += [{"body": {"en": f"market price {i} bank trade"}, "label": 0} for i in range(60)]
    (tmp_path / "news.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    tasks = [
        {
            "name": "sport_vs_business",
            "dataset": str(tmp_path / "news.jsonl"),
            "text_column": "body.en",
            "label_column": "label",
            "positive": [1],
            "fields": {"source": "local"},
        }
    ]
    (tmp_path / "tasks.json").write_text(json.dumps(tasks))
    from saeforge.core.eval_suites.probing import select_tasks

    (task,) = select_tasks("file", 5, str(tmp_path / "tasks.json"))
    assert all(r["source"] == "local" for r in task.sources[0].records())
    result = eval_suites.get("probing").run(
        tiny_ctx, tasks="file", task_file=str(tmp_path / "tasks.json"), train_size=40, test_size=10, ks=(1,)
    )
    (row,) = result.tables["probing"]
    assert row["task"] == "sport_vs_business" and row["test"] >= 4
    assert row["llm_acc"] > 0.9  # the two classes differ in every word
    with pytest.raises(UserError, match="no probing task matches 'nope'"):
        select_tasks("nope", 5)
