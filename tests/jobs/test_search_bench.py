"""`saeforge bench --search`: the separate runs are the search's trials, flag for flag."""

from saeforge.bench.search import completed_trials, trial_command, tune_command
from saeforge.cli import build_parser
from saeforge.cli.flags import parse_into
from saeforge.jobs.arguments import BenchArgs, TrainArgs, TuneArgs, pairs_dict


def parsed(command: list[str], cls):
    """A generated command read back by the real command-line parser (argv after `-m saeforge.cli`)."""
    return parse_into(cls, build_parser().parse_args(command[3:]))


def test_each_completed_trial_becomes_a_train_run_of_the_same_work(tmp_path):
    args = BenchArgs(model="tiny", layer="3", variant="relu", tokens=5000, d_sae=96, eval_contexts=4, search=3)
    tune = parsed(tune_command(args, tmp_path), TuneArgs)
    assert (tune.samples, tune.tokens_per_trial, tune.scheduler) == (3, 5000, "fifo")
    assert (tune.variant, tune.d_sae, tune.eval_contexts, tune.layer) == ("relu", 96, 4, "3")
    search = {
        "params": ["l1_coeff", "lr"],
        "rows": [
            {"status": "completed", "l1_coeff": 0.004, "lr": 0.002},
            {"status": "failed", "l1_coeff": 0.1, "lr": 0.001},
            {"status": "completed", "l1_coeff": 0.01, "lr": 0.003},
        ],
    }
    trials = completed_trials(search, {"batch_size": 1024, "lr": 0.0001})
    assert [o for _, o in trials] == [
        {"batch_size": 1024, "lr": 0.002, "l1_coeff": 0.004},  # sampled values win over fixed ones
        {"batch_size": 1024, "lr": 0.003, "l1_coeff": 0.01},
    ]
    train = parsed(trial_command(args, trials[1][1], tmp_path), TrainArgs)
    assert (train.tokens, train.eval_contexts, train.d_sae, train.variant) == (5000, 4, 96, "relu")
    assert pairs_dict(train.overrides) == {"batch_size": "1024", "lr": "0.003", "l1_coeff": "0.01"}
