"""Every evaluation suite end to end on the tiny Gemma with the SAE the tiny training run
produced, in this process and fanned out as Ray tasks."""

import math
from pathlib import Path

import pytest

from conftest import SMALL_SUITES as SMALL
from saeforge.core import eval_suites
from saeforge.core.sae_files import load_sae
from saeforge.jobs.eval import run_suites

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


# -- end to end on the tiny Gemma with a trained SAE ---------------------------------------------


@pytest.fixture(scope="module")
def trained(tiny_run):
    return load_sae(Path(tiny_run["checkpoint"]) / "sae")


def test_every_suite_end_to_end_on_the_tiny_gemma(trained):
    sae, cfg = trained
    lines = []
    results = run_suites(sae, cfg, None, options=SMALL, progress=lines.append)
    assert list(results) == eval_suites.names()
    for name, result in results.items():
        assert result.seconds > 0 and result.headline, name
        for key in result.headline:
            assert math.isfinite(result.metrics[key]), (name, key)
    assert results["core"].metrics["l0"] > 0 and results["core"].metrics["eval_tokens"] > 0
    probing = results["probing"].metrics
    assert {"person_vs_not/llm_acc", "language_es/sae_top_2_acc", "mean/sae_top_1_acc"} <= set(probing)
    assert 0 <= results["disentanglement"].metrics["mean_abs_corr"] <= 1
    grid = results["unlearning"].tables["unlearning grid"]
    assert [(g["n_latents"], g["multiplier"]) for g in grid] == [(2, 10.0), (5, 10.0)]
    assert 0 <= results["unlearning"].metrics["score"] <= 1
    assert 0 <= results["absorption"].metrics["absorption_rate"] <= results["absorption"].metrics["false_negative_rate"]
    assert results["absorption"].metrics["single_token_words"] == 0  # byte tokenizer: words spelled by bytes


def test_suites_fan_out_as_ray_tasks(trained, ray_session):
    sae, cfg = trained
    results = run_suites(
        sae, cfg, "disentanglement", options={"disentanglement": SMALL["disentanglement"]}, use_ray=True
    )
    local = run_suites(sae, cfg, "disentanglement", options={"disentanglement": SMALL["disentanglement"]})
    assert results["disentanglement"].metrics == pytest.approx(local["disentanglement"].metrics, rel=1e-4)
