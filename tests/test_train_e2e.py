"""End to end on the tiny Gemma: real Ray Data producers, real Ray Train workers, a real MLflow
store and registry; then resume, champion rules and user errors."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_args


def test_run_registers_a_champion_with_metrics_and_artifacts(tiny_run, mlflow_store):
    import mlflow
    from mlflow.tracking import MlflowClient

    m = tiny_run["metrics"]
    for key in ("mse", "explained_variance", "cossim", "l0", "l1", "dead_fraction", "dense_fraction",
                "ce_loss_clean", "ce_loss_sae", "ce_loss_zero", "ce_loss_recovered", "kl_div_sae", "mean_abs_corr"):
        assert math.isfinite(m[key]), key
    client = MlflowClient()
    run = client.get_run(tiny_run["run_id"])
    assert run.data.params["variant"] == "relu" and run.data.params["sae.batch_size"] == "512"
    curve = client.get_metric_history(tiny_run["run_id"], "loss/mse")
    assert len(curve) >= 3 and [p.step for p in curve] == sorted(p.step for p in curve)
    assert "eval/ce_loss_recovered" in run.data.metrics
    assert any(k.startswith("eval/disentanglement/") for k in run.data.metrics)  # --eval disentanglement
    files = {a.path for a in client.list_artifacts(tiny_run["run_id"], "sae")}
    assert files == {"sae/cfg.json", "sae/sae_weights.safetensors"}
    assert tiny_run["champion"], tiny_run["champion_reason"]
    name = tiny_run["registered_model"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == str(tiny_run["version"])
    # the registered pyfunc maps raw activations to the SAE's latents
    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    from saeforge.sae_io import load_sae

    sae, _ = load_sae(Path(tiny_run["checkpoint"]) / "final_sae")
    x = np.random.default_rng(0).normal(size=(5, 64)).astype(np.float32) * 10
    np.testing.assert_allclose(pyfunc.predict(x), sae.encode_raw(torch.from_numpy(x)).detach().numpy(), rtol=1e-5)
    artifacts = Path(mlflow_store[len("sqlite:///"):]).parent / "mlartifacts"
    assert artifacts.is_dir()  # artifacts beside the store, not in Ray's session folder


def test_champion_moves_only_for_a_better_score_at_a_sane_l0(tiny_run):
    from mlflow.tracking import MlflowClient

    from saeforge import tracking

    name, sae_dir = tiny_run["registered_model"], Path(tiny_run["checkpoint"]) / "final_sae"
    best = tiny_run["metrics"]["ce_loss_recovered"]
    import mlflow

    with mlflow.start_run(experiment_id=tiny_run["experiment_id"]):
        worse = tracking.log_and_register(sae_dir, 64, 128, name)
        better_but_dense = tracking.log_and_register(sae_dir, 64, 128, name)
    client = MlflowClient()
    moved, _ = tracking.promote_if_better(name, worse, {"ce_loss_recovered": best - 0.5, "l0": 10}, max_l0=32)
    assert not moved
    moved, reason = tracking.promote_if_better(name, better_but_dense, {"ce_loss_recovered": best + 1, "l0": 50},
                                               max_l0=32)
    assert not moved and "sane range" in reason
    assert str(client.get_model_version_by_alias(name, "champion").version) == str(tiny_run["version"])
    moved, _ = tracking.promote_if_better(name, worse, {"ce_loss_recovered": best + 1, "l0": 10}, max_l0=32)
    assert moved and str(client.get_model_version_by_alias(name, "champion").version) == str(worse)


def test_resume_continues_from_a_checkpoint(tiny_run, session_dir):
    from saeforge.train_job import run_train
    from saeforge.train_workers import RUN_INFO_FILE

    run_dir = Path(tiny_run["checkpoint"]).parent
    checkpoints = sorted((p for p in run_dir.glob("checkpoint_*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    assert len(checkpoints) == 2  # num_to_keep
    earlier = checkpoints[0]
    info = json.loads((earlier / RUN_INFO_FILE).read_text())
    assert 0 < info["step"] < info["total_steps"]
    summary = run_train(tiny_args(session_dir, resume=str(earlier)), progress=lambda *_: None)
    final = json.loads((Path(summary["checkpoint"]) / RUN_INFO_FILE).read_text())
    assert final["step"] == info["total_steps"]
    assert summary["run_id"] == tiny_run["run_id"]  # the same MLflow run goes on


def cli(args, cwd, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "saeforge.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["--variant", "nope"], "unknown variant 'nope' (known: "),
    (["--layer", "42"], "layer 42 is out of range: tiny has 8 layers"),
    (["--model", "./no/such/model"], "cannot read a model"),
    (["--set", "l1_coeff=abc"], "l1_coeff expects float"),
    (["--resume", "/no/such/run"], "cannot resume"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, args, message):
    result = cli(["train", "--model", "tiny", *args], tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("saeforge: error: ") and message in lines[-1]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "saeforge_runs").exists()


def test_dataset_without_tokens_is_rejected(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n   \n")
    result = cli(["train", "--model", "tiny", "--dataset", str(tmp_path / "empty.txt")], tmp_path)
    assert result.returncode == 2 and "yields no tokens" in result.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_help_on_every_verb(tmp_path):
    for verb in ("train", "variants", "bench"):
        result = cli([verb, "--help"], tmp_path)
        assert result.returncode == 0 and "usage: saeforge" in result.stdout
    listing = cli(["variants"], tmp_path).stdout
    import variants

    assert all(name in listing for name in variants.names())


def test_two_producers_and_two_ddp_workers(ray_session, session_dir):
    """Data parallelism: two producer actors feed two DDP workers (gloo), which stay in sync."""
    from saeforge.sae_io import load_sae
    from saeforge.train_job import fit, plan_run
    from saeforge.train_workers import RUN_INFO_FILE, SAE_DIR

    plan = plan_run(tiny_args(session_dir, producers=2, workers=2, tokens=8000, run_name="ddp",
                              checkpoint_every=1000))
    result = fit(plan, uri="", run_id="")
    checkpoint = Path(result.checkpoint.path)
    info = json.loads((checkpoint / RUN_INFO_FILE).read_text())
    assert info["step"] == plan.total_steps
    assert info["tokens_seen"] == plan.total_steps * 512  # global count: each rank saw half of every batch
    sae, _ = load_sae(checkpoint / SAE_DIR)
    assert torch.isfinite(sae.W_dec).all()
