"""Shared fixtures: one real local Ray per test session, one real MLflow SQLite store, one tiny
trained run that several tests inspect."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def one_thread():
    """Tiny tensors only lose time to a thread pool, badly so on a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("saeforge")


@pytest.fixture(scope="session")
def ray_session():
    """A private local Ray (logical CPUs over-declared: 2 cores host producers and workers)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=True)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_store(session_dir):
    """A real MLflow SQLite store for the session (MLFLOW_TRACKING_URI points at it)."""
    import mlflow

    uri = f"sqlite:///{session_dir / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    yield uri
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def tiny_args(tmp: Path, **changes):
    from saeforge.train_job import TrainArgs

    base = dict(model="tiny", hook="resid_post:3", tokens=12_000, d_sae=128, eval_contexts=8, max_l0=1e9,
                checkpoint_every=5, log_every=5, storage=str(tmp / "runs"), overrides={"batch_size": "512"})
    base.update(changes)
    return TrainArgs(**base)


@pytest.fixture(scope="session")
def tiny_run(ray_session, mlflow_store, session_dir):
    """One real end-to-end run on the tiny Gemma: Ray Data producers -> Ray Train -> MLflow."""
    from saeforge.train_job import run_train

    return run_train(tiny_args(session_dir, run_name="tiny-e2e", eval_suites="disentanglement"),
                     progress=lambda *_: None)
