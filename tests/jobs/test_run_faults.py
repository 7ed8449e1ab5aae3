"""A run's faults on the tiny Gemma with real Ray Train workers: a failing MLflow store does not
end training (the failures are counted and reach the driver), and a run that fails is marked
FAILED in MLflow, not left RUNNING."""

import dataclasses

import pytest

from conftest import TINY_RELU, tiny_args


def test_worker_logging_into_a_failing_store_is_counted_and_training_completes(ray_session, mlflow_store, tmp_path):
    """Rank 0 logs its curves into a run the store refuses (it does not exist): every call fails,
    the run still trains every step, and the count comes back with the final checkpoint."""
    from saeforge.jobs.plan import TrackingTarget
    from saeforge.jobs.train.driver import train_on_ray
    from saeforge.jobs.validate import plan_train

    plan, contexts = plan_train(tiny_args(tmp_path, tokens=4000, log_every=1, checkpoint_every=1000))
    plan = dataclasses.replace(plan, tracking=TrackingTarget(mlflow_store, "0", "no-such-run"))
    result = train_on_ray(plan, contexts, plan.name)
    assert result.metrics["step"] == plan.loop.total_steps
    assert result.metrics["mlflow_failures"] == plan.loop.total_steps  # one failed call per logged step


def test_a_failed_run_is_marked_failed(ray_session, mlflow_store, tmp_path):
    """An absurd learning rate makes the loss non-finite in the worker: Ray Train retries it
    --max-failures times (once here), then the driver raises one line and the MLflow run ends
    FAILED."""
    from mlflow.tracking import MlflowClient

    from saeforge.errors import RunFailed
    from saeforge.jobs.train.driver import run_train

    args = tiny_args(tmp_path, tokens=4000, run_name="doomed", overrides={**TINY_RELU, "lr": "1e30"}, max_failures=1)
    with pytest.raises(RunFailed, match=r"rank 0: FloatingPointError: loss is (nan|inf).*--max-failures 1") as err:
        run_train(args, progress=lambda *_: None)
    assert "\n" not in str(err.value)
    client = MlflowClient()
    experiment = client.get_experiment_by_name("saeforge/tiny/blocks.3.hook_resid_post")
    (run,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'doomed'")
    assert run.info.status == "FAILED"
