"""A `saeforge train` stopped by SIGTERM (`ray job stop`, a scheduler, `kill`) ends its MLflow
run KILLED, exits 130 with one line, and leaves no run RUNNING."""

import os
import signal
import sqlite3
import subprocess
import sys
import time


def run_statuses(db) -> list[str]:
    """The runs' statuses, read straight from the SQLite file (no MLflow client: it would race
    the child's creation of the store)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            return [row[0] for row in conn.execute("select status from runs")]
    except sqlite3.Error:
        return []


def test_sigterm_ends_the_run_killed(tmp_path):
    db = tmp_path / "mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    args = ["--model", "tiny", "--layer", "3", "--variant", "relu", "--d-sae", "128", "--tokens", "2000000"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "saeforge.cli", "train", *args, "--storage", str(tmp_path / "runs")],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 240
        while run_statuses(db) != ["RUNNING"]:
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "timeout"
            time.sleep(0.5)
        time.sleep(3)  # into Ray Train's start-up
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert run_statuses(db) == ["KILLED"], stderr
    assert proc.returncode == 130 and stderr.strip().splitlines()[-1] == "saeforge: interrupted", stderr
    assert "Traceback" not in stderr
