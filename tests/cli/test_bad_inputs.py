"""Every bad input is answered with one line on stderr and exit code 2, before Ray starts or
anything is written (the folder the command runs in is left exactly as it was), and the
silently-wrong ones are refused or warned about. In-process through `saeforge.cli.main` on the
tiny model: no Ray, seconds per input. The drivers' `connect_ray` is replaced by a tripwire so
that a check moved after Ray's start fails here loudly."""

import json
import socket

import pytest

import variants
from conftest import tiny_args
from saeforge.cli import main
from saeforge.core.sae_files import SaeMeta, save_sae
from saeforge.core.training import LoopState
from saeforge.jobs.train import checkpoints

TRAIN = ["train", "--model", "tiny", "--layer", "3"]


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def refused(tmp_path, monkeypatch, capsys):
    """Run the CLI in an empty folder; assert exit 2, one error line containing `message`, no
    traceback, and nothing written; return the error line."""
    from saeforge.jobs.runtime import ray_cluster

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def tripwire(*_):
        raise AssertionError("Ray was started before the input was checked")

    monkeypatch.setattr(ray_cluster, "connect_ray", tripwire)  # what train, tune and study connect with

    def check(argv, message, env=None):
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        before = sorted(tmp_path.rglob("*"))
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        line = err.strip().splitlines()[-1]
        assert line.startswith("saeforge: error: ") and message in line, err
        assert "Traceback" not in err
        assert sorted(tmp_path.rglob("*")) == before  # no mlflow.db, no saeforge_runs, nothing
        return line

    return check


@pytest.mark.parametrize(
    "argv",
    [
        [*TRAIN, "--run-name", "../escaped"],
        [*TRAIN, "--run-name", "a/b"],
        [*TRAIN, "--run-name", ".."],
        [*TRAIN, "--run-name", "two\nlines"],
        ["tune", "--model", "tiny", "--variant", "relu", "--name", "/abs"],
        ["study", "mi_ortho", "--model", "tiny", "--name", "..\\up"],
    ],
)
def test_a_name_is_one_folder_under_storage(refused, argv):
    """Run, search and study names become folders under --storage: one path component each."""
    refused(argv, "a name is one folder under --storage")


def test_credentials_in_an_error_are_not_printed(refused):
    """An error that quotes a URI shows it redacted: no user:password, no secret query values."""
    line = refused([*TRAIN, "--resume", "s3://KEY:SECRET@bucket/run?X-Amz-Signature=abc&region=eu"], "cannot resume")
    assert "KEY" not in line and "SECRET" not in line and "abc" not in line
    assert "s3://***@bucket/run?X-Amz-Signature=***&region=eu" in line


def test_batch_size_0(refused):
    refused([*TRAIN, "--set", "batch_size=0"], "batch_size must be at least 1, got 0")


def test_log_every_0(refused):
    refused([*TRAIN, "--log-every", "0"], "--log-every must be at least 1, got 0")


def test_tokens_below_one_step(refused):
    refused([*TRAIN, "--tokens", "100"], "--tokens 100 is less than one optimiser step")


def test_unknown_optimizer(refused):
    refused([*TRAIN, "--set", "optimizer=sgd"], "optimizer must be one of adam, adamw, got 'sgd'")


def test_negative_max_failures(refused):
    refused([*TRAIN, "--max-failures", "-1"], "--max-failures must be at least 0, got -1")


def test_negative_max_failures_in_a_search(refused):
    refused(
        ["tune", "--model", "tiny", "--layer", "3", "--max-failures", "-2"], "--max-failures must be at least 0, got -2"
    )


def test_max_failures_that_is_not_a_number(capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*TRAIN, "--max-failures", "many"])
    assert exit_.value.code == 2 and "--max-failures: invalid int value: 'many'" in capsys.readouterr().err


def test_negative_d_sae(refused):
    refused([*TRAIN, "--d-sae", "-8"], "--d-sae must be at least 0, got -8")


@pytest.mark.parametrize(
    "pair, message",
    [
        ("lr=nan", "lr must be a finite number, got nan"),
        ("aux_coeff=inf", "aux_coeff must be a finite number, got inf"),
        ("aux_coeff=-0.1", "aux_coeff weights the auxk term: it must be at least 0, got -0.1"),
    ],
)
def test_a_weight_or_rate_that_is_not_a_finite_non_negative_number(refused, pair, message):
    refused([*TRAIN, "--set", pair], message)


def test_a_context_longer_than_the_models_positions(refused):
    refused([*TRAIN, "--context-size", "131073"], "--context-size 131073 is beyond tiny's 131072 positions")


