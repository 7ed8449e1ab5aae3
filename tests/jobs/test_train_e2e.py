"""End to end on the tiny Gemma: real Ray Data producers, real Ray Train workers, a real MLflow
store and registry; the champion rules; when a run makes its activations first. (Resume:
test_layers.py and test_worker_restarts.py; two producers and two DDP workers:
test_worker_restarts.py.)"""

import math
from pathlib import Path

import numpy as np
import torch


def test_run_registers_a_champion_with_metrics_and_artifacts(tiny_run, mlflow_store):
    import mlflow
    from mlflow.tracking import MlflowClient

    m = tiny_run["metrics"]
    for key in (
        "mse",
        "explained_variance",
        "cossim",
        "l0",
        "l1",
        "dead_fraction",
        "dense_fraction",
        "ce_loss_clean",
        "ce_loss_sae",
        "ce_loss_zero",
        "ce_loss_recovered",
        "kl_div_sae",
        "mean_abs_corr",
    ):
        assert math.isfinite(m[key]), key
    client = MlflowClient()
    run = client.get_run(tiny_run["run_id"])
    assert run.data.params["variant"] == "relu" and run.data.params["sae.batch_size"] == "512"
    curve = client.get_metric_history(tiny_run["run_id"], "loss/mse")
    assert len(curve) >= 3 and [p.step for p in curve] == sorted(p.step for p in curve)
    assert "eval/ce_loss_recovered" in run.data.metrics
    assert any(k.startswith("eval/disentanglement/") for k in run.data.metrics)  # --eval disentanglement
    assert tiny_run["champion"], tiny_run["champion_reason"]
    name = tiny_run["registered_model"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == str(tiny_run["version"])
    # the SAE is logged once, as the registered model's artifact, in the SAELens layout
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@champion"))
    assert {p.name for p in (local / "artifacts" / "sae").iterdir()} == {
        "cfg.json",
        "sae_weights.safetensors",
        "saeforge_state.safetensors",
    }
    assert client.list_artifacts(tiny_run["run_id"], "sae") == []  # not a second copy beside it
    # the registered pyfunc maps raw activations to the SAE's latents
    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    from saeforge.core.sae_files import load_sae

    sae, _ = load_sae(Path(tiny_run["checkpoint"]) / "sae")
    x = np.random.default_rng(0).normal(size=(5, 64)).astype(np.float32) * 10
    np.testing.assert_allclose(pyfunc.predict(x), sae.encode_raw(torch.from_numpy(x)).detach().numpy(), rtol=1e-5)
    # logged as models-from-code (no pickle) with every requirement pinned
    assert (local / "registered_model.py").is_file() and not list(local.rglob("*.pkl"))
    assert "model_code_path" in (local / "MLmodel").read_text()
    requirements = (local / "requirements.txt").read_text().split()
    assert {r.split("==")[0] for r in requirements} >= {"saeforge", "mlflow", "torch", "safetensors", "numpy"}
    assert all("==" in r for r in requirements), requirements
    artifacts = Path(mlflow_store[len("sqlite:///") :]).parent / "mlartifacts"
    assert artifacts.is_dir()  # artifacts beside the store, not in Ray's session folder


def test_champion_moves_only_for_a_good_sae_that_beats_it(tiny_run):
    from mlflow.tracking import MlflowClient

    from saeforge.jobs.tracking import registry

    name, sae_dir = tiny_run["registered_model"], Path(tiny_run["checkpoint"]) / "sae"
    best = tiny_run["metrics"]["ce_loss_recovered"]
    import mlflow

    with mlflow.start_run(experiment_id=tiny_run["experiment_id"]):
        worse = registry.log_and_register(sae_dir, name)
        better_but_dense = registry.log_and_register(sae_dir, name)
    client = MlflowClient()
    good = {"explained_variance": 0.9, "l0": 10}
    moved, reason = registry.promote_if_better(name, worse, {**good, "ce_loss_recovered": best - 0.01}, max_l0=32)
    assert not moved and "does not beat champion" in reason
    moved, reason = registry.promote_if_better(
        name, better_but_dense, {**good, "ce_loss_recovered": best + 1, "l0": 50}, max_l0=32
    )
    assert not moved and reason == "L0 50.0 is outside the sane range [1, 32]"
    # sparse but worse than deleting the activation (the l1 30 run): never a champion
    moved, reason = registry.promote_if_better(
        name, worse, {"ce_loss_recovered": -0.035, "explained_variance": -2.6, "l0": 20}, max_l0=32
    )
    assert not moved and "ce_loss_recovered -0.0350 is not above 0" in reason
    assert "explained variance -2.6000 is not above 0" in reason
    assert str(client.get_model_version_by_alias(name, "champion").version) == str(tiny_run["version"])
    moved, _ = registry.promote_if_better(name, worse, {**good, "ce_loss_recovered": best + 1}, max_l0=32)
    assert moved and str(client.get_model_version_by_alias(name, "champion").version) == str(worse)


def test_stream_auto_produces_first_only_locally_and_when_it_fits(ray_session, monkeypatch):
    from saeforge.jobs.runtime.ray_cluster import produce_first

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    store = ray_session.available_resources()["object_store_memory"]
    assert produce_first("auto", "", int(store / 4))
    assert not produce_first("auto", "", int(store / 2))  # would crowd the object store: stream
    assert not produce_first("auto", "10.0.0.1:6379", 1)  # a cluster: stream
    assert produce_first("off", "10.0.0.1:6379", 10**15) and not produce_first("on", "", 1)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert not produce_first("auto", "", 1)  # inside `ray job submit`
