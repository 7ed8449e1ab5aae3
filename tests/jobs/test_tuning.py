"""A real Ray Tune search on the tiny Gemma: one model pass for every trial, ASHA stopping a bad
trial, a NaN trial reported as failed while the search goes on, parent/child MLflow runs, the best
SAE registered; then `saeforge compare` on what the search left.

Three trials, one at a time, in a fixed order (a grid): 0 trains well, though its process dies
at step 3 (as an out-of-memory kill would end it) and Tune starts it again (--max-failures 1);
1 (lr 1e30) goes NaN at its first step and fails (again on its retry); 2 (lr 1e-7, barely
learns) reaches ASHA's first rung (step 8) after trial 0 has recorded a far better value there,
and is stopped. One at a time makes that order certain (with two at a time, trial 2 could reach
the rung before trial 0 and be kept).
"""

import json
import math
from pathlib import Path

import pytest

from saeforge.errors import UserError

SPACE = """\
variant: relu
objective: {metric: ce_loss_recovered, mode: max, l0_max: 128}
early_stopping: {metric: explained_variance, mode: max, grace_period: 8}
params:
  lr: {sampler: grid, values: [3.0e-3, 1.0e+30, 1.0e-7]}
fixed:
  batch_size: 256
  l1_coeff: 0.01
"""
LAYER = "2"  # a registered model of its own: the champion of this test does not depend on others


def search_args(tmp, **changes):
    from saeforge.jobs.arguments import TuneArgs

    base = {
        "variant": "relu",
        "space": str(tmp / "space.yaml"),
        "samples": 1,
        "max_concurrent": 1,
        "scheduler": "asha",
        "search_alg": "random",
        "tokens_per_trial": 6000,
        "activations": str(tmp / "acts"),
        "model": "tiny",
        "layer": LAYER,
        "d_sae": 128,
        "context_size": 32,
        "eval_contexts": 4,
        "report_every": 4,
        "storage": str(tmp / "runs"),
        "max_failures": 1,  # the first trial's process dies once and is restarted; the NaN trial fails twice
        "precision": "float32",  # as tiny_args: the cache's precision, whatever a CPU probe says
    }
    base.update(changes)
    return TuneArgs(**base)


@pytest.fixture(scope="module")
def search(ray_session, mlflow_store, tmp_path_factory):
    from saeforge.jobs.tune.driver import run_tune

    tmp = tmp_path_factory.mktemp("tune")
    from saeforge.jobs.runtime import faults

    (tmp / "space.yaml").write_text(SPACE)
    with faults.arm(faults.WORKER_STEP, 3, tmp / "trial-exited"):  # the first trial to reach step 3
        summary = run_tune(search_args(tmp), progress=lambda *_: None, verbose=0)
    return summary, tmp


def by_lr(summary):
    return {row["lr"]: row for row in summary["searches"][0]["rows"]}


def test_search_stops_a_bad_trial_reports_a_failed_one_and_registers_the_best(search):
    from mlflow.tracking import MlflowClient

    summary, _ = search
    s = summary["searches"][0]
    rows = by_lr(summary)
    assert s["trials"] == 3 and set(rows) == {3e-3, 1e30, 1e-7}
    assert rows[1e30]["status"] == "failed" and "FloatingPointError: loss is nan" in rows[1e30]["error"]
    # 6000 tokens in steps of 8 contexts of 31 real tokens: 24 steps; ASHA's first rung is step 8
    assert rows[1e-7]["status"] == "early_stopped" and rows[1e-7]["step"] < 24
    good = rows[3e-3]
    assert good["status"] == "completed" and good["step"] == 24 and good["feasible"]
    assert math.isfinite(good["ce_loss_recovered"]) and 1 <= good["l0"] <= 128
    assert s["best"]["trial_id"] == good["trial_id"] and s["pareto"] == [good["trial_id"]]
    client = MlflowClient()
    version = client.get_model_version(s["registered_model"], str(s["version"]))
    assert version.run_id == good["run_id"]  # the registered SAE comes from the best trial's run
    assert s["champion"], s["champion_reason"]
    assert client.get_model_version_by_alias(s["registered_model"], "champion").version == version.version
    assert float(version.tags["ce_loss_recovered"]) == pytest.approx(good["ce_loss_recovered"], abs=1e-5)
    assert len(client.search_model_versions(f"name = '{s['registered_model']}'")) == 1  # only the best


