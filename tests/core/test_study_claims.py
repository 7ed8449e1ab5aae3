"""The study's pure parts on planted numbers: the verdict logic, the unlearning classification,
the L0 search step, the claims table, the groups suite's centroid cosine and the report."""

import math

import pytest
import torch

import variants
from saeforge.core.eval_suites.groups import centroid_cosine, part_labels
from saeforge.core.study import claims as sc
from saeforge.core.study import l0_match
from saeforge.core.study import report as study_report


def test_stat_is_mean_and_sample_standard_deviation():
    s = sc.Stat.of([1.0, 2.0, 3.0, float("nan")])
    assert (s.mean, s.n) == (2.0, 3) and s.spread == pytest.approx(1.0, rel=1e-6)
    assert sc.Stat.of([5.0]).spread == 0.0 and sc.Stat.of([]).n == 0


@pytest.mark.parametrize(
    "variant, baseline, direction, verdict",
    [
        ([0.17, 0.18, 0.16], [0.31, 0.30, 0.32], sc.LOWER, sc.REPRODUCED),  # the claimed drop, far beyond spread
        ([0.35, 0.36, 0.34], [0.31, 0.30, 0.32], sc.LOWER, sc.REVERSED),  # a rise beyond spread
        ([0.30, 0.33, 0.27], [0.31, 0.30, 0.32], sc.LOWER, sc.NOT_REPRODUCED),  # within the spread
        ([0.60, 0.61, 0.59], [0.40, 0.41, 0.39], sc.HIGHER, sc.REPRODUCED),
        ([0.30, 0.31, 0.29], [0.40, 0.41, 0.39], sc.HIGHER, sc.REVERSED),
    ],
)
def test_verdict_on_planted_numbers(variant, baseline, direction, verdict):
    v = sc.compare(sc.Stat.of(variant), sc.Stat.of(baseline), direction)
    assert v.verdict == verdict
    assert v.effect == pytest.approx(sum(variant) / 3 - sum(baseline) / 3, rel=1e-5)
    assert v.relative == pytest.approx(v.effect / (sum(baseline) / 3), rel=1e-5)


def test_a_difference_counts_only_beyond_the_sum_of_the_spreads():
    # spreads 0.01 each (sum 0.02): an effect of 0.019 is within, 0.021 beyond
    base = sc.Stat.of([0.29, 0.30, 0.31])
    assert sc.compare(sc.Stat.of([0.271, 0.281, 0.291]), base, sc.LOWER).verdict == sc.NOT_REPRODUCED
    assert sc.compare(sc.Stat.of([0.269, 0.279, 0.289]), base, sc.LOWER).verdict == sc.REPRODUCED


def test_zero_claim_is_reproduced_only_when_every_seed_scores_zero():
    assert sc.compare(sc.Stat.of([0.0, 0.0, 0.0]), sc.Stat.of([]), sc.ZERO).verdict == sc.REPRODUCED
    v = sc.compare(sc.Stat.of([0.0, 0.02, 0.0]), sc.Stat.of([]), sc.ZERO)
    assert v.verdict == sc.NOT_REPRODUCED and v.effect == pytest.approx(0.02 / 3, rel=1e-5)


def test_unlearning_kind_tells_specific_from_non_specific_damage():
    assert sc.unlearning_kind(0.0, None).kind == "zero"
    specific = sc.unlearning_kind(0.3, {"forget_acc_ratio": 0.7, "retain_acc_ratio": 0.995})
    assert specific.kind == "specific" and specific.forget_drop == pytest.approx(0.3, rel=1e-5)
    damage = sc.unlearning_kind(0.015, {"forget_acc_ratio": 0.985, "retain_acc_ratio": 0.991})
    assert damage.kind == "non-specific" and damage.retain_drop == pytest.approx(0.009, rel=1e-4)


def test_every_study_names_registered_variants_and_its_seed_paper():
    for name, study in sc.STUDIES.items():
        assert study.variant == name and set(study.variants) <= set(variants.names())
        assert study.variants[:2] == (name, sc.PAPER_BASELINE) and set(sc.MODERN_REFERENCES) <= set(study.variants)
    assert [sc.STUDIES[n].seed for n in ("group_ib", "mi_ortho", "cubic_ortho", "contrastive_hier", "hsae")] == [
        "000",
        "001",
        "002",
        "003",
        "004",
    ]
    assert sc.STUDIES["hsae"].baselines[:3] == ("relu", "temporal", "adaptive_mask")


def power_law(factor: float, a: float = 200.0, s: float = 1.7) -> float:
    return a * factor ** (-s)


@pytest.mark.parametrize("target", [8.0, 32.0, 128.0, 900.0])
def test_l0_search_converges_on_a_power_law(target):
    points = [(f, power_law(f)) for f in l0_match.first_factors(3)]
    for _ in range(4):
        if l0_match.matched(l0_match.closest(points, target)[1], target, 0.05):
            break
        f = l0_match.next_factor(points, target)
        points.append((f, power_law(f)))
    assert l0_match.matched(l0_match.closest(points, target)[1], target, 0.05), points


