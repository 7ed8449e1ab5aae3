"""`saeforge study` end to end on the tiny Gemma, with a real local Ray, Tune and a SQLite MLflow
store: one model pass for every SAE, L0 matched by the Tune search, the final SAEs at two seeds
as child runs of the study, the report with its tables; and bad inputs refused before Ray.

Small budgets: mi_ortho against relu and topk (`--only`), one target L0 (64 of 128 latents), two
seeds, 6,000 tokens, the suites at their small sizes. Tolerance of the L0 match: 25%.
"""

import math
from pathlib import Path

import pytest

TARGET, TOLERANCE, SEEDS = 64.0, 0.25, 2  # half the latents: the first round's factors reach it
ONLY = ("mi_ortho", "relu", "topk")
FAST = ["lr=3e-3", "l1_coeff=0.004", "kde_tokens=64", "n_candidates=128"]
SUITES = [
    "disentanglement.contexts=4",
    "disentanglement.n_pairs=8",
    "disentanglement.kde_tokens=128",
    "probing.tasks=person_vs_not,language_es",
    "probing.train_size=40",
    "probing.test_size=20",
    "probing.ks=1,5",
    "absorption.max_words=400",
    "absorption.min_words_per_letter=5",
    "unlearning.train_contexts=4",
    "unlearning.eval_contexts=2",
    "unlearning.n_latents=2,5",
    "unlearning.multipliers=10",
]


def study_args(tmp, **changes):
    from saeforge.jobs.arguments import StudyArgs, split_pair

    base = {
        "study": "mi_ortho",
        "only": ",".join(ONLY),
        "targets": f"{TARGET:g}",
        "seeds": SEEDS,
        "tokens": 6000,
        "batch_size": 256,
        "tolerance": TOLERANCE,
        "rounds": 4,
        "model": "tiny",
        "layer": "2",
        "d_sae": 128,
        "context_size": 32,
        "eval_contexts": 4,
        "overrides": [split_pair(p) for p in FAST],
        "eval_options": [split_pair(p) for p in SUITES],
        "storage": str(tmp / "runs"),
        "name": "study-tiny",
        "precision": "float32",  # as tiny_args: the same computation whatever a CPU probe says
    }
    base.update(changes)
    return StudyArgs(**base)


PROGRESS: list[str] = []  # the study's progress lines


@pytest.fixture(scope="module")
def study(ray_session, mlflow_store, tmp_path_factory):
    from saeforge.jobs.study.driver import run_study

    tmp = tmp_path_factory.mktemp("study")
    PROGRESS.clear()
    return run_study(study_args(tmp), progress=PROGRESS.append), tmp


def test_one_model_pass_serves_every_sae(study):
    from saeforge.jobs.validate import plan_study

    summary, tmp = study
    _, _, contexts = plan_study(study_args(tmp))
    acts = summary["activations"]
    # every training context went through the producers exactly once, for every SAE of the study
    assert acts["source"] == "model" and acts["contexts_forwarded"] == acts["contexts"] == len(contexts.train)
    assert 1 <= acts["producer_batches"] <= len(contexts.train) // 16 + 8
    assert len(summary["saes"]) == len(ONLY) * SEEDS and not any(s["error"] for s in summary["saes"])
    assert len(summary["calibration"]) >= 2 * 2  # relu and mi_ortho, two factors each in round 0
    assert all(s["steps"] >= 20 for s in summary["saes"])  # 6000 tokens in steps of 8 contexts of 31
    # one progress line per final SAE as it ends, numbered within its round, with its L0
    finals = [line for line in PROGRESS if line.startswith("  SAE ") and "/" + str(len(summary["saes"])) in line]
    assert len(finals) >= len(summary["saes"]), PROGRESS
    assert {f"  SAE {i}/{len(summary['saes'])}" for i in range(1, len(summary["saes"]) + 1)} <= {
        line.split(" (")[0] for line in finals
    }
    assert all(" L0 " in line for line in finals)