def test_search_leaves_a_parent_run_with_one_child_run_per_trial(search):
    from mlflow.tracking import MlflowClient

    summary, _ = search
    s = summary["searches"][0]
    client = MlflowClient()
    parent = client.get_run(s["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.params["variant"] == "relu"
    assert parent.data.metrics["trials_failed"] == 1 and parent.data.metrics["trials_early_stopped"] == 1
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "search")} == {
        "search/trials.csv",
        "search/trials.json",
        "search/l0_vs_ce_loss_recovered.png",
    }
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    status = {float(c.data.params["sae.lr"]): (c.info.status, c.data.tags["saeforge.status"]) for c in children}
    assert status == {3e-3: ("FINISHED", "completed"), 1e30: ("FAILED", "failed"), 1e-7: ("KILLED", "early_stopped")}
    for child in children:
        assert child.data.params["variant"] == "relu" and child.data.params["sae.batch_size"] == "256"
    good = next(c for c in children if c.data.tags["saeforge.status"] == "completed")
    assert "eval/ce_loss_recovered" in good.data.metrics and "eval/l0" in good.data.metrics
    assert len(client.get_metric_history(good.info.run_id, "loss")) >= 5  # the training curve, every 4 steps
    stopped = next(c for c in children if c.data.tags["saeforge.status"] == "early_stopped")
    assert "eval/ce_loss_recovered" not in stopped.data.metrics
    failed = next(c for c in children if c.data.tags["saeforge.status"] == "failed")
    assert "FloatingPointError" in failed.data.tags["saeforge.error"]


def test_every_trial_reuses_the_searchs_zero_ablation_and_gets_the_figures_of_a_whole_evaluation(search):
    """The zero-ablated losses are computed once per search (a Ray task) and handed to every
    trial: the completed trial's evaluation must equal a whole evaluation of its SAE, zero
    ablation included, run here in the test's own process."""
    from mlflow.tracking import MlflowClient

    from saeforge.core.evaluation import evaluate_core
    from saeforge.core.model import load_model
    from saeforge.core.sae_files import SAE_DIR, load_sae

    summary, tmp = search
    good = by_lr(summary)[3e-3]
    _, plan, contexts = search_plan(tmp)
    sae, _ = load_sae(Path(good["checkpoint_dir"]) / SAE_DIR)
    model, special = load_model(plan.stream.model), list(plan.stream.special_ids)
    whole = evaluate_core(model, sae, plan.hook, contexts.eval, special, precision=plan.stream.precision)
    logged = MlflowClient().get_run(good["run_id"]).data.metrics
    for key in ("ce_loss_zero", "kl_div_zero", "ce_loss_clean", "ce_loss_sae", "ce_loss_recovered", "l0"):
        assert logged[f"eval/{key}"] == pytest.approx(whole[key], rel=1e-5, abs=1e-7), key


def search_plan(tmp, **changes):
    from saeforge.jobs.validate import plan_tune

    args = search_args(tmp, **changes)
    plan, contexts, _ = plan_tune(args)
    return args, plan, contexts


def test_the_model_ran_once_for_all_trials_and_the_cache_is_reused(search):
    from saeforge.core.corpus import valid_mask
    from saeforge.jobs.data.activation_cache import shared_activations

    summary, tmp = search
    acts = summary["activations"]
    args, plan, contexts = search_plan(tmp)
    # every training context went through the model exactly once, though three trials trained on them
    assert acts["source"] == "model" and acts["contexts_forwarded"] == acts["contexts"] == len(contexts.train)
    assert 1 <= acts["producer_batches"] <= len(contexts.train) // 16 + 8  # batches of 16 contexts
    assert acts["tokens"] == valid_mask(contexts.train.pack(), list(plan.stream.special_ids)).sum()
    # a second search with the same --activations reads the cache: no model forward at all
    again = shared_activations(plan, contexts, args.activations, progress=lambda *_: None)
    assert again.source.startswith("cache:") and again.producer_batches == 0 and again.contexts_forwarded == 0
    assert again.tokens == acts["tokens"] and again.dataset.count() == acts["contexts"]
    # a search of another precision, or of more contexts, is refused: the cache holds other activations
    for changes, held in [
        ({"precision": "bfloat16"}, "precision 'float32'"),
        ({"tokens_per_trial": 12000}, "contexts"),
    ]:
        with pytest.raises(UserError, match=f"the cache holds {held}"):
            search_plan(tmp, **changes)