def test_l0_search_moves_the_right_way_from_one_point_and_from_dead_latents():
    assert l0_match.next_factor([(1.0, 100.0)], 10.0) > 1.0  # too dense: a larger penalty
    assert l0_match.next_factor([(1.0, 0.0)], 10.0) < 1.0  # every latent silent: a smaller one
    assert l0_match.next_factor([(1.0, 1e9)], 1.0) == pytest.approx(l0_match.MAX_STEP, rel=1e-6)


def test_matched_is_symmetric_in_log():
    assert l0_match.matched(1.15 * 32, 32, 0.15) and l0_match.matched(32 / 1.15, 32, 0.15)
    assert not l0_match.matched(1.2 * 32, 32, 0.15) and not l0_match.matched(32 / 1.2, 32, 0.15)


def test_centroid_cosine_against_a_hand_computation():
    dirs = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 1])  # centroids (1, 0) and (0.5, 1): cosine 0.5 / sqrt(1.25)
    assert centroid_cosine(dirs, labels) == pytest.approx(0.5 / math.sqrt(1.25), rel=1e-5)


def test_parts_come_from_the_variant_or_contiguous_blocks():
    hsae = variants.build("hsae", d_in=8, d_sae=64)
    kind, labels = part_labels(hsae, 64)
    assert kind == "level" and labels.tolist() == [1] * 32 + [2] * 32
    kind, labels = part_labels(variants.build("relu", d_in=8, d_sae=128), 64)
    assert kind == "block" and labels.bincount().tolist() == [2] * 64


def planted_finals():
    """Two SAEs x one target x three seeds, mi_ortho's correlation planted lower than relu's."""
    out = []
    for variant, corr in (("mi_ortho", (0.17, 0.18, 0.16)), ("relu", (0.31, 0.30, 0.32))):
        for seed, c in enumerate(corr):
            metrics = {"core/l0": 32.0 + seed, "core/ce_loss_recovered": 0.9, "disentanglement/mean_abs_corr": c}
            metrics["unlearning/score"] = 0.0
            job = {"variant": variant, "target": 32.0, "factor": 1.0, "seed": seed}
            levels = [
                {"part": f"level {i}", "latents": 64, "zero_fraction": 0.7 + 0.1 * i + 0.01 * seed} for i in (1, 2)
            ]
            tables = {"groups": {"zero fraction per level": levels}} if variant == "mi_ortho" else {}
            out.append({"job": job, "metrics": metrics, "tables": tables})
    return out


def planted_info(name: str, targets: list[float]) -> dict:
    """The study facts a report states, for planted results (three seeds)."""
    facts = {"model": "tiny", "hook": "h", "d_sae": 128, "tokens": 1000, "contexts": 10}
    facts |= {"activations_source": "model", "contexts_forwarded": 10, "seeds": 3, "tolerance": 0.15}
    return {"name": name, **facts, "targets": targets, "batch_size": 256, "seconds": 60.0}


def test_report_on_planted_results(tmp_path):
    study = sc.STUDIES["mi_ortho"]
    info = planted_info("planted", [32.0])
    report = study_report.build((study,), study.variants, planted_finals(), [], info)
    corr = next(v for v in report["verdicts"] if v["claim"] == "mean_abs_corr" and v["baseline"] == "relu")
    assert corr["verdict"] == sc.REPRODUCED and corr["effect"] == pytest.approx(-0.14, rel=1e-5)
    zero = [v for v in report["verdicts"] if v["claim"] == "unlearning_zero"]
    assert {v["sae"] for v in zero} == {"mi_ortho", "relu"} and {v["verdict"] for v in zero} == {sc.REPRODUCED}
    rows = {r["variant"]: r for r in report["rows"]}
    assert rows["relu"]["core/l0"] == pytest.approx(33.0, rel=1e-6) and rows["relu"]["l0_matched"]
    assert [(p["part"], round(p["zero_fraction"], 6)) for p in report["parts"]] == [
        ("level 1", 0.81),
        ("level 2", 0.91),
    ]
    assert report["parts"][0]["spread"] == pytest.approx(0.01, rel=1e-5)
    paths = study_report.write(report, tmp_path)
    text = paths["report"].read_text()
    assert "| mean_abs_corr | 32 | mi_ortho | relu |" in text and "reproduced" in text
    assert all(p.is_file() and p.stat().st_size > 2000 for p in paths["plots"])


def test_report_with_several_targets_plots_each_variant(tmp_path):
    """Several targets give each variant several points on a plot, sorted by L0 (a real
    three-target study once crashed there, after every SAE had trained)."""
    study = sc.STUDIES["mi_ortho"]
    finals = []
    for target in (128.0, 32.0, 64.0):
        for r in planted_finals():
            job = {**r["job"], "target": target}
            finals.append({**r, "job": job, "metrics": {**r["metrics"], "core/l0": target + job["seed"]}})
    info = planted_info("three-targets", [32.0, 64.0, 128.0])
    report = study_report.build((study,), study.variants, finals, [], info)
    paths = study_report.write(report, tmp_path)
    assert len(paths["plots"]) == 2 and all(p.is_file() and p.stat().st_size > 2000 for p in paths["plots"])
    corr = [v for v in report["verdicts"] if v["claim"] == "mean_abs_corr" and v["baseline"] == "relu"]
    assert sorted(v["target_l0"] for v in corr) == [32.0, 64.0, 128.0]
