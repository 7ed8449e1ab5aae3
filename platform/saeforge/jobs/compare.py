"""`saeforge compare`: the registered champions side by side (and every trial of a search), with
a plot of L0 against CE loss recovered: one marker per run, each variant's Pareto frontier.

Reads what training and tuning leave in MLflow: the `ce_loss_recovered` and `l0` tags that
`registry.promote_if_better` sets on every registered version, and the `eval/...` metrics of a
search's child runs.
"""

from __future__ import annotations

import math
import time

from saeforge.core.reporting import plot_l0_vs_ce
from saeforge.errors import UserError
from saeforge.jobs.arguments import CompareArgs
from saeforge.jobs.tracking import mlflow_runs, registry, store

# -- reading MLflow --------------------------------------------------------------------------------


def _float(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def registered_rows(client, model: str = "", hook: str = "") -> tuple[list[dict], list[dict]]:
    """(one row per registered saeforge model: its champion, else its latest version;
    one point per registered version, for the plot)."""
    rows, points = [], []
    for rm in sorted(client.search_registered_models(max_results=1000), key=lambda m: m.name):
        parts = registry.parse_registered_name(rm.name)
        if parts is None or (model and parts[0] != store.clean_name(model)) or (hook and parts[1] != hook):
            continue
        versions = list(client.search_model_versions(f"name = '{rm.name}'"))
        if not versions:
            continue
        champion = registry.champion_version(client, rm.name)
        shown = champion or max(versions, key=lambda v: int(v.version))
        rows.append(
            {
                "name": rm.name,
                "version": int(shown.version),
                "alias": "champion" if champion else "(latest)",
                "variant": parts[2],
                "hook": parts[1],
                "ce_loss_recovered": _float(shown.tags.get(registry.CHAMPION_METRIC)),
                "l0": _float(shown.tags.get(registry.L0_TAG)),
                "run_id": shown.run_id,
            }
        )
        for v in versions:
            points.append(
                {
                    "variant": parts[2],
                    "l0": _float(v.tags.get(registry.L0_TAG)),
                    "ce_loss_recovered": _float(v.tags.get(registry.CHAMPION_METRIC)),
                    "label": f"{rm.name} v{v.version}",
                    "run_id": v.run_id,
                    "champion": champion is not None and v.version == champion.version,
                }
            )
    return rows, points


def search_rows(client, parent_run_id: str) -> tuple[dict, list[dict]]:
    """(the search's parent run, one row per trial: status, sampled values, eval metrics)."""
    from mlflow.exceptions import MlflowException

    try:
        parent = client.get_run(parent_run_id)
    except MlflowException:
        raise UserError(f"--search {parent_run_id}: no such MLflow run") from None
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=10_000
    )
    if not children:
        raise UserError(f"--search {parent_run_id}: the run has no child runs (is it a `saeforge tune` search?)")
    best = parent.data.tags.get("saeforge.best_run_id")
    children = sorted(children, key=lambda r: r.info.start_time)
    sae_params = [{k[len("sae.") :]: v for k, v in r.data.params.items() if k.startswith("sae.")} for r in children]
    varying = sorted({k for p in sae_params for k in p if len({q.get(k) for q in sae_params}) > 1})
    rows = []
    for run, params in zip(children, sae_params):
        m, tags = run.data.metrics, run.data.tags
        rows.append(
            {
                "trial_id": tags.get(mlflow_runs.TRIAL_TAG, ""),
                "run_id": run.info.run_id,
                "variant": tags.get(mlflow_runs.VARIANT_TAG, run.data.params.get("variant", "")),
                "status": tags.get(mlflow_runs.STATUS_TAG, run.info.status.lower()),
                **{k: params.get(k, "") for k in varying},
                "l0": m.get("eval/l0", math.nan),
                "ce_loss_recovered": m.get("eval/ce_loss_recovered", math.nan),
                "explained_variance": m.get("eval/explained_variance", math.nan),
                "best": run.info.run_id == best,
            }
        )
    return parent, rows


def run_compare(args: CompareArgs) -> dict:
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = store.require_store("the registry")
    client = MlflowClient(uri)
    champions, points = registered_rows(client, args.model, args.hook)
    trials, parent = [], None
    if args.search:
        parent, trials = search_rows(client, args.search)
        champion_runs = {p["run_id"] for p in points if p["champion"]}
        trial_runs = {t["run_id"] for t in trials}
        points = [p for p in points if p["run_id"] not in trial_runs] + [  # one marker per run
            {**t, "champion": t["run_id"] in champion_runs} for t in trials if t["status"] == "completed"
        ]
    title = "registered SAEs" + (f" + search {parent.info.run_name}" if parent else "")
    plot = plot_l0_vs_ce(points, args.out, title=title)
    logged_to = None
    if args.log:
        if parent is not None:
            client.log_artifact(parent.info.run_id, str(plot), artifact_path="compare")
            logged_to = parent.info.run_id
        else:
            experiment_id = store.ensure_experiment("saeforge/compare", uri)
            with mlflow.start_run(experiment_id=experiment_id, run_name=f"compare-{time.strftime('%Y%m%d-%H%M%S')}"):
                mlflow.log_artifact(str(plot), artifact_path="compare")
                mlflow.log_dict({"champions": champions}, "compare/champions.json")
                logged_to = mlflow.active_run().info.run_id
    return {
        "champions": champions,
        "trials": trials,
        "plot": str(plot),
        "logged_to": logged_to,
        "tracking_uri": store.redact(uri),
    }
