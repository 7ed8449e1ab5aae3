"""Shared fixtures: one real local Ray per test session, one real MLflow SQLite store, one tiny
trained run that several tests inspect."""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# A relu SAE that learns something of the tiny random Gemma in 12k tokens (explained variance
# about 0.5): the champion rule needs a faithful SAE, and the defaults are tuned for real models.
TINY_RELU = {"batch_size": "512", "lr": "3e-3", "l1_coeff": "0.004"}
# Small sizes of every evaluation suite: each runs on the tiny model in seconds.
SMALL_SUITES = {
    "core": {"contexts": 4},
    "disentanglement": {"contexts": 4, "n_pairs": 8, "kde_tokens": 128},
    "probing": {"tasks": "person_vs_not,language_es", "train_size": 40, "test_size": 20, "ks": (1, 2)},
    "unlearning": {"train_contexts": 4, "eval_contexts": 2, "n_latents": (2, 5), "multipliers": (10.0,)},
    "absorption": {"max_words": 400, "min_words_per_letter": 5},
    "groups": {"contexts": 4},
}


SESSION_STORE: list[str] = []  # the session's MLflow store, once `mlflow_store` made it


def pytest_configure(config):
    """The fault tests' hook (saeforge.jobs.runtime.faults) gets a folder per pytest process, set
    before any Ray starts: every Ray process of the session, and every process a test starts,
    sees what that process's tests arm, and the other xdist worker's runs do not (pyproject's
    addopts run the suite on two workers, `--dist loadscope`: each test module on one worker,
    each worker with its own session Ray and MLflow store)."""
    os.environ["SAEFORGE_FAULTS"] = tempfile.mkdtemp(prefix="saeforge-faults-")


@pytest.fixture(autouse=True)
def mlflow_points_at_the_session_store():
    """After each test, MLFLOW_TRACKING_URI and MLflow's process-wide tracking URI point at the
    session's store again (once `mlflow_store` made it): a test that unsets or changes either
    (monkeypatch restores the environment as it was before the test, which loses the session
    store when `mlflow_store` was first made inside that test) would otherwise leave later
    tests' MlflowClient() and `use_store()` reading another store."""
    yield
    if SESSION_STORE:
        import mlflow

        os.environ["MLFLOW_TRACKING_URI"] = SESSION_STORE[0]
        mlflow.set_tracking_uri(SESSION_STORE[0])


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
    """One private local Ray for the session, started as saeforge starts it (logical CPUs
    over-declared: 2 cores host producers and workers; the dashboard on localhost for the state
    API that Ray Train's clean-up needs)."""
    import ray

    from saeforge.jobs.runtime.ray_cluster import connect_ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    connect_ray("")
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_store(session_dir):
    """A real MLflow SQLite store for the session (MLFLOW_TRACKING_URI points at it)."""
    import mlflow

    uri = f"sqlite:///{session_dir / 'mlflow.db'}"
    SESSION_STORE.append(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    yield uri
    SESSION_STORE.clear()
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def tiny_args(tmp: Path, **changes):
    from saeforge.jobs.arguments import TrainArgs

    base = {
        "model": "tiny",
        "layer": "3",
        "variant": "relu",
        "tokens": 12_000,
        "d_sae": 128,
        "eval_contexts": 8,
        "max_l0": 1e9,
        "checkpoint_every": 5,
        "log_every": 5,
        "storage": str(tmp / "runs"),
        "overrides": TINY_RELU,
        # fixed, not `auto`: a CPU probe under load could pick bf16 in one process and fp32 in another,
        # and runs compared with each other must compute alike
        "precision": "float32",
    }
    base.update(changes)
    return TrainArgs(**base)


@pytest.fixture(scope="session")
def tiny_run(ray_session, mlflow_store, session_dir):
    """One real end-to-end run on the tiny Gemma: Ray Data producers -> Ray Train -> MLflow."""
    from saeforge.jobs.train.driver import run_train

    return run_train(
        tiny_args(session_dir, run_name="tiny-e2e", eval_suites="disentanglement"), progress=lambda *_: None
    )


def pytest_collection_modifyitems(session, config, items):
    """Every test that needs a local Ray (the `ray_session` fixture, through any other fixture) is
    marked `ray`, as are the tests that start Ray or a Ray head themselves (marked in their
    files): `pytest -m "not ray"` is the fast tier.

    The modules with a Ray test come first, in collection order: the two xdist workers (pyproject's
    `--dist loadscope --no-loadscope-reorder`) take the long modules first and end together on
    the short ones."""
    for item in items:
        if "ray_session" in item.fixturenames:
            item.add_marker(pytest.mark.ray)
    with_ray = {item.path for item in items if item.get_closest_marker("ray") is not None}
    items.sort(key=lambda item: item.path not in with_ray)  # stable: each module's order is kept


@pytest.fixture(autouse=True)
def fast_tier_starts_no_ray(request):
    """A test outside the `ray` tier that leaves Ray running in this process has started it:
    it belongs in the tier (or starts it by mistake, before the input is checked)."""
    import sys

    was_up = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    yield
    if request.node.get_closest_marker("ray") is None and not was_up and "ray" in sys.modules:
        assert not sys.modules["ray"].is_initialized(), "a test outside the `ray` tier started Ray"


def require(available: bool, what: str) -> None:
    """Skip a test whose optional dependency is missing; under CI=true fail instead: CI installs
    SAELens and Chromium, so a missing one there is a broken set-up, not a reason to skip."""
    if available:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what} is missing, and CI=true: CI must install it")
    pytest.skip(f"needs {what}")


# -- crash injection: a forked process that dies at its n-th file operation ----------------------
CRASHED, NOT_A_WRITE = 86, 87


def crash_points():
    """(n, torn) for n = 1, 2, ...: die just before the n-th file operation, or (torn) half-way
    through it when it writes a file."""
    for step in itertools.count(1):
        yield step, False
        yield step, True


def crash_during(action, step: int, torn: bool) -> str:
    """Run `action` in a forked child that dies (os._exit: no `finally`, no clean-up) at its
    `step`-th file operation (a write, flush, rename or removal); with `torn`, a write is done
    and its file cut to half its size first. Returns "crashed", "completed" (the action ended
    before that step) or "skipped" (torn asked of an operation that writes no file)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns
        try:
            _die_at(step, torn)
            action()
        except BaseException:
            os._exit(3)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code in (0, CRASHED, NOT_A_WRITE), f"the child failed (exit {code}) at step {step}"
    return {0: "completed", CRASHED: "crashed", NOT_A_WRITE: "skipped"}[code]


def _die_at(step: int, torn: bool) -> None:
    import pathlib

    import torch

    from saeforge.core import sae_files

    count = [0]

    def wrap(owner, name, written=None):
        real = getattr(owner, name)

        def op(*args, **kwargs):
            count[0] += 1
            if count[0] == step:
                if torn and written is None:
                    os._exit(NOT_A_WRITE)
                if torn:
                    real(*args, **kwargs)
                    path = written(args)
                    os.truncate(path, os.path.getsize(path) // 2)
                os._exit(CRASHED)
            return real(*args, **kwargs)

        setattr(owner, name, op)

    wrap(os, "replace")
    wrap(os, "fsync")
    wrap(shutil, "rmtree")
    wrap(sae_files, "save_file", lambda a: a[1])
    wrap(torch, "save", lambda a: a[1])
    wrap(pathlib.Path, "write_text", lambda a: a[0])
