"""Two drivers sharing one MLflow store (a real SQLite store, real processes): two first runs
creating the experiment together both succeed, and two runs finishing together leave the better
one champion. Also: the workers' curve logging survives a failing store, and printed URIs carry
no credentials."""

import os
import subprocess
import sys
import textwrap

import pytest

# Each racer waits for the other at a file barrier, then does its part at the same moment.
BARRIER = """
import os, sys, time
from pathlib import Path
def barrier(folder, me, other, round_):
    Path(folder, f"{me}.{round_}").touch()
    while not Path(folder, f"{other}.{round_}").exists():
        time.sleep(0.0005)
"""


def race(tmp_path, script: str, roles: tuple[str, str], *args: str) -> list[subprocess.CompletedProcess]:
    """Run `script` as two processes at once (argv: folder, me, other, *args); wait for both."""
    code = BARRIER + textwrap.dedent(script)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path), me, other, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for me, other in (roles, roles[::-1])
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, o, e) for p, (o, e) in zip(procs, outs)]


def test_two_first_runs_create_the_store_and_experiment_together(tmp_path):
    """Both start on a store that does not exist yet: one creates it (migrations) and the
    experiment, the other waits on the lock and finds them; neither fails."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    script = """
    folder, me, other, uri = sys.argv[1:5]
    import mlflow
    from saeforge.jobs.tracking import store
    mlflow.set_tracking_uri(uri)
    barrier(folder, me, other, 0)
    print(store.ensure_experiment("saeforge/tiny/blocks.3.hook_resid_post", uri))
    """
    results = race(tmp_path, script, ("a", "b"), uri)
    for r in results:
        assert r.returncode == 0, r.stderr
    ids = {r.stdout.strip().splitlines()[-1] for r in results}
    assert len(ids) == 1


def test_two_runs_finishing_together_leave_the_better_one_champion(tmp_path):
    """Over 12 rounds, two processes promote a worse and a better version of a fresh registered
    model at the same moment: the better one is champion every time (the compare-and-set runs
    under the store's lock; without it both read 'no champion' and the last writer wins)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from saeforge.jobs.tracking import store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        client = MlflowClient(uri)
        experiment = store.ensure_experiment("race", uri)
        run = client.create_run(experiment)
        rounds = 12
        for r in range(rounds):
            client.create_registered_model(f"race{r}")
            for _ in range(2):  # version 1: the worse SAE, version 2: the better
                client.create_model_version(f"race{r}", f"{run.info.artifact_uri}/sae", run.info.run_id)
        script = """
        folder, me, other, uri, rounds = sys.argv[1:6]
        import mlflow
        from saeforge.jobs.tracking import registry
        mlflow.set_tracking_uri(uri)
        version, score = (1, 0.5) if me == "worse" else (2, 0.9)
        for r in range(int(rounds)):
            barrier(folder, me, other, r)
            moved, reason = registry.promote_if_better(
                f"race{r}", version, {"ce_loss_recovered": score, "explained_variance": 0.8, "l0": 10}, max_l0=100
            )
            print(r, moved, reason, flush=True)
        """
        results = race(tmp_path, script, ("worse", "better"), uri, str(rounds))
        for r in results:
            assert r.returncode == 0, r.stderr
        champions = [str(client.get_model_version_by_alias(f"race{r}", "champion").version) for r in range(rounds)]
        assert champions == ["2"] * rounds, results[0].stdout
    finally:
        mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", ""))


def test_curve_logging_to_a_failing_store_is_counted_not_raised(tmp_path):
    """The worker's curves into a run the store does not have (as when the store refuses every
    call): each failure is counted and the first error kept, nothing raised."""
    from saeforge.jobs.tracking import mlflow_runs, store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store.ensure_experiment("curves", uri)
    curves = mlflow_runs.RunCurves(uri, "no-such-run")
    for step in (5, 10, 15):
        curves.log(step, {"loss": 1.0, "l0": 3.0})
    assert curves.failures == 3 and "no-such-run" in curves.first_error


@pytest.mark.parametrize(
    "uri, shown",
    [
        ("https://alice:s3cret@mlflow.example.com:5000/", "https://***@mlflow.example.com:5000/"),
        ("http://token@10.0.0.1:5000", "http://***@10.0.0.1:5000"),
        ("http://10.0.0.1:5000", "http://10.0.0.1:5000"),
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
        ("s3://AKIAKEY:s3cret@bucket/runs", "s3://***@bucket/runs"),
        (
            "https://acct.blob.core.windows.net/c?sv=2022&sig=ab%2Fc&se=x",
            "https://acct.blob.core.windows.net/c?sv=2022&sig=***&se=x",
        ),
        ("http://h:5000/api?access_token=t0k&page=2", "http://h:5000/api?access_token=***&page=2"),
        ("gs://bucket/runs?generation=1", "gs://bucket/runs?generation=1"),
    ],
)
def test_printed_tracking_uris_carry_no_credentials(uri, shown):
    from saeforge.jobs.tracking import store

    assert store.redact(uri) == shown


def test_params_and_messages_carry_no_credentials():
    """What is logged as a param, and every URI quoted inside an error text, is redacted; other
    values are logged as they are."""
    from saeforge.jobs.tracking import store
    from saeforge.jobs.tracking.mlflow_runs import safe_params

    params = safe_params({"storage": "s3://K:S@bucket/x", "lr": 0.003, "overrides": "['a=1']", "model": "tiny"})
    assert params == {"storage": "s3://***@bucket/x", "lr": "0.003", "overrides": "['a=1']", "model": "tiny"}
    text = "API request to https://u:p@host/api/2.0/x?token=T failed; see 'file:///tmp/a'"
    assert store.redact_text(text) == "API request to https://***@host/api/2.0/x?token=*** failed; see 'file:///tmp/a'"
