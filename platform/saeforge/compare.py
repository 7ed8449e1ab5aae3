"""`saeforge compare`: the registered champions side by side (and every trial of a search), with
a plot of L0 against CE loss recovered: one marker per run, each variant's Pareto frontier.

Reads what training and tuning leave in MLflow: the `ce_loss_recovered` and `l0` tags that
`tracking.promote_if_better` sets on every registered version, and the `eval/...` metrics of a
search's child runs.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from saeforge import tracking
from saeforge.errors import UserError
from saeforge.tune_space import pareto_front


@dataclass
class CompareArgs:
    model: str = ""  # only this model's registered SAEs (its short name, as in the registry)
    hook: str = ""  # only this hook (e.g. blocks.6.hook_resid_post)
    search: str = ""  # a search's parent run id: list and plot its trials too
    out: str = "l0_vs_ce_loss_recovered.png"
    log: bool = True


# -- the plot ---------------------------------------------------------------------------------------

def plot_l0_vs_ce(points: list[dict], path: str | Path, title: str = "", l0_max: float | None = None) -> Path:
    """Scatter of L0 (x) against CE loss recovered (y): one marker per point, one colour per
    variant, each variant's Pareto frontier as a step line; points with best/champion set are
    starred. points: dicts with variant, l0, ce_loss_recovered and optional label, best, champion."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    finite = [p for p in points if math.isfinite(p.get("l0", math.nan)) and math.isfinite(
        p.get("ce_loss_recovered", math.nan))]
    by_variant: dict[str, list[dict]] = {}
    for p in finite:
        by_variant.setdefault(p["variant"], []).append(p)
    colours = plt.get_cmap("tab10")
    for i, (variant, pts) in enumerate(sorted(by_variant.items())):
        colour = colours(i % 10)
        xs, ys = [p["l0"] for p in pts], [p["ce_loss_recovered"] for p in pts]
        ax.scatter(xs, ys, color=colour, alpha=0.75, label=variant, s=28)
        front = pareto_front(list(zip(xs, ys)))
        if front:
            ax.step([xs[j] for j in front], [ys[j] for j in front], where="post", color=colour, linewidth=1.2,
                    linestyle="--")
        for p in pts:
            if p.get("best") or p.get("champion"):
                ax.scatter([p["l0"]], [p["ce_loss_recovered"]], marker="*", s=220, color=colour,
                           edgecolors="black", linewidths=0.8, zorder=5)
    if l0_max:
        ax.axvline(l0_max, color="grey", linestyle=":", linewidth=1, label=f"L0 bound {l0_max:g}")
    xs = [p["l0"] for p in finite]
    if xs and min(xs) > 0 and max(xs) / min(xs) > 20:
        ax.set_xscale("log")
    if ax.get_xscale() == "linear":
        ax.ticklabel_format(useOffset=False, style="plain")
    else:
        ax.ticklabel_format(useOffset=False, axis="y", style="plain")
    ax.margins(0.08)
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel("CE loss recovered")
    ax.set_title(title or "L0 vs CE loss recovered", fontsize=10)
    ax.grid(alpha=0.3)
    if by_variant:
        ax.legend(fontsize=8, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no finished runs to show", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- reading MLflow --------------------------------------------------------------------------------

def _float(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def _check_store(uri: str) -> None:
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise UserError(f"no MLflow store at {uri} (set MLFLOW_TRACKING_URI, or run from the folder where you "
                        "trained)")


def registered_rows(client, model: str = "", hook: str = "") -> tuple[list[dict], list[dict]]:
    """(one row per registered saeforge model: its champion, else its latest version;
    one point per registered version, for the plot)."""
    rows, points = [], []
    for rm in sorted(client.search_registered_models(max_results=1000), key=lambda m: m.name):
        parts = rm.name.split("__")
        if len(parts) != 3 or (model and parts[0] != tracking._clean(model)) or (hook and parts[1] != hook):
            continue
        versions = list(client.search_model_versions(f"name = '{rm.name}'"))
        if not versions:
            continue
        champion = tracking.champion_version(client, rm.name)
        shown = champion or max(versions, key=lambda v: int(v.version))
        rows.append({"name": rm.name, "version": int(shown.version), "alias": "champion" if champion else "(latest)",
                     "variant": parts[2], "hook": parts[1],
                     "ce_loss_recovered": _float(shown.tags.get(tracking.CHAMPION_METRIC)),
                     "l0": _float(shown.tags.get("l0")), "run_id": shown.run_id})
        for v in versions:
            points.append({"variant": parts[2], "l0": _float(v.tags.get("l0")),
                           "ce_loss_recovered": _float(v.tags.get(tracking.CHAMPION_METRIC)),
                           "label": f"{rm.name} v{v.version}", "run_id": v.run_id,
                           "champion": champion is not None and v.version == champion.version})
    return rows, points


def search_rows(client, parent_run_id: str) -> tuple[dict, list[dict]]:
    """(the search's parent run, one row per trial: status, sampled values, eval metrics)."""
    from mlflow.exceptions import MlflowException

    try:
        parent = client.get_run(parent_run_id)
    except MlflowException:
        raise UserError(f"--search {parent_run_id}: no such MLflow run") from None
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'",
                                  max_results=10_000)
    if not children:
        raise UserError(f"--search {parent_run_id}: the run has no child runs (is it a `saeforge tune` search?)")
    best = parent.data.tags.get("saeforge.best_run_id")
    children = sorted(children, key=lambda r: r.info.start_time)
    sae_params = [{k[len("sae."):]: v for k, v in r.data.params.items() if k.startswith("sae.")} for r in children]
    varying = sorted({k for p in sae_params for k in p if len({q.get(k) for q in sae_params}) > 1})
    rows = []
    for run, params in zip(children, sae_params):
        m, tags = run.data.metrics, run.data.tags
        rows.append({"trial_id": tags.get("saeforge.trial_id", ""), "run_id": run.info.run_id,
                     "variant": tags.get("saeforge.variant", run.data.params.get("variant", "")),
                     "status": tags.get("saeforge.status", run.info.status.lower()),
                     **{k: params.get(k, "") for k in varying},
                     "l0": m.get("eval/l0", math.nan), "ce_loss_recovered": m.get("eval/ce_loss_recovered", math.nan),
                     "explained_variance": m.get("eval/explained_variance", math.nan),
                     "best": run.info.run_id == best})
    return parent, rows


def run_compare(args: CompareArgs) -> dict:
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking.tracking_uri()
    _check_store(uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    champions, points = registered_rows(client, args.model, args.hook)
    trials, parent = [], None
    if args.search:
        parent, trials = search_rows(client, args.search)
        champion_runs = {p["run_id"] for p in points if p["champion"]}
        trial_runs = {t["run_id"] for t in trials}
        points = [p for p in points if p["run_id"] not in trial_runs] + [  # one marker per run
            {**t, "champion": t["run_id"] in champion_runs} for t in trials if t["status"] == "completed"]
    title = "registered SAEs" + (f" + search {parent.info.run_name}" if parent else "")
    plot = plot_l0_vs_ce(points, args.out, title=title)
    logged_to = None
    if args.log:
        if parent is not None:
            client.log_artifact(parent.info.run_id, str(plot), artifact_path="compare")
            logged_to = parent.info.run_id
        else:
            experiment_id = tracking.ensure_experiment("saeforge/compare", uri)
            with mlflow.start_run(experiment_id=experiment_id, run_name=f"compare-{time.strftime('%Y%m%d-%H%M%S')}"):
                mlflow.log_artifact(str(plot), artifact_path="compare")
                mlflow.log_dict({"champions": champions}, "compare/champions.json")
                logged_to = mlflow.active_run().info.run_id
    return {"champions": champions, "trials": trials, "plot": str(plot), "logged_to": logged_to, "tracking_uri": uri}


# -- command line ------------------------------------------------------------------------------------

def add_compare_parser(sub) -> None:
    p = sub.add_parser(
        "compare", help="table and L0-vs-CE-loss-recovered plot of the registered champions (and a search's trials)",
        description="Print one row per registered SAE model (its champion, else its latest version) and, with "
                    "--search, every trial of a search; plot L0 against CE loss recovered with each variant's "
                    "Pareto frontier and log the plot to MLflow.")
    p.add_argument("--model", default="", help="only this model's registered SAEs (e.g. gemma-3-270m)")
    p.add_argument("--hook", default="", help="only this hook point (e.g. blocks.6.hook_resid_post)")
    p.add_argument("--search", default="", metavar="RUN_ID", help="also list and plot this search's trials "
                   "(the parent run id `saeforge tune` prints)")
    p.add_argument("--out", default=CompareArgs.out, help="plot file (default %(default)s)")
    p.add_argument("--no-log", dest="log", action="store_false", help="do not log the plot to MLflow")
    p.add_argument("--json", action="store_true", help="print the tables as JSON")
    p.set_defaults(func=cmd_compare)


def cmd_compare(ns: argparse.Namespace) -> int:
    from saeforge.tuning import format_rows

    result = run_compare(CompareArgs(model=ns.model, hook=ns.hook, search=ns.search, out=ns.out, log=ns.log))
    if ns.json:
        print(json.dumps(result, indent=2, default=str))
        return 0
    if result["champions"]:
        print(format_rows(result["champions"], ["name", "version", "alias", "variant", "ce_loss_recovered", "l0"]))
    else:
        print("saeforge: no registered SAEs" + (" match" if ns.model or ns.hook else " yet"))
    if result["trials"]:
        print(f"\nsearch {ns.search}:")
        print(format_rows(result["trials"], [k for k in result["trials"][0] if k != "run_id"]))
    logged = f" (logged to MLflow run {result['logged_to']})" if result["logged_to"] else ""
    print(f"\nplot: {result['plot']}{logged}")
    return 0
