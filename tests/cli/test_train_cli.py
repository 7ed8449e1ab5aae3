"""The command line as a user meets it: --help on every verb, and bad input answered with one
line on stderr and exit code 2, before Ray starts or anything is written."""

import os
import subprocess
import sys

import pytest


def cli(args, cwd, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [sys.executable, "-m", "saeforge.cli", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--variant", "nope"], "unknown variant 'nope' (known: "),
        (["--layer", "42"], "layer 42 is out of range: tiny has 8 layers"),
        (["--model", "./no/such/model"], "cannot read a model"),
        (["--set", "k=abc"], "k expects int"),
        (["--set", "l1_coeff=0.1"], "unknown config field 'l1_coeff'"),
        (["--resume", "/no/such/run"], "cannot resume"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, args, message):
    result = cli(["train", "--model", "tiny", *args], tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("saeforge: error: ") and message in lines[-1]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "saeforge_runs").exists()


def test_dataset_without_tokens_is_rejected(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n   \n")
    result = cli(["train", "--model", "tiny", "--dataset", str(tmp_path / "empty.txt")], tmp_path)
    assert result.returncode == 2 and "yields too few tokens" in result.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_help_on_every_verb(tmp_path, capsys):
    """`saeforge --help` opens with what saeforge does, and lists every verb; each verb has its own
    --help (in this process: one fresh process is enough to show the command runs)."""
    import variants
    from saeforge.cli import VERBS, main

    top = cli(["--help"], tmp_path)
    assert top.returncode == 0 and top.stdout.split("\n\n")[1].startswith("saeforge trains sparse autoencoders")
    assert all(verb in top.stdout for verb in VERBS)
    for verb in VERBS:
        with pytest.raises(SystemExit) as done:
            main([verb, "--help"])
        assert done.value.code == 0 and "usage: saeforge" in capsys.readouterr().out
    assert main(["variants"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in variants.names())
