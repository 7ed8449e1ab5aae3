"""The MLflow model registry: how SAEs are logged and registered, and when `champion` moves.

One registered model per model + hook + variant. Every registered version carries its
`ce_loss_recovered` and `l0` as tags, which the champion rule and `saeforge compare` read. The
champion's compare-and-set runs under the store's lock; a remote tracking server offers no
compare-and-set, so drivers on different machines finishing within the same second can still
leave the worse of their two versions champion (both keep their scores as tags).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np

from saeforge.jobs.tracking.store import clean_name, store_lock

CHAMPION = "champion"
CHAMPION_METRIC = "ce_loss_recovered"
L0_TAG = "l0"
MODEL_NAME = "sae_model"  # the logged pyfunc model's name in a run


def registered_model_name(model_name: str, hook_name: str, variant: str) -> str:
    return f"{clean_name(model_name)}__{hook_name}__{variant}"


def parse_registered_name(name: str) -> tuple[str, str, str] | None:
    """(model, hook, variant) of a name saeforge registered, else None."""
    parts = name.split("__")
    return (parts[0], parts[1], parts[2]) if len(parts) == 3 else None


def log_and_register(sae_folder: Path, name: str, run_id: str | None = None) -> int:
    """Log the SAE as a pyfunc model (its folder is the model's one artifact: the SAE is logged
    once) in the active run, or in `run_id`, and register a new version of `name`."""
    import importlib.util
    import warnings

    import mlflow
    from mlflow.models import infer_signature

    from saeforge.core.sae_files import read_cfg

    cfg = read_cfg(sae_folder)
    model_code = importlib.util.find_spec("saeforge.jobs.tracking.registered_model").origin  # models-from-code
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
