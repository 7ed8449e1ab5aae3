"""MLflow: where runs go, how they are named, how SAEs are registered, and when `champion` moves.

Without MLFLOW_TRACKING_URI the store is SQLite in the working directory with artifacts in
./mlartifacts (never inside Ray's temporary session folders, which are deleted). One experiment
per model + hook; one registered model per model + hook + variant. Every registered version
carries its `ce_loss_recovered` and `l0` as tags, which the champion rule and `saeforge compare`
read. This module owns those names, the tags and the store check.

Two drivers may share a store. What they do to it together is serialised by `store_lock`: a file
lock (flock) beside a SQLite store, so creating the store and an experiment, and the champion's
compare-and-set, happen one driver at a time on that store. A remote tracking server offers no
compare-and-set, and the lock is then a file in saeforge's cache keyed by the URI: it serialises
the drivers of one machine only; drivers on different machines finishing within the same second
can still leave the worse of their two versions champion (every version keeps its score as a
tag, so `saeforge compare` shows it). `redact` keeps a URI's credentials out of what is printed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import math
import os
import re
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from saeforge.errors import UserError

CHAMPION = "champion"
CHAMPION_METRIC = "ce_loss_recovered"
L0_TAG = "l0"
TRIAL_TAG = "saeforge.trial_id"
STATUS_TAG = "saeforge.status"
VARIANT_TAG = "saeforge.variant"
HOOK_RUNS_TAG = "saeforge.hook_runs"  # a run of several hooks: JSON {hook: run id} of its sibling runs
MODEL_NAME = "sae_model"  # the logged pyfunc model's name in a run


def tracking_uri(workdir: Path | None = None) -> str:
    """MLFLOW_TRACKING_URI if set, else a SQLite store in the working directory."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{(workdir or Path.cwd()).resolve() / 'mlflow.db'}"


def artifact_root(uri: str, workdir: Path | None = None) -> str | None:
    """Where a new experiment's artifacts go: next to a SQLite/file store; the server's choice
    for an http(s) tracking server."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).resolve().parent / "mlartifacts").as_uri()
    if uri.startswith(("http://", "https://", "databricks")):
        return None
    return ((workdir or Path.cwd()).resolve() / "mlartifacts").as_uri()


def clean_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def experiment_name(model_name: str, hook_name: str) -> str:
    return f"saeforge/{clean_name(model_name)}/{hook_name}"


def registered_model_name(model_name: str, hook_name: str, variant: str) -> str:
    return f"{clean_name(model_name)}__{hook_name}__{variant}"


def parse_registered_name(name: str) -> tuple[str, str, str] | None:
    """(model, hook, variant) of a name saeforge registered, else None."""
    parts = name.split("__")
    return (parts[0], parts[1], parts[2]) if len(parts) == 3 else None


def use_store(workdir: Path | None = None) -> str:
    import mlflow

    uri = tracking_uri(workdir)
    mlflow.set_tracking_uri(uri)
    return uri


def require_store(what: str) -> str:
    """The store, refusing (instead of creating an empty SQLite file) when none is there."""
    store = tracking_uri()
    if store.startswith("sqlite:///") and not Path(store[len("sqlite:///") :]).is_file():
        raise UserError(
            f"cannot read '{what}': no MLflow store at {redact(store)} (set MLFLOW_TRACKING_URI or run where "
            "the SAE was trained)"
        )
    return use_store()


def redact(uri: str) -> str:
    """`uri` with any user name and password replaced by '***' (for printing and logging)."""
    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    host = parts.netloc.rsplit("@", 1)[1]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"***@{host}"))


def lock_path(uri: str) -> Path:
    """The lock file of a store: beside a SQLite database, else in the cache, keyed by the URI."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        return db.with_name(db.name + ".lock")
    from saeforge.core.model import cache_root

    return cache_root() / "locks" / f"mlflow-{hashlib.sha256(uri.encode()).hexdigest()[:16]}.lock"


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold the store's lock (an exclusive flock; released when the block ends or the process dies)."""
    path = lock_path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_experiment(name: str, uri: str) -> str:
    """The experiment's id, creating it with an explicit artifact location if needed. Under the
    store's lock (a fresh SQLite store is created by the first access, whose migrations must not
    run twice at once), and tolerant of another process having created it first."""
    import mlflow
    from mlflow.exceptions import MlflowException

    with store_lock(uri):
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        root = artifact_root(uri)
        location = f"{root}/{clean_name(name)}" if root else None
        try:
            return mlflow.create_experiment(name, artifact_location=location)
        except MlflowException:
            experiment = mlflow.get_experiment_by_name(name)  # created meanwhile, by a driver elsewhere
            if experiment is None:
                raise
            return experiment.experiment_id


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
            self.first_error = self.first_error or f"{type(err).__name__}: {first_line}"


