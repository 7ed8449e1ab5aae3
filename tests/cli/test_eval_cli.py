"""`saeforge eval` on the tiny training run: a registered version by URI, a saved folder, and one-line
errors (exit 2) for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from saeforge.cli import main

FAST = [
    "--suite",
    "core,disentanglement",
    "--set",
    "core.contexts=2",
    "--set",
    "disentanglement.contexts=2",
    "--set",
    "disentanglement.kde_tokens=64",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def test_eval_a_registered_version_logs_to_its_run(tiny_run, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "report.json"
    uri = f"models:/{tiny_run['registered_model']}/{tiny_run['version']}"
    assert main(["eval", uri, *FAST, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ce_loss_recovered" in printed and "mean_abs_corr" in printed and "wall time" in printed
    report = json.loads(out.read_text())
    assert report["run_id"] == tiny_run["run_id"] and set(report["suites"]) == {"core", "disentanglement"}
    assert report["sae"]["variant"] == "relu" and report["sae"]["model_name"] == "tiny"
    core = report["suites"]["core"]["metrics"]
    client = MlflowClient()
    logged = client.get_run(tiny_run["run_id"]).data.metrics
    assert logged["eval/core/ce_loss_recovered"] == pytest.approx(core["ce_loss_recovered"])
    assert "eval/disentanglement/mean_abs_corr" in logged and "eval/core/seconds" in logged
    assert "eval/report.json" in {a.path for a in client.list_artifacts(tiny_run["run_id"], "eval")}


def test_eval_a_saved_folder_logs_only_with_a_run_id(tiny_run, tmp_path, capsys, monkeypatch):
    folder = str(Path(tiny_run["checkpoint"]) / "sae")
    monkeypatch.chdir(tmp_path)
    assert main(["eval", folder, "--suite", "core", "--set", "core.contexts=2"]) == 0
    assert "not logged to MLflow" in capsys.readouterr().out
    assert (tmp_path / "eval_sae.json").is_file()  # the default report name
    assert (
        main(["eval", folder, "--suite", "core", "--set", "core.contexts=2", "--json", "--run-id", tiny_run["run_id"]])
        == 0
    )
    assert json.loads(capsys.readouterr().out)["logged"] is True


@pytest.mark.parametrize(
    "args, message",
    [
        (["./no/such/sae"], "cannot read './no/such/sae'"),
        (["models:/no-such-model/1"], "cannot read 'models:/no-such-model/1'"),
        (["runs:/0123456789abcdef"], "cannot read 'runs:/0123456789abcdef'"),
        (["models:/x"], "use models:/NAME@ALIAS"),
        (["./x", "--suite", "core,nope"], "unknown evaluation suite 'nope' (known: absorption, core,"),
        (["./x", "--set", "probing.bogus=1"], "unknown option 'bogus' for suite 'probing'"),
        (["./x", "--set", "core.contexts=lots"], "core.contexts expects int"),
        (["SAE_FOLDER", "--run-id", "0123456789abcdef"], "cannot log to run '0123456789abcdef'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tiny_run, args, message, capsys):
    folder = str(Path(tiny_run["checkpoint"]) / "sae")
    assert main(["eval", *[folder if a == "SAE_FOLDER" else a for a in args]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("saeforge: error: ") and message in err[0]


def test_bad_input_from_the_command_line_leaves_nothing_behind(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    result = subprocess.run(
        [sys.executable, "-m", "saeforge.cli", "eval", "models:/anything@champion"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no MLflow store" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "mlflow.db").exists()  # no empty store created as a side effect


def test_eval_a_run_reads_the_sae_it_logged(tiny_run, tmp_path, capsys):
    out = tmp_path / "run.json"
    assert (
        main(
            [
                "eval",
                f"runs:/{tiny_run['run_id']}",
                "--suite",
                "core",
                "--set",
                "core.contexts=2",
                "--out",
                str(out),
                "--no-log",
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert report["run_id"] == tiny_run["run_id"]
    assert "not logged to MLflow (--no-log)" in capsys.readouterr().out
    assert report["suites"]["core"]["metrics"]["eval_tokens"] > 0
