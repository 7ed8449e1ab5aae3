"""MLflow: where runs go, how SAEs are registered, and when the `champion` alias moves.

Without MLFLOW_TRACKING_URI the store is SQLite in the working directory with artifacts in
./mlartifacts (never inside Ray's temporary session folders, which are deleted). One experiment
per model + hook; one registered model per model + hook + variant.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np

CHAMPION = "champion"
CHAMPION_METRIC = "ce_loss_recovered"


def tracking_uri(workdir: Path | None = None) -> str:
    """MLFLOW_TRACKING_URI if set, else a SQLite store in the working directory."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{(workdir or Path.cwd()).resolve() / 'mlflow.db'}"


def artifact_root(uri: str, workdir: Path | None = None) -> str | None:
    """Where a new experiment's artifacts go: next to a SQLite/file store; the server's choice
    for an http(s) tracking server."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    if uri.startswith(("http://", "https://", "databricks")):
        return None
    return ((workdir or Path.cwd()).resolve() / "mlartifacts").as_uri()


def _clean(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def experiment_name(model_name: str, hook_name: str) -> str:
    return f"saeforge/{_clean(model_name)}/{hook_name}"


def registered_model_name(model_name: str, hook_name: str, variant: str) -> str:
    return f"{_clean(model_name)}__{hook_name}__{variant}"


def use_store(workdir: Path | None = None) -> str:
    import mlflow

    uri = tracking_uri(workdir)
    mlflow.set_tracking_uri(uri)
    return uri


def ensure_experiment(name: str, uri: str) -> str:
    """The experiment's id, creating it with an explicit artifact location if needed."""
    import mlflow

    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    root = artifact_root(uri)
    location = f"{root}/{_clean(name)}" if root else None
    return mlflow.create_experiment(name, artifact_location=location)


def log_and_register(sae_folder: Path, d_in: int, d_sae: int, name: str):
    """Log the SAE as a pyfunc model in the active run and register a new version of `name`."""
    import mlflow
    from mlflow.models import infer_signature

    from saeforge.pyfunc_model import SAEPyfunc

    import warnings

    warnings.filterwarnings("ignore", message=".*(type hints|input_example).*", category=UserWarning)
    signature = infer_signature(np.zeros((1, d_in), np.float32), np.zeros((1, d_sae), np.float32))
    info = mlflow.pyfunc.log_model(
        name="sae_model", python_model=SAEPyfunc(), artifacts={"sae": str(sae_folder)},
        signature=signature, registered_model_name=name,
        pip_requirements=["saeforge", "torch", "safetensors", "numpy"],  # skips slow inference
    )
    return info.registered_model_version


def champion_version(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def promote_if_better(name: str, version: int | str, metrics: dict[str, float], max_l0: float) -> tuple[bool, str]:
    """Move `champion` to this version when it beats the current champion on CE loss recovered
    at a sane L0 (1 <= L0 <= max_l0). Returns (moved, reason)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    score, l0 = metrics[CHAMPION_METRIC], metrics["l0"]
    client.set_model_version_tag(name, str(version), CHAMPION_METRIC, f"{score:.6f}")
    client.set_model_version_tag(name, str(version), "l0", f"{l0:.3f}")
    if not (math.isfinite(score) and 1 <= l0 <= max_l0):
        return False, f"L0 {l0:.1f} is outside the sane range [1, {max_l0:g}] (or the score is not finite)"
    current = champion_version(client, name)
    if current is not None:
        best = float(current.tags.get(CHAMPION_METRIC, "-inf"))
        if score <= best:
            return False, f"{CHAMPION_METRIC} {score:.4f} does not beat champion v{current.version} ({best:.4f})"
    client.set_registered_model_alias(name, CHAMPION, str(version))
    previous = f" (was v{current.version})" if current is not None else ""
    return True, f"{CHAMPION_METRIC} {score:.4f} at L0 {l0:.1f}{previous}"
