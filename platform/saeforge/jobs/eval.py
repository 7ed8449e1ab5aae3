"""The driver of `saeforge eval`: resolve MODEL_URI to a saved SAE, load the model it reads, run the
chosen evaluation suites, print a table, write a JSON report and log the metrics to the SAE's run.

MODEL_URI is a registered version (`models:/NAME@ALIAS`, `models:/NAME/VERSION`), a run
(`runs:/RUN_ID`, the SAE the run logged as its `sae_model`, or `runs:/RUN_ID/PATH`) or a saved SAE
folder (cfg.json + sae_weights.safetensors). Metrics go to the MLflow run that produced the SAE
as `eval/<suite>/<metric>` (with the full report as the artifact eval/report.json); a bare folder
is logged only when --run-id names a run.

`run_suites` runs them in this process (`core.eval_suites.runner`) or, with `use_ray=True`, every
suite as its own Ray task, each loading the model itself.
Input mistakes (unknown suite or option, unreadable URI) raise UserError before any model loads.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import variants
from saeforge.core import eval_suites, sae_files
from saeforge.core.eval_suites import SuiteResult
from saeforge.core.eval_suites.runner import (
    build_context,
    flat_metrics,
    format_report,
    parse_options,
    run_local,
    run_one,
)
from saeforge.core.sae_files import CFG_FILE, SaeMeta, load_sae
from saeforge.errors import UserError
from saeforge.jobs.arguments import EvalArgs, check_ranges
from saeforge.jobs.checks import check_sae_fits_model
from saeforge.jobs.runtime.ray_cluster import connect_ray, cores
from saeforge.jobs.tracking import mlflow_runs, registry, store

MODELS_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))")
RUNS_URI = re.compile(r"runs:/(?P<run>[0-9A-Za-z]+)(?:/(?P<path>.+))?")
REPORT_ARTIFACT = "eval/report.json"


# -- what MODEL_URI names ----------------------------------------------------------------------------


@dataclass
class ResolvedSAE:
    sae: variants.Variant
    cfg: dict  # cfg.json: model_name, hook_name, context_size, dataset_path, saeforge section
    run_id: str | None  # the MLflow run to log to (None: do not log)
    label: str  # names the default report file


def _mlflow_error(uri: str, err: Exception) -> UserError:
    return UserError(f"cannot read '{uri}': {str(err).splitlines()[0] if str(err) else type(err).__name__}")


def _load_downloaded(uri: str, artifact_uri: str) -> tuple[variants.Variant, dict]:
    import mlflow

    with tempfile.TemporaryDirectory(prefix="saeforge-eval-") as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=tmp))
        except Exception as err:  # MlflowException, OSError: all mean "cannot read it"
            raise _mlflow_error(uri, err) from None
        found = sorted(local.rglob(CFG_FILE)) if local.is_dir() else []
        if not found:
            raise UserError(f"cannot read '{uri}': no saved SAE ({CFG_FILE}) in its artifacts")
        return load_sae(found[0].parent)


def resolve_sae(uri: str, run_id: str = "") -> ResolvedSAE:
    """Load the SAE that MODEL_URI names, and find the MLflow run its metrics belong to."""
    if match := MODELS_URI.fullmatch(uri):
        store.require_store(uri)
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        name, alias, number = match["name"], match["alias"], match["version"]
        client = MlflowClient()
        try:
            if alias:
                version = client.get_model_version_by_alias(name, alias)
            else:
                version = client.get_model_version(name, number)
        except MlflowException as err:
            raise _mlflow_error(uri, err) from None
        sae, cfg = _load_downloaded(uri, f"models:/{name}/{version.version}")
        return ResolvedSAE(sae, cfg, run_id or version.run_id, f"{name}_v{version.version}")
    if match := RUNS_URI.fullmatch(uri):
        store.require_store(uri)
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        try:
            MlflowClient().get_run(match["run"])
        except MlflowException as err:
            raise _mlflow_error(uri, err) from None
        sae, cfg = _load_downloaded(uri, f"runs:/{match['run']}/{match['path'] or registry.MODEL_NAME}")
        return ResolvedSAE(sae, cfg, run_id or match["run"], f"run_{match['run']}")
    if uri.startswith(("models:/", "runs:/")):
        raise UserError(f"cannot read '{uri}': use models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID[/PATH]")
    folder = Path(uri).expanduser()
    if not folder.is_dir():
        raise UserError(f"cannot read '{uri}': not a models:/ or runs:/ URI, nor a saved SAE folder")
    sae, cfg = load_sae(folder)
    return ResolvedSAE(sae, cfg, run_id or None, folder.resolve().name)


def require_run(uri: str, run_id: str) -> None:
    """The MLflow run --run-id names exists, or one line (checked before any long work)."""
    store.require_store(uri)
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient().get_run(run_id)
    except MlflowException as err:
        raise UserError(f"cannot log to run '{run_id}': {str(err).splitlines()[0]}") from None


# -- running suites ----------------------------------------------------------------------------------


def _suite_task(payload: dict, suite: str, options: dict, context_kwargs: dict, threads: int) -> dict:
    """One suite in a Ray task: rebuild the SAE from its bytes, load the model, run, return a dict."""
    import torch

    torch.set_num_threads(threads)
    ctx = build_context(sae_files.from_bytes(payload), payload["cfg"], **context_kwargs)
    return run_one(ctx, suite, options).to_dict()


def run_suites(
    sae: variants.Variant,
    cfg: dict,
    suites: str | list[str] | None = None,
    model=None,
    *,
    tokenizer=None,
    options: dict | list | None = None,
    model_name: str = "",
    dataset: str = "",
    batch_contexts: int = 8,
    use_ray: bool = False,
    address: str = "",
    progress: Callable[[str], None] | None = None,
) -> dict[str, SuiteResult]:
    """Run evaluation suites on an SAE (its cfg.json dict says which model, hook and context size).

    suites: names, 'a,b' or None/'all'; options: {suite: {option: value}} or [('suite.option', 'value')];
    model/tokenizer: already loaded ones to reuse (in-process only). Returns {suite: SuiteResult}.
    """
    names = eval_suites.parse_suites(suites)
    opts = parse_options(options or {})
    if not use_ray:
        ctx = build_context(
            sae,
            cfg,
            model,
            tokenizer,
            model_name=model_name,
            dataset=dataset,
            batch_contexts=batch_contexts,
            progress=progress,
        )
        return run_local(ctx, names, opts, progress)
    import ray

    connect_ray(address)
    payload = ray.put(sae_files.to_bytes(sae, cfg))
    threads = max(1, cores() // len(names))
    task = ray.remote(num_cpus=1)(_suite_task)
    kwargs = {"model_name": model_name, "dataset": dataset, "batch_contexts": batch_contexts}
    if progress:
        progress(f"saeforge: eval {', '.join(names)} as {len(names)} Ray task(s)...")
    futures = {name: task.remote(payload, name, opts.get(name, {}), kwargs, threads) for name in names}
    return {name: SuiteResult.from_dict(ray.get(future)) for name, future in futures.items()}


# -- reporting ---------------------------------------------------------------------------------------


def write_json(path: Path, data: dict) -> None:
    """Write atomically: a reader never sees a half-written report."""
    path = path.expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, default=str)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def log_report(run_id: str, results: dict[str, SuiteResult], report: dict) -> None:
    """Every suite's metrics (`eval/<suite>/<metric>`) and the whole report into the SAE's run."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = mlflow.get_tracking_uri()
    mlflow_runs.log_to_run(uri, run_id, metrics=flat_metrics(results))
    MlflowClient(uri).log_dict(run_id, report, REPORT_ARTIFACT)


