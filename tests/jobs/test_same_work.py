"""`saeforge bench --same-work`: the plain loop and `saeforge train` really do the same work."""

import json
import subprocess
import sys

import pytest


@pytest.mark.ray  # `saeforge train` starts a private local Ray
def test_same_work_bench_times_two_programs_that_train_the_same_sae(tmp_path):
    """Both programs, each a fresh process, train on the same tokens in the same order from the
    same start: the evaluation of their SAEs agrees, so the wall-time ratio compares like with
    like."""
    done = subprocess.run(
        [sys.executable, "-m", "saeforge.cli", "bench", "--same-work", "--model", "tiny", "--layer", "3",
         "--tokens", "4000", "--d-sae", "128", "--eval-contexts", "4", "--rounds", "1", "--json"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout)
    (r,) = figures["rounds"]
    assert r["plain_wall_s"] > 0 and r["saeforge_wall_s"] > 0
    assert r["ratio"] == pytest.approx(r["plain_wall_s"] / r["saeforge_wall_s"])
    for key, value in r["plain_metrics"].items():
        assert r["saeforge_metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    assert {"plan", "train", "evaluate"} <= set(r["plain_phases"]) and "ray_start" in r["saeforge_phases"]
    assert "| round | plain loop | saeforge train |" in done.stderr  # the table, on stderr under --json


def test_layers_bench_times_one_run_of_every_layer_against_one_run_per_layer(tmp_path):
    """`bench --layers 1,3`: the k-layer command and the k single-layer commands differ only in
    --layer (the same work per SAE, so the same SAEs)."""
    from saeforge.bench.layers import layer_commands
    from saeforge.jobs.arguments import BenchArgs

    args = BenchArgs(model="tiny", layers="1,3", tokens=4000, d_sae=128, eval_contexts=4)
    together, separate = layer_commands(args, tmp_path)
    assert len(separate) == 2
    for command, layer in zip([together, *separate], ["1,3", "1", "3"]):
        at = command.index("--layer")
        assert command[at + 1] == layer
        assert command[:at] + command[at + 2 :] == together[:at] + together[at + 2 :]
    assert together[together.index("--variant") + 1] == "relu" and "--json" in together


def test_the_bench_finds_the_summary_among_other_output():
    """A --json verb's stdout may carry a library's lines before and after the summary."""
    from saeforge.bench.processes import last_json

    summary = {"rounds": [{"wall_s": 1.5}], "nested": {"a": [1, 2]}}
    noise = "{'trial': 'repr, not JSON'}\nTrial finished.\n"
    assert last_json(noise + json.dumps(summary, indent=1) + "\n{'after': 1}\nshutting down\n") == summary
    assert last_json('{"earlier": 1}\n' + json.dumps(summary, indent=1)) == summary
    with pytest.raises(RuntimeError, match="no JSON summary"):
        last_json("nothing here\n{'x': 1}\n")