def test_more_workers_than_a_local_ray_has_cpus(refused):
    from saeforge.jobs.runtime.ray_cluster import local_cpus

    refused([*TRAIN, "--workers", str(local_cpus())], f"ask for {local_cpus() + 1} CPUs; a local Ray on this machine")


def test_zero_learning_rate(refused):
    refused([*TRAIN, "--set", "lr=0"], "lr must be above 0")


def test_a_model_that_is_not_a_gemma(refused, tmp_path):
    """`--model gpt2` offline: a local folder holding GPT-2's config (no Gemma layout to hook)."""
    from transformers import GPT2Config

    GPT2Config(n_layer=4).save_pretrained(tmp_path / "gpt2")
    refused(["train", "--model", str(tmp_path / "gpt2"), "--layer", "1"], "is a gpt2 model: saeforge reads Gemma")


def test_a_local_model_without_a_tokenizer(refused, tmp_path):
    from saeforge.core.model import _tiny_config

    _tiny_config("tiny").save_pretrained(tmp_path / "gemma")  # config.json only
    refused(["train", "--model", str(tmp_path / "gemma"), "--layer", "3"], "cannot load the tokenizer of model")


def test_an_unreachable_ray_address(refused):
    port = closed_port()
    refused([*TRAIN, "--address", f"127.0.0.1:{port}"], f"cannot reach the Ray cluster at 127.0.0.1:{port}")


def test_an_unreachable_ray_address_from_the_environment(refused):
    port = closed_port()
    refused(TRAIN, "cannot reach the Ray cluster", env={"RAY_ADDRESS": f"ray://127.0.0.1:{port}"})


def test_an_unreachable_tracking_server_is_named_without_its_credentials(refused):
    port = closed_port()
    uri = f"http://alice:s3cret@127.0.0.1:{port}"
    line = refused(
        TRAIN, "cannot reach the MLflow tracking server at http://***@127.0.0.1", env={"MLFLOW_TRACKING_URI": uri}
    )
    assert "s3cret" not in line and "alice" not in line


def test_a_sqlite_store_in_a_missing_folder(refused, tmp_path):
    uri = f"sqlite:///{tmp_path}/no/such/folder/mlflow.db"
    refused(TRAIN, "does not exist", env={"MLFLOW_TRACKING_URI": uri})


def test_a_text_column_holding_non_strings(refused, tmp_path):
    path = tmp_path / "numbers.jsonl"
    path.write_text("".join(json.dumps({"text": i}) + "\n" for i in range(50)))
    refused([*TRAIN, "--dataset", str(path)], "column 'text' holds int values, not text")


def test_eval_of_an_sae_whose_width_does_not_match_the_model(refused, tmp_path):
    sae = variants.build("relu", d_in=16, d_sae=32)
    folder = save_sae(sae, tmp_path / "sae16", SaeMeta("tiny", "blocks.3.hook_resid_post", 3, 16, "wiki"))
    refused(
        ["eval", str(folder), "--model", "tiny", "--no-log"],
        "reads activations of width 16, but model 'tiny' has width 64",
    )


def test_lr_schedule_linear(refused):
    refused([*TRAIN, "--set", "lr_schedule=linear"], "lr_schedule must be one of constant, cosine, decay, got 'linear'")


def test_topk_k_0(refused):
    refused([*TRAIN, "--variant", "topk", "--set", "k=0"], "k must be in 1..d_sae (512), got 0")


def test_topk_k_above_d_sae(refused):
    refused([*TRAIN, "--variant", "topk", "--d-sae", "128", "--set", "k=129"], "k must be in 1..d_sae (128), got 129")


def saved_checkpoint(tmp_path):
    """A complete checkpoint of a run started with tiny_args (its run.json holds them)."""
    folder = tmp_path / "runs" / "old-run" / "checkpoint_000000"
    sae = variants.build("relu", d_in=64, d_sae=128)
    info = checkpoints.run_info(tiny_args(tmp_path), "run-id", total_steps=20)
    meta = SaeMeta("tiny", "blocks.3.hook_resid_post", 3, 128, "wiki")
    checkpoints.save_checkpoint(folder, [(sae, LoopState(5, 500), meta)], info)
    return folder


def test_resume_with_flags_that_would_be_ignored(refused, tmp_path):
    folder = saved_checkpoint(tmp_path)
    refused(
        ["train", "--resume", str(folder), "--tokens", "5000", "--variant", "topk"],
        "--resume continues a run with its own arguments; drop --tokens 5000 (the run has 12000)",
    )


