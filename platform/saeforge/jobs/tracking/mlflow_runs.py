"""MLflow runs: opening and closing them, child runs of a search or study, training curves.

A driver holds several runs at once (one per hook, or a parent and its children), so runs are
made and ended through `MlflowClient` by id rather than as the process's active run.
"""

from __future__ import annotations

import math
import time

from saeforge.jobs.tracking.store import redact_text

TRIAL_TAG = "saeforge.trial_id"
STATUS_TAG = "saeforge.status"
VARIANT_TAG = "saeforge.variant"
HOOK_RUNS_TAG = "saeforge.hook_runs"  # a run of several hooks: JSON {hook: run id} of its sibling runs


def safe_params(params: dict) -> dict[str, str]:
    """Params as MLflow stores them (strings), every URI among them redacted (--storage,
    --address, --dataset and --resume may carry credentials)."""
    return {k: redact_text(str(v)) for k, v in params.items()}


class RunCurves:
    """Logs training curves into a run from a Ray Train worker (rank 0), best-effort: a failed
    call (a tracking server restarting, a locked SQLite store, the run gone) is counted and the
    first error kept for the run's summary, never raised: the curves are not worth the run."""

    def __init__(self, uri: str, run_id: str):
        self.client, self.failures, self.first_error = None, 0, ""
        if uri and run_id:
            from mlflow.tracking import MlflowClient

            self.client, self.run_id = MlflowClient(uri), run_id

    def log(self, step: int, values: dict[str, float]) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        try:
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])
        except Exception as err:  # any failure of the store: MlflowException, OSError, requests' errors
            self.failures += 1
            first_line = str(err).splitlines()[0] if str(err) else ""
            self.first_error = self.first_error or redact_text(f"{type(err).__name__}: {first_line}")


def finite(values: dict) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def log_to_run(uri: str, run_id: str, params: dict | None = None, metrics: dict | None = None, step: int = 0) -> None:
    """Params (as text) and the finite metrics (at `step`) into a run, in batches MLflow takes
    (at most 100 params and 1,000 metrics a call)."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client, now = MlflowClient(uri), int(time.time() * 1000)
    params = [Param(k, v) for k, v in safe_params(params or {}).items()]
    metrics = [Metric(k, v, now, step) for k, v in finite(metrics or {}).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i : i + 100])
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000])


def start_run(uri: str, experiment_id: str, name: str, tags: dict | None = None) -> str:
    """A new RUNNING run, tagged as `mlflow.start_run` tags one (source, user, ...), but not made
    the process's active run: a driver holds several at once (one per hook). Returns its id."""
    from mlflow.tracking import MlflowClient
    from mlflow.tracking.context.registry import resolve_tags

    return MlflowClient(uri).create_run(experiment_id, run_name=name, tags=resolve_tags(tags)).info.run_id


def start_child_run(uri: str, experiment_id: str, parent_run_id: str, name: str, tags: dict) -> str:
    """A child run of a search's parent run (one per trial); returns its id. A trial that Tune
    restarts (`--max-failures`) gets the child run it started before, not a second one."""
    from mlflow.tracking import MlflowClient

    if TRIAL_TAG in tags:
        for run in child_runs(uri, experiment_id, parent_run_id):
            if run.data.tags.get(TRIAL_TAG) == tags[TRIAL_TAG]:
                return run.info.run_id
    return (
        MlflowClient(uri)
        .create_run(experiment_id, run_name=name, tags={"mlflow.parentRunId": parent_run_id, **tags})
        .info.run_id
    )


def open_child_run(uri: str, experiment_id: str, parent_run_id: str, name: str, tags: dict, params: dict) -> str:
    """A child run of a search's or a study's parent run (one per trial or SAE), with its params."""
    run_id = start_child_run(uri, experiment_id, parent_run_id, name, tags)
    log_to_run(uri, run_id, params=params)
    return run_id


def finish_run(uri: str, run_id: str, metrics: dict, step: int, tags: dict) -> None:
    """A run's final metrics (at `step`) and tags; then it ends FINISHED."""
    log_to_run(uri, run_id, metrics=metrics, step=step)
    close_run(uri, run_id, "FINISHED", tags)


def close_run(uri: str, run_id: str, status: str, tags: dict | None = None) -> None:
    """Tag a run and end it: FINISHED, KILLED or FAILED."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, value)
    client.set_terminated(run_id, status)


def child_runs(uri: str, experiment_id: str, parent_run_id: str) -> list:
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri).search_runs(
        [experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=10_000
    )
