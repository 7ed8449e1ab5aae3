"""A `saeforge train` or `saeforge tune` stopped by SIGTERM (`ray job stop`, a scheduler, `kill`)
ends its MLflow run KILLED, exits 130 with one line, and leaves no run RUNNING (a study:
test_study.py)."""

import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.ray  # each command starts a private local Ray of its own


def run_rows(db) -> list[tuple[str, str]]:
    """(name, status) of every run, read straight from the SQLite file (no MLflow client: it would
    race the child's creation of the store)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            return list(conn.execute("select name, status from runs"))
    except sqlite3.Error:
        return []


def stopped_by_sigterm(tmp_path, argv: list[str], started) -> tuple[int, str]:
    """Run `saeforge ARGV` in a fresh process on the tiny model with its own store, send SIGTERM
    once `started(rows)` holds (and 3 s more), return (exit code, stderr)."""
    db = tmp_path / "mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    tiny = ["--model", "tiny", "--layer", "3", "--storage", str(tmp_path / "runs")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "saeforge.cli", *argv, *tiny],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 240
        while not started(run_rows(db)):
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "timeout"
            time.sleep(0.5)
        time.sleep(3)  # into Ray Train's (or Tune's) start-up
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in stderr
    ours = [line for line in stderr.splitlines() if line.startswith("saeforge:")]
    assert proc.returncode == 130 and ours[-1] == "saeforge: interrupted", stderr
    # Nothing calls Ray after the exit's shutdown: Ray would start a new local instance from
    # that thread, and say so with this warning.
    assert "SIGTERM handler is not set" not in stderr, stderr
    return proc.returncode, stderr


def test_sigterm_ends_the_run_killed(tmp_path):
    _, stderr = stopped_by_sigterm(
        tmp_path,
        ["train", "--variant", "relu", "--d-sae", "128", "--tokens", "2000000"],
        lambda rows: [status for _, status in rows] == ["RUNNING"],
    )
    assert [status for _, status in run_rows(tmp_path / "mlflow.db")] == ["KILLED"], stderr


def test_sigterm_ends_the_search_killed(tmp_path):
    """The search's parent run ends KILLED, and so does any trial run it had started."""
    _, stderr = stopped_by_sigterm(
        tmp_path,
        ["tune", "--variant", "relu", "--d-sae", "64", "--samples", "4", "--tokens-per-trial", "30000"],
        lambda rows: any(name.startswith("tune-relu-") for name, _ in rows),
    )
    rows = run_rows(tmp_path / "mlflow.db")
    assert [status for name, status in rows if name.startswith("tune-relu-")] == ["KILLED"], (rows, stderr)
    assert all(status != "RUNNING" for _, status in rows), rows
