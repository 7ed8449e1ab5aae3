"""Runs on the tiny Gemma with real Ray Train workers that meet what a cluster gives them: storage
that is a URI, a tracking store that refuses the curves, a loss that diverges; and a variant
that reads whole contexts going the whole way through Ray Train."""

import json
from pathlib import Path

import pytest

import variants
from conftest import TINY_RELU, tiny_args


def test_a_run_on_uri_storage_of_a_context_variant_logging_into_a_refusing_store(ray_session, mlflow_store, tmp_path):
    """One run, three things a cluster meets. (1) --storage as a file:// URI (what Ray Train takes
    for object storage) holds the run's checkpoints, and its name is then taken there too. (2) Rank
    0 logs its curves into a run the store refuses (it does not exist): every call fails, the run
    still trains every step, and the count reaches the driver with the final checkpoint. (3) The
    variant reads whole contexts in token order (`batch_layout` "contexts"), through the producers
    and Ray Train like any other."""
    import dataclasses

    from saeforge.core.sae_files import SAE_DIR, load_sae
    from saeforge.errors import UserError
    from saeforge.jobs.checks import check_new_run_folder
    from saeforge.jobs.plan import TrackingTarget
    from saeforge.jobs.runtime.storage import local_checkpoint, run_exists, storage_path
    from saeforge.jobs.train.checkpoints import RUN_INFO_FILE
    from saeforge.jobs.train.driver import train_on_ray
    from saeforge.jobs.validate import plan_train

    name = next(n for n in variants.names() if variants.get(n).batch_layout == "contexts")
    fields = variants.get(name).Config.field_types()
    overrides = {
        "batch_size": "256",
        **{k: v for k, v in {"kde_tokens": "64", "n_candidates": "128"}.items() if k in fields},
    }
    uri = (tmp_path / "shared").as_uri()  # file:///...
    args = tiny_args(
        tmp_path, variant=name, overrides=overrides, tokens=3000, context_size=32, storage=uri,
        run_name="on-a-uri", log_every=1, checkpoint_every=1000,
    )  # fmt: skip
    plan, contexts = plan_train(args)
    assert storage_path(uri) == uri and run_exists(uri, "on-a-uri") == ""
    plan = dataclasses.replace(plan, tracking=TrackingTarget(mlflow_store, "0", "no-such-run"))
    result = train_on_ray(plan, contexts, plan.name)

    checkpoint = local_checkpoint(result.checkpoint)
    assert checkpoint.is_relative_to(tmp_path / "shared" / "on-a-uri")
    assert load_sae(checkpoint / SAE_DIR)[0].cfg.d_sae == 128
    assert run_exists(uri, "on-a-uri") == f"{uri}/on-a-uri"
    with pytest.raises(UserError, match="already exists"):
        check_new_run_folder(args, "on-a-uri")  # the name is taken on the URI storage too
    assert result.metrics["step"] == plan.loop.total_steps >= 2
    assert result.metrics["mlflow_failures"] == plan.loop.total_steps  # one failed call per logged step
    assert json.loads((Path(checkpoint) / RUN_INFO_FILE).read_text())["step"] == plan.loop.total_steps


def test_a_failed_run_is_marked_failed(ray_session, mlflow_store, tmp_path):
    """An absurd learning rate makes the loss non-finite in the worker: the run fails with one
    line (no restart allowed here: --max-failures 0) and the MLflow run ends FAILED."""
    from mlflow.tracking import MlflowClient

    from saeforge.errors import RunFailed
    from saeforge.jobs.train.driver import run_train

    args = tiny_args(tmp_path, tokens=4000, run_name="doomed", overrides={**TINY_RELU, "lr": "1e30"}, max_failures=0)
    with pytest.raises(RunFailed, match=r"rank 0: FloatingPointError: loss is (nan|inf).*--max-failures 0") as err:
        run_train(args, progress=lambda *_: None)
    assert "\n" not in str(err.value)
    client = MlflowClient()
    experiment = client.get_experiment_by_name("saeforge/tiny/blocks.3.hook_resid_post")
    (run,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'doomed'")
    assert run.info.status == "FAILED"
