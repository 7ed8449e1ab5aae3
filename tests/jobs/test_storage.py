"""The warning for outputs that would land in Ray's temporary copy of a job's working directory
(a run on a URI storage: test_run_faults.py)."""

from pathlib import Path

from conftest import tiny_args
from saeforge.jobs.runtime.storage import temporary_outputs


def test_outputs_inside_a_ray_jobs_temporary_working_dir_are_named(tmp_path, monkeypatch):
    job_dir = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    job_dir.mkdir(parents=True)
    sqlite_here = f"sqlite:///{job_dir / 'mlflow.db'}"
    assert temporary_outputs("saeforge_runs", sqlite_here, cwd=str(job_dir)) == [
        "--storage saeforge_runs",
        f"the MLflow store {sqlite_here} and its artifacts",
    ]
    assert temporary_outputs("s3://bucket/runs", "http://mlflow:5000", cwd=str(job_dir)) == []
    assert temporary_outputs(str(tmp_path / "shared"), "http://mlflow:5000", cwd=str(job_dir)) == []
    assert temporary_outputs("saeforge_runs", sqlite_here, cwd=str(tmp_path)) == []  # an ordinary folder

    from saeforge.jobs.validate import plan_train

    monkeypatch.chdir(job_dir)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    lines = []
    plan_train(tiny_args(Path("."), tokens=4000), progress=lines.append)
    warning = next(line for line in lines if "temporary copy" in line)
    assert warning.startswith("saeforge: warning:") and "--storage runs" in warning and "mlflow.db" in warning