def test_a_resumed_run_takes_this_invocations_max_failures(tmp_path):
    """--max-failures is how many crashes this invocation survives, not part of the run: a
    resumed run may change it (and gets the default when it is not given)."""
    from saeforge.jobs.arguments import DEFAULT_MAX_FAILURES, TrainArgs
    from saeforge.jobs.validate import resumed_train_args

    folder = saved_checkpoint(tmp_path)
    args, _ = resumed_train_args(TrainArgs(resume=str(folder), max_failures=7))
    assert args.max_failures == 7 and args.tokens == 12_000  # the rest is the run's own
    args, _ = resumed_train_args(TrainArgs(resume=str(folder)))
    assert args.max_failures == DEFAULT_MAX_FAILURES


def test_an_explicit_run_name_whose_folder_exists(refused, tmp_path):
    (tmp_path / "saeforge_runs" / "mine" / "checkpoint_000000").mkdir(parents=True)
    refused([*TRAIN, "--run-name", "mine"], "--run-name mine: ")


def test_a_resume_target_that_is_half_written(refused, tmp_path):
    folder = saved_checkpoint(tmp_path)
    (folder / checkpoints.COMPLETE_FILE).unlink()
    refused(["train", "--resume", str(folder)], "the checkpoint is incomplete")


def test_tokens_beyond_the_corpus_are_warned_about(tmp_path):
    """Not an error: the run trains on what the corpus holds, and says so before it starts."""
    from saeforge.jobs.validate import plan_train

    (tmp_path / "small.txt").write_text("".join(f"document number {i} about nothing much\n" for i in range(300)))
    said = []
    plan, _ = plan_train(tiny_args(tmp_path, dataset=str(tmp_path / "small.txt"), tokens=10**7), said.append)
    assert any("training" in line and "instead of" in line and "--tokens 10000000" in line for line in said), said


def test_default_run_names_never_collide():
    """Two runs started in the same second get different names (and so different folders)."""
    from saeforge.core.hooks import HookPoint
    from saeforge.jobs.arguments import TrainArgs
    from saeforge.jobs.validate import run_name

    names = {run_name(TrainArgs(), HookPoint(6, "resid_post")) for _ in range(20)}
    assert len(names) == 20


def test_gpus_per_worker_not_a_number(refused):
    refused([*TRAIN, "--gpus-per-worker", "many"], "--gpus-per-worker must be 'auto' or a number of GPUs")


def test_gpus_asked_for_on_a_machine_without_any(refused):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    refused([*TRAIN, "--gpus-per-producer", "1"], "--gpus-per-producer 1 asks for GPUs, but this machine has none")


def test_a_custom_resource_amount_that_is_not_a_number(refused):
    refused([*TRAIN, "--worker-resources", "trainer=lots"], "--worker-resources trainer: the amount must be a number")


def test_gpus_named_as_a_custom_resource(refused):
    refused([*TRAIN, "--producer-resources", "GPU=1"], "--producer-resources: 'GPU' is not a custom resource name")


def test_custom_resources_without_a_cluster(refused):
    """No node of a private local Ray has them: the actors would wait for ever."""
    refused([*TRAIN, "--producer-resources", "producer=1"], "which only the nodes of a cluster offer")


def test_a_layer_listed_twice(refused):
    refused(["train", "--model", "tiny", "--layer", "1,3,1"], "--layer 1,3,1: layer 1 is listed twice")


def test_a_layer_out_of_range_in_a_list(refused):
    refused(["train", "--model", "tiny", "--layer", "1,9"], "layer 9 is out of range: tiny has 8 layers (0-7)")


def test_a_layer_listed_twice_in_a_search(refused):
    refused(["tune", "--model", "tiny", "--layer", "2,2"], "--layer 2,2: layer 2 is listed twice")


def test_a_study_of_several_layers(refused):
    refused(["study", "mi_ortho", "--model", "tiny", "--layer", "2,3"], "--layer 2,3: a study reads one layer")


def test_a_layers_bench_of_one_layer_or_out_of_range(refused):
    refused(["bench", "--model", "tiny", "--layers", "3"], "--layers 3: give two layers or more")
    refused(["bench", "--model", "tiny", "--layers", "3,12"], "layer 12 is out of range: tiny has 8 layers")
    refused(["bench", "--model", "tiny", "--layer", "3,6"], "--layer 3,6: this bench reads one layer")


def test_two_bench_modes_at_once(refused):
    """Each mode is a bench of its own: two mode flags are refused, not one silently preferred."""
    refused(["bench", "--model", "tiny", "--same-work", "--step-cost"], "--same-work and --step-cost: choose one")
    refused(["bench", "--model", "tiny", "--layers", "1,3", "--search", "4"], "--layers and --search: choose one")
