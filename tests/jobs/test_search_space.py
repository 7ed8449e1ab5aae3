"""Tune-space files: every shipped space parses and builds; mistakes fail with the file, the key and
what was expected; the objective, constraints, champion rule and Pareto set on hand-made trials.
No Ray, no model: milliseconds each."""

import math

import pytest

import variants
from saeforge.core.reporting import pareto_front
from saeforge.errors import UserError
from saeforge.jobs.tune import search_space as tune_space

GOOD = """\
variant: relu
objective: {metric: ce_loss_recovered, mode: max, l0_max: 32}
constraints: [{metric: dead_fraction, max: 0.5}]
early_stopping: {metric: explained_variance, mode: max, grace_period: 8}
params:
  l1_coeff: {sampler: loguniform, low: 0.01, high: 0.2}
  lr: {sampler: choice, values: [1.0e-4, 3.0e-4]}
  warmup_steps: {sampler: randint, low: 1, high: 10}
fixed:
  batch_size: 256
"""


def write(tmp_path, text, name="space.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", variants.names())
def test_every_shipped_space_parses_builds_and_converts(name):
    space = tune_space.load(tune_space.default_space_path(name), name)
    tune_space.check_builds(space, d_in=64, d_sae=512)
    domains = space.param_space()
    assert set(domains) == set(space.params) and domains
    types = variants.get(name).Config.field_types()
    for field, domain in domains.items():
        value = domain.sample()
        kind = types[field]
        assert isinstance(value, kind) or (kind is float and isinstance(value, int)), (field, value)
    # Every search bounds L0 at 128, except hsae's: its level 2 keeps ~150-200 latents firing in a
    # short run whatever its L1 (docs/recipe.md), so 128 would leave a search with no trial to keep.
    assert space.l0_max() == (256 if name == "hsae" else 128)


def test_good_space(tmp_path):
    space = tune_space.load(write(tmp_path, GOOD), "relu")
    assert space.metrics == ("ce_loss_recovered",) and space.modes == ("max",)
    assert [str(c) for c in space.constraints] == ["l0 <= 32", "dead_fraction <= 0.5"]
    assert space.early_stopping.grace_period == 8 and space.fixed == {"batch_size": 256}
    assert space.params["lr"]["values"] == [1e-4, 3e-4]
    pareto = space.as_pareto()
    assert pareto.multi_objective and pareto.metrics == ("l0", "ce_loss_recovered") and pareto.l0_max() == 32


BAD = [  # (change to GOOD, key the message must name, what it must say was expected)
    (
        ("values: [1.0e-4, 3.0e-4]", "values: [1e-4, 3.0e-4]"),
        "params.lr.values[0]",
        "expected a float for relu's 'lr', got '1e-4' (a string: YAML reads numbers like 1e-4 as text; write 1.0e-4)",
    ),
    (("  lr: {", "  nope: {"), "params.nope", "expected a config field of relu"),
    (("sampler: loguniform", "sampler: normal"), "params.l1_coeff.sampler", "expected one of choice, grid, uniform"),
    (("low: 0.01, high: 0.2", "low: 0.01"), "params.l1_coeff.high", "expected 'high'"),
    (("low: 0.01, high: 0.2", "low: 0.3, high: 0.2"), "params.l1_coeff.high", "expected a value > low (0.3)"),
    (("low: 0.01, high: 0.2", "low: 0.0, high: 0.2"), "params.l1_coeff.low", "expected a value > 0 (loguniform)"),
    (
        ("sampler: randint, low: 1, high: 10", "sampler: uniform, low: 1, high: 10"),
        "params.warmup_steps.sampler",
        "expected randint or choice for the int field",
    ),
    (("batch_size: 256", "batch_size: 256.5"), "fixed.batch_size", "expected an int for relu's 'batch_size'"),
    (("batch_size: 256", "lr: 1.0e-3"), "fixed.lr", "expected a field that is not also searched"),
    (
        ("metric: ce_loss_recovered", "metric: ce_loss_recoverd"),
        "objective.metric",
        "expected one of ce_loss_recovered",
    ),
    (("mode: max, l0_max", "mode: maximum, l0_max"), "objective.mode", "expected one of min, max"),
    (
        ("metric: ce_loss_recovered, mode: max", "metric: [l0, mse], mode: [min, min]"),
        "objective",
        "expected the Pareto pair",
    ),
    (("l0_max: 32", "l0_max: '32'"), "objective.l0_max", "expected a number, got '32' (a string: remove the quotes)"),
    (
        ("[{metric: dead_fraction, max: 0.5}]", "[{metric: dead_fraction}]"),
        "constraints[0]",
        "expected a min and/or a max",
    ),
    (
        ("metric: explained_variance, mode: max, grace", "metric: accuracy, mode: max, grace"),
        "early_stopping.metric",
        "expected a training metric",
    ),
    (("variant: relu", "variant: topk"), "variant", "expected 'relu' (the variant being searched)"),
    (("fixed:", "fixd:"), "fixd", "expected one of the keys variant, objective"),
]