def test_one_pass_serves_variants_of_both_batch_layouts(search):
    """A row of the stream is a whole context: token-layout variants read its real tokens,
    context-layout variants the context and its mask, from the same materialised rows."""
    import variants
    from saeforge.core.batches import sae_input
    from saeforge.jobs.data.activation_cache import shared_activations
    from saeforge.jobs.data.activation_stream import MASK_COLUMN

    summary, tmp = search
    args, plan, contexts = search_plan(tmp, activations="")
    acts = shared_activations(plan, contexts, "", progress=lambda *_: None)
    assert acts.contexts_forwarded == acts.dataset.count() == len(contexts.train)
    batch = next(iter(acts.dataset.iter_torch_batches(batch_size=4)))
    x, mask = batch[plan.hook.name], batch[MASK_COLUMN].bool()
    for layout in ("tokens", "contexts"):
        name = next(n for n in variants.names() if variants.get(n).batch_layout == layout)
        sae = variants.build(name, d_in=64, d_sae=128)
        rows, m = sae_input(sae, x, mask)
        assert (m is None and rows.shape == (int(mask.sum()), 64)) or (m is not None and rows.shape == x.shape)


def test_compare_lists_champions_and_the_search_and_logs_the_plot(search, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from saeforge.cli import main

    summary, _ = search
    s = summary["searches"][0]
    out = tmp_path / "plot.png"
    assert main(["compare", "--search", s["parent_run_id"], "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    champion = next(r for r in result["champions"] if r["name"] == s["registered_model"])
    assert champion["version"] == s["version"] and champion["variant"] == "relu" and champion["alias"] == "champion"
    assert champion["ce_loss_recovered"] == pytest.approx(s["best"]["ce_loss_recovered"], abs=1e-5)
    assert sorted(t["status"] for t in result["trials"]) == ["completed", "early_stopped", "failed"]
    assert out.is_file() and out.stat().st_size > 5000
    assert result["logged_to"] == s["parent_run_id"]
    assert [a.path for a in MlflowClient().list_artifacts(s["parent_run_id"], "compare")] == ["compare/plot.png"]


ONE_TRIAL_SPACE = SPACE.replace("values: [3.0e-3, 1.0e+30, 1.0e-7]", "values: [3.0e-3]")


def test_a_trial_of_one_worker_trains_in_its_own_process_and_one_of_two_fits_a_torchtrainer(search, tmp_path):
    """A one-worker trial skips the worker group's start-up: it trains in the Tune function's
    process, its final checkpoint saved by Tune in the trial's own folder. A trial of two workers
    fits a TorchTrainer, whose checkpoint lies in the trainer's folder under the search's
    `trials/`. Both train every planned step."""
    from mlflow.tracking import MlflowClient

    from saeforge.jobs.tune.driver import run_tune

    summary, _ = search
    in_process = by_lr(summary)[3e-3]
    assert in_process["step"] == 24 and "/trials/" not in in_process["checkpoint_dir"]
    assert Path(in_process["checkpoint_dir"]).parent.name.startswith("run_trial_")  # Tune's trial folder

    (tmp_path / "space.yaml").write_text(ONE_TRIAL_SPACE)
    args = search_args(
        tmp_path, scheduler="fifo", workers=2, layer="7", activations="", report_every=0, tokens_per_trial=2000
    )
    (s,) = run_tune(args, progress=lambda *_: None, verbose=0)["searches"]
    (row,) = s["rows"]
    params = MlflowClient().get_run(row["run_id"]).data.params
    assert row["status"] == "completed" and params["workers"] == "2" and row["step"] == int(params["total_steps"])
    folder = Path(row["checkpoint_dir"])
    assert folder.parent.name == row["trial_id"] and folder.parent.parent.name == "trials"  # the TorchTrainer's


def test_a_one_worker_trial_whose_process_dies_is_restarted_by_tune_in_its_child_run(search):
    """The first trial's process exited at step 3; Tune started the trial again, which trained to
    its last step and ended in the child run it had started before, not a second one."""
    from mlflow.tracking import MlflowClient

    summary, tmp = search
    assert (tmp / "trial-exited").exists()  # the trial's process did die
    good = by_lr(summary)[3e-3]
    assert good["status"] == "completed" and good["step"] == 24, good
    s = summary["searches"][0]
    client = MlflowClient()
    children = client.search_runs(
        [client.get_run(s["parent_run_id"]).info.experiment_id], f"tags.mlflow.parentRunId = '{s['parent_run_id']}'"
    )
    restarted = [c for c in children if c.data.tags["saeforge.trial_id"] == good["trial_id"]]
    assert [c.info.run_id for c in restarted] == [good["run_id"]] and restarted[0].info.status == "FINISHED"