def test_every_sae_is_matched_to_the_target_l0(study):
    from saeforge.core.study.l0_match import matched

    summary, _ = study
    rows = {r["variant"]: r for r in summary["rows"]}
    assert set(rows) == set(ONLY)
    for variant, row in rows.items():
        assert row["seeds"] == SEEDS
        assert matched(row["core/l0"], TARGET, TOLERANCE), (variant, row["core/l0"], summary["calibration"])
        assert row["l0_matched"]
    factors = {f["variant"]: f["factor"] for f in summary["factors"]}
    assert factors["topk"] == 1.0  # k is set to the target, no search
    searched = [c for c in summary["calibration"] if c["variant"] == "relu"]
    assert len({c["factor"] for c in searched}) == len(searched) >= 2  # the search moved the coefficient


def test_the_study_is_a_parent_run_with_one_child_per_sae(study):
    from mlflow.tracking import MlflowClient

    summary, _ = study
    client = MlflowClient()
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["saeforge.kind"] == "study"
    assert parent.data.params["variants"] == ",".join(ONLY) and parent.data.metrics["saes"] == len(ONLY) * SEEDS
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=100
    )
    assert sorted((c.data.tags["saeforge.variant"], c.data.tags["saeforge.seed"]) for c in children) == sorted(
        (v, str(s)) for v in ONLY for s in range(SEEDS)
    )
    assert {c.info.run_id for c in children} == {s["run_id"] for s in summary["saes"]}
    for child in children:
        m = child.data.metrics
        for key in ("core/ce_loss_recovered", "core/l0", "disentanglement/mean_abs_corr", "unlearning/score"):
            assert math.isfinite(m[f"eval/{key}"]), key
        assert "eval/probing/mean/sae_top_5_acc" in m and "eval/absorption/absorption_rate" in m
        assert "eval/unlearning/grid/n5_m10/forget_acc" in m  # the full grid
        # groups and core read the same 4 held-out contexts: zero fraction = 1 - L0 / d_sae
        assert m["eval/groups/zero_fraction"] == pytest.approx(1 - m["eval/core/l0"] / 128, rel=1e-5)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "study")}
    assert {"study/study.md", "study/core_ce_loss_recovered_vs_l0.png", "study/calibration.csv"} <= artifacts


def test_report_has_the_verdicts_the_tables_and_the_unlearning_grid(study):
    summary, _ = study
    text = Path(summary["report"]).read_text()
    for heading in ("## Paper 001: mi_ortho", "### Verdicts", "## Every SAE at matched L0", "## Unlearning"):
        assert heading in text
    corr = [v for v in summary["verdicts"] if v["claim"] == "mean_abs_corr"]
    assert {v["baseline"] for v in corr} == {"relu", "topk"}
    assert all(v["verdict"] in ("reproduced", "not reproduced", "reversed") for v in summary["verdicts"])
    assert len(summary["unlearning"]) == len(ONLY) * SEEDS
    assert "n_latents | multiplier" in text and "0.31 -> 0.17" in text


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"study": "nope"}, "unknown study 'nope'"),
        ({"targets": ""}, "--targets: expected at least one target L0"),
        ({"targets": "32,x"}, "--targets: expected comma-separated numbers"),
        ({"seeds": 0}, "--seeds must be at least 1"),
        ({"only": "gated"}, "--only: gated is not in this study"),
    ],
)
def test_bad_inputs_are_one_line_and_exit_2_before_ray(changes, message, tmp_path, capsys):
    import ray

    from saeforge.cli import main

    argv = ["study", changes.get("study", "mi_ortho"), "--model", "tiny", "--storage", str(tmp_path)]
    for key in ("targets", "seeds", "only"):
        if key in changes:
            argv += [f"--{key}", str(changes[key])]
    was_up = ray.is_initialized()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err
    assert ray.is_initialized() == was_up  # refused before Ray started


def test_an_interrupted_study_ends_killed(ray_session, mlflow_store, tmp_path):
    """Ctrl-C (or SIGTERM, which the drivers turn into the same interrupt) while the study runs:
    its MLflow run ends KILLED, not FAILED or RUNNING, and the interrupt reaches the caller."""
    from mlflow.tracking import MlflowClient

    from saeforge.jobs.study.driver import run_study

    def interrupt_at_the_l0_search(line: str) -> None:
        if "matching L0" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_study(study_args(tmp_path, name="study-interrupted"), progress=interrupt_at_the_l0_search)
    client = MlflowClient()
    experiment = client.get_experiment_by_name("saeforge/tiny/blocks.2.hook_resid_post")
    (run,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'study-interrupted'")
    assert run.info.status == "KILLED"