@pytest.mark.parametrize("change,key,expected", BAD, ids=[b[1] for b in BAD])
def test_mistakes_name_the_file_the_key_and_what_was_expected(tmp_path, change, key, expected):
    old, new = change
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1), "bad_space.yaml")
    with pytest.raises(UserError) as err:
        tune_space.load(path, "relu")
    message = str(err.value)
    assert message.startswith(f"{path}: {key}: "), message
    assert expected in message, message


def test_broken_yaml_and_missing_file(tmp_path):
    path = write(tmp_path, "variant: relu\nparams: {lr: [1, 2\n")
    with pytest.raises(UserError, match=r"space.yaml: not valid YAML at line \d+"):
        tune_space.load(path)
    with pytest.raises(UserError, match="nowhere.yaml: cannot read"):
        tune_space.load(tmp_path / "nowhere.yaml")


def test_sizes_that_cannot_build_name_the_file(tmp_path):
    text = GOOD.replace("variant: relu", "variant: group_ib").replace(
        "  warmup_steps: {sampler: randint, low: 1, high: 10}\n", ""
    )
    space = tune_space.load(write(tmp_path, text), "group_ib")
    with pytest.raises(UserError, match="space.yaml: params/fixed: expected values that build group_ib"):
        tune_space.check_builds(space, d_in=64, d_sae=100)  # not a multiple of the group size


def test_objective_constraints_and_champion_rule(tmp_path):
    space = tune_space.load(write(tmp_path, GOOD), "relu")
    ok = {"ce_loss_recovered": 0.9, "l0": 20.0, "dead_fraction": 0.1}
    dense = {"ce_loss_recovered": 0.97, "l0": 48.0, "dead_fraction": 0.1}
    assert space.feasible(ok) and not space.feasible(dense)
    assert space.score(ok) == 0.9
    assert space.score(dense) == pytest.approx(0.97 - 0.5)  # 50% over the L0 bound
    assert math.isnan(space.score({"ce_loss_recovered": math.nan, "l0": 3.0, "dead_fraction": 0.0}))
    rows = [
        {"trial_id": "a", "status": "completed", **ok},
        {"trial_id": "b", "status": "completed", **dense},
        {"trial_id": "c", "status": "early_stopped", **ok, "ce_loss_recovered": 0.99},
        {"trial_id": "d", "status": "completed", "ce_loss_recovered": 0.95, "l0": 30.0, "dead_fraction": 0.0},
    ]
    assert tune_space.best_trial(rows, space)["trial_id"] == "d"  # b is denser than allowed, c never finished
    assert tune_space.best_trial(rows, space.as_pareto())["trial_id"] == "d"  # the same rule for a Pareto search
    # none within the constraints: the closest is the search's best (registered, not a champion candidate)
    assert tune_space.best_trial(rows[1:3], space)["trial_id"] == "b"
    assert tune_space.best_trial(rows[2:3], space) is None  # nothing completed
    points = [(48.0, 0.97), (20.0, 0.9), (25.0, 0.8), (30.0, 0.95), (math.nan, 1.0), (20.0, 0.9)]
    assert pareto_front(points) == [1, 5, 3, 0]  # sorted by L0; (25, 0.8) is beaten by (20, 0.9)


def test_tune_cli_rejects_bad_input_before_ray_starts(tmp_path, capsys):
    from saeforge.cli import main

    assert main(["tune", "--variant", "nope"]) == 2
    assert "unknown variant 'nope'" in capsys.readouterr().err
    bad = write(tmp_path, GOOD.replace("1.0e-4, 3.0e-4", "1e-4, 3.0e-4"), "mine.yaml")
    assert main(["tune", "--variant", "relu", "--space", str(bad), "--model", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "mine.yaml: params.lr.values[0]: expected a float" in err and "Traceback" not in err
    grid = write(tmp_path, GOOD.replace("sampler: choice", "sampler: grid"), "grid.yaml")
    assert main(["tune", "--space", str(grid), "--model", "tiny"]) == 2
    assert "grid.yaml: params.lr.sampler: expected a sampler Optuna can draw from" in capsys.readouterr().err
    assert main(["tune", "--variant", "relu,topk", "--space", str(bad)]) == 2
    assert "--space: expected one variant" in capsys.readouterr().err
