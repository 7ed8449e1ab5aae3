"""`ray job submit` against a real local Ray head: the same training runs as a Ray job."""

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.ray  # a Ray head of its own, and Ray jobs on it

BIN = Path(sys.executable).parent


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def wait_for_job_api(url: str, head, tmp_path, seconds: float = 180) -> None:
    """The dashboard answers /api/version before its job module takes submissions (on a loaded
    machine, a submit 10 s after start-up failed before the job existed): wait until it lists jobs."""
    from ray.job_submission import JobSubmissionClient

    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            JobSubmissionClient(url).list_jobs()
            return
        except Exception:  # noqa: BLE001 (any failure here means "not ready yet")
            if head.poll() is not None:
                pytest.fail("ray head exited: " + (tmp_path / "head.log").read_text()[-2000:])
            time.sleep(2)
    pytest.fail("the ray head's job API did not come up")


@pytest.fixture
def ray_head(tmp_path, monkeypatch):
    """A Ray head on 127.0.0.1 with its own temp dir and ports; stopping it stops only it."""
    gcs, dash, client, agent, agent_grpc, metrics, runtime_env, nm, om = free_ports(9)
    # Worker ports below Linux's ephemeral range (32768-60999), where free_ports draws the others:
    # a range inside it once took the object manager's port and the head refused to start.
    base = 20000 + (os.getpid() % 120) * 100
    # A loaded 2-core machine can take minutes between the working-dir upload and the job's start:
    # keep the uploaded package referenced for an hour, not Ray's default 10 minutes.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_RUNTIME_ENV_TEMPORARY_REFERENCE_EXPIRATION_S": "3600"}
    # A Ray started in this process (the session's) leaves its addresses in os.environ; a head
    # and a job that inherit RAY_API_SERVER_ADDRESS talk to that Ray's dashboard instead of their
    # own, and the job's working dir is then missing from its GCS.
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_CLIENT_MODE"):
        env.pop(name, None)
        # and in this process too: Ray's JobSubmissionClient(url) talks to RAY_API_SERVER_ADDRESS
        # when it is set (the session's own Ray sets it), not to the url it is given
        monkeypatch.delenv(name, raising=False)
    temp = Path("/tmp") / f"rayhead{os.getpid()}"  # short: unix socket paths have a length limit
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={runtime_env}",
            f"--node-manager-port={nm}",
            f"--object-manager-port={om}",
            f"--min-worker-port={base}",
            f"--max-worker-port={base + 99}",
            f"--temp-dir={temp}",
            "--num-cpus=8",
        ],
        env=env,
        stdout=open(tmp_path / "head.log", "w"),  # noqa: SIM115 (open while the head runs)
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            break
        except OSError:
            if head.poll() is not None:
                pytest.fail("ray head exited: " + (tmp_path / "head.log").read_text()[-2000:])
            time.sleep(1)
    else:
        pytest.fail("ray head dashboard did not come up")
    wait_for_job_api(url, head, tmp_path)
    yield url, env
    # Every process of the head (GCS, raylet, dashboard, agents, workers) is in the session it was
    # started in: killed at once, where a SIGTERM makes `ray start --block` wait half a minute.
    os.killpg(head.pid, signal.SIGKILL)
    head.wait(timeout=60)
    subprocess.run(["rm", "-rf", str(temp)], check=False)


def submit(url, env, store, submission_id, commands: list[list[str]]):
    """`ray job submit` of saeforge commands run one after the other in one job (the repository as
    the working dir, the test's MLflow store in the job's environment; each command its own
    driver of the job); returns (job status, output)."""
    from ray.job_submission import JobSubmissionClient

    runtime_env = f'{{"env_vars": {{"MLFLOW_TRACKING_URI": "{store}", "RAY_AUTH_MODE": "disabled"}}}}'
    entrypoint = " && ".join(shlex.join([str(BIN / "saeforge"), *argv]) for argv in commands)
    done = subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            url,
            "--working-dir",
            str(REPO),
            "--runtime-env-json",
            runtime_env,
            "--submission-id",
            submission_id,
            "--",
            "sh",
            "-c",
            entrypoint,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
    )
    client, deadline = JobSubmissionClient(url), time.time() + 30
    status = client.get_job_status(submission_id)
    while not status.is_terminal() and time.time() < deadline:  # the head may record the end a moment later
        time.sleep(0.5)
        status = client.get_job_status(submission_id)
    return (
        status,
        done.stdout,
        f"submit exit {done.returncode}: {done.stdout[-3000:]}{done.stderr[-3000:]}",
    )


TINY = ["--model", "tiny", "--variant", "relu", "--layer", "2", "--d-sae", "128", "--eval-contexts", "4"]


def test_train_and_eval_jobs_submitted_to_a_ray_head(ray_head, tmp_path):
    """`ray job submit` of saeforge's commands: one job trains a run and evaluates its champion,
    one command after the other, each a driver of the job on the head. (A search attached to a
    running cluster: test_layers.py.)"""
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobStatus

    url, env = ray_head
    store = f"sqlite:///{tmp_path / 'jobs.db'}"
    name = "tiny__blocks.2.hook_resid_post__relu"
    out = tmp_path / "eval.json"
    train = [
        "train",
        *TINY,
        "--tokens",
        "6000",
        *("--set", "batch_size=512", "--set", "lr=3e-3", "--set", "l1_coeff=0.004"),
        *("--max-l0", "1000000", "--storage", str(tmp_path / "runs")),
    ]
    evaluate = ["eval", f"models:/{name}@champion", "--suite", "core", "--set", "core.contexts=4", "--out", str(out)]
    status, stdout, output = submit(url, env, store, "saeforge-test-jobs", [train, evaluate])
    assert status == JobStatus.SUCCEEDED, output
    assert "registered model" in stdout
    client = MlflowClient(store)
    run_id = client.get_model_version_by_alias(name, "champion").run_id
    assert client.get_run(run_id).data.params["tokens"] == "6000"  # the training run's
    assert "eval/core/ce_loss_recovered" in client.get_run(run_id).data.metrics and out.is_file()