def finite(values: dict) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def log_and_register(sae_folder: Path, name: str, run_id: str | None = None) -> int:
    """Log the SAE as a pyfunc model (its folder is the model's one artifact: the SAE is logged
    once) in the active run, or in `run_id`, and register a new version of `name`."""
    import importlib.util
    import warnings

    import mlflow
    from mlflow.models import infer_signature

    from saeforge.core.sae_files import read_cfg

    cfg = read_cfg(sae_folder)
    model_code = importlib.util.find_spec("saeforge.jobs.registered_model").origin  # models-from-code
    warnings.filterwarnings("ignore", message=".*(type hints|input_example).*", category=UserWarning)
    signature = infer_signature(np.zeros((1, cfg["d_in"]), np.float32), np.zeros((1, cfg["d_sae"]), np.float32))
    with (
        mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None) if run_id else contextlib.nullcontext()
    ):
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            python_model=model_code,
            artifacts={"sae": str(sae_folder)},
            signature=signature,
            registered_model_name=name,
            pip_requirements=pinned_requirements(),  # given, so MLflow skips its slow inference
        )
    return int(info.registered_model_version)


def pinned_requirements() -> list[str]:
    """What loading a registered SAE needs, pinned to the versions that logged it (a local
    build tag such as torch's `+cpu` dropped: it names a wheel index, not a release)."""
    from importlib.metadata import version

    return [
        f"{dist}=={version(dist).split('+')[0]}" for dist in ("saeforge", "mlflow", "torch", "safetensors", "numpy")
    ]


def champion_version(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def tag_version(name: str, version: int | str, metrics: dict[str, float]) -> None:
    """The tags every registered version carries (the champion rule and compare read them)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    client.set_model_version_tag(name, str(version), CHAMPION_METRIC, f"{metrics[CHAMPION_METRIC]:.6f}")
    client.set_model_version_tag(name, str(version), L0_TAG, f"{metrics['l0']:.3f}")


def unmet_conditions(metrics: dict[str, float], max_l0: float) -> list[str]:
    """What keeps an SAE from being a champion candidate: it must be sparse (1 <= L0 <= max_l0)
    and faithful (CE loss recovered > 0, explained variance > 0: better than deleting the
    activation, better than its mean)."""
    score, l0 = metrics.get(CHAMPION_METRIC, math.nan), metrics.get("l0", math.nan)
    ev = metrics.get("explained_variance", math.nan)
    unmet = []
    if not 1 <= l0 <= max_l0:
        unmet.append(f"L0 {l0:.1f} is outside the sane range [1, {max_l0:g}]")
    if not score > 0:
        unmet.append(f"{CHAMPION_METRIC} {score:.4f} is not above 0")
    if not ev > 0:
        unmet.append(f"explained variance {ev:.4f} is not above 0")
    return unmet


def promote_if_better(name: str, version: int | str, metrics: dict[str, float], max_l0: float) -> tuple[bool, str]:
    """Tag the version, and move `champion` to it when it is a good SAE (`unmet_conditions`) that
    beats the current champion on CE loss recovered. Returns (moved, reason). The read, the
    comparison and the move happen under the store's lock, so two runs finishing together leave
    the better one champion."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    tag_version(name, version, metrics)
    unmet = unmet_conditions(metrics, max_l0)
    if unmet:
        return False, "; ".join(unmet)
    score, l0 = metrics[CHAMPION_METRIC], metrics["l0"]
    with store_lock(mlflow.get_tracking_uri()):
        current = champion_version(client, name)
        if current is not None:
            best = float(current.tags.get(CHAMPION_METRIC, "-inf"))
            if score <= best:
                return False, f"{CHAMPION_METRIC} {score:.4f} does not beat champion v{current.version} ({best:.4f})"
        client.set_registered_model_alias(name, CHAMPION, str(version))
    previous = f" (was v{current.version})" if current is not None else ""
    return True, f"{CHAMPION_METRIC} {score:.4f} at L0 {l0:.1f}{previous}"


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
