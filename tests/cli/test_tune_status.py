"""A `saeforge tune` stopped by SIGTERM ends its search's MLflow run KILLED (and any trial run
it had started), exits 130 with one line, and leaves no run RUNNING: as `saeforge train` does
(test_run_status.py)."""

import os
import signal
import sqlite3
import subprocess
import sys
import time


def run_rows(db) -> list[tuple[str, str]]:
    """(name, status) of every run, read straight from the SQLite file."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            return list(conn.execute("select name, status from runs"))
    except sqlite3.Error:
        return []


def test_sigterm_ends_the_search_killed(tmp_path):
    db = tmp_path / "mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    args = ["--model", "tiny", "--layer", "3", "--variant", "relu", "--d-sae", "64", "--samples", "4"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "saeforge.cli", "tune", *args, "--tokens-per-trial", "30000", "--storage", "runs"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 240
        while not any(name.startswith("tune-relu-") for name, _ in run_rows(db)):
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "timeout"
            time.sleep(0.5)
        time.sleep(3)  # into Tune's start-up
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    rows = run_rows(db)
    assert [status for name, status in rows if name.startswith("tune-relu-")] == ["KILLED"], (rows, stderr)
    assert all(status != "RUNNING" for _, status in rows), rows
    assert proc.returncode == 130 and stderr.strip().splitlines()[-1] == "saeforge: interrupted", stderr
    assert "Traceback" not in stderr
