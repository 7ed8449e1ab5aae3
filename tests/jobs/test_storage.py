"""--storage as a URI that Ray Train accepts (file:// here: the other schemes need the network),
and the warning for outputs that would land in Ray's temporary copy of a job's working directory."""

from pathlib import Path

import pytest

from conftest import tiny_args
from saeforge.errors import UserError
from saeforge.jobs.runtime.storage import run_exists, storage_path, temporary_outputs


def test_a_file_uri_storage_holds_the_runs_checkpoints(ray_session, tmp_path):
    from saeforge.core.sae_files import SAE_DIR, load_sae
    from saeforge.jobs.checks import check_new_run_folder
    from saeforge.jobs.runtime.storage import local_checkpoint
    from saeforge.jobs.train.driver import train_on_ray
    from saeforge.jobs.validate import plan_train

    uri = (tmp_path / "shared").as_uri()  # file:///...
    args = tiny_args(tmp_path, tokens=4000, storage=uri, run_name="on-a-uri", checkpoint_every=1000)
    plan, contexts = plan_train(args)
    assert storage_path(uri) == uri and run_exists(uri, "on-a-uri") == ""
    result = train_on_ray(plan, contexts, plan.name)
    checkpoint = local_checkpoint(result.checkpoint)
    assert checkpoint.is_relative_to(tmp_path / "shared" / "on-a-uri")
    assert load_sae(checkpoint / SAE_DIR)[0].cfg.d_sae == 128
    assert run_exists(uri, "on-a-uri") == f"{uri}/on-a-uri"
    with pytest.raises(UserError, match="already exists"):
        check_new_run_folder(args, "on-a-uri")  # the name is taken on the URI storage too


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