def run_eval(args: EvalArgs, progress: Callable[[str], None] | None = print) -> dict:
    """The whole `saeforge eval`: returns the report (also written as JSON and logged)."""
    names = eval_suites.parse_suites(args.suites)  # input mistakes first, before anything loads
    options = parse_options(args.options)
    check_ranges(args)
    resolved = resolve_sae(args.uri, args.run_id)
    if args.log and args.run_id:  # check the run now, not after a long evaluation
        require_run(args.uri, args.run_id)
    meta = SaeMeta.from_cfg(resolved.cfg)
    check_sae_fits_model(resolved.cfg, args.model or meta.model_name)
    if progress:
        progress(
            f"saeforge: evaluating {args.uri} ({resolved.cfg['saeforge']['variant']}, d_sae "
            f"{resolved.cfg['d_sae']}, {meta.hook_name} of {args.model or meta.model_name}) on {', '.join(names)}"
        )
    results = run_suites(
        resolved.sae,
        resolved.cfg,
        names,
        options=options,
        model_name=args.model,
        dataset=args.dataset,
        batch_contexts=args.batch_contexts,
        use_ray=args.use_ray,
        address=args.address,
        progress=progress,
    )
    report = {
        "uri": args.uri,
        "run_id": resolved.run_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "sae": {
            **asdict(meta),
            "d_in": resolved.cfg["d_in"],
            "d_sae": resolved.cfg["d_sae"],
            "variant": resolved.cfg["saeforge"]["variant"],
        },
        "model": args.model or meta.model_name,
        "options": options,
        "suites": {name: result.to_dict() for name, result in results.items()},
    }
    out = Path(args.out or f"eval_{re.sub(r'[^A-Za-z0-9_.-]+', '-', resolved.label)}.json")
    write_json(out, report)
    report["report_file"] = str(out.resolve())
    report["logged"] = bool(args.log and resolved.run_id)
    if report["logged"]:
        from mlflow.exceptions import MlflowException

        try:
            log_report(resolved.run_id, results, report)
        except MlflowException as err:
            raise UserError(
                f"report written to {out}, but logging to MLflow run {resolved.run_id} failed: "
                f"{str(err).splitlines()[0]}"
            ) from None
    report["table"] = format_report(results)
    return report
