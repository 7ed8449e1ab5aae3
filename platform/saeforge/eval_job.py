"""The driver of `saeforge eval`: resolve MODEL_URI to a saved SAE, load the model it reads, run the
chosen evaluation suites, print a table, write a JSON report and log the metrics to the SAE's run.

MODEL_URI is a registered version (`models:/NAME@ALIAS`, `models:/NAME/VERSION`), a run
(`runs:/RUN_ID`, the SAE folder the run logged under `sae/`, or `runs:/RUN_ID/PATH`) or a saved SAE
folder (cfg.json + sae_weights.safetensors). Metrics go to the MLflow run that produced the SAE
as `eval/<suite>/<metric>` (with the full report as the artifact eval/report.json); a bare folder
is logged only when --run-id names a run.

`run_suites` is the in-process entry point (what a training or Tune driver calls at the end of a
run); with `use_ray=True` every suite runs as its own Ray task, each loading the model itself.
Input mistakes (unknown suite or option, unreadable URI) raise UserError before any model loads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import variants
from saeforge import eval_suites, tracking
from saeforge.errors import UserError
from saeforge.eval_suites import EvalContext, SuiteResult

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


def _check_store(uri: str) -> None:
    """Refuse (instead of creating an empty SQLite store) when no MLflow store is there."""
    store = tracking.tracking_uri()
    if store.startswith("sqlite:///") and not Path(store[len("sqlite:///"):]).is_file():
        raise UserError(f"cannot read '{uri}': no MLflow store at {store} (set MLFLOW_TRACKING_URI or run where "
                        "the SAE was trained)")
    tracking.use_store()


def _load_downloaded(uri: str, artifact_uri: str) -> tuple[variants.Variant, dict]:
    import mlflow

    from saeforge.sae_io import CFG_FILE, load_sae

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
    from saeforge.sae_io import load_sae

    if match := MODELS_URI.fullmatch(uri):
        _check_store(uri)
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
        _check_store(uri)
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        try:
            MlflowClient().get_run(match["run"])
        except MlflowException as err:
            raise _mlflow_error(uri, err) from None
        sae, cfg = _load_downloaded(uri, f"runs:/{match['run']}/{match['path'] or 'sae'}")
        return ResolvedSAE(sae, cfg, run_id or match["run"], f"run_{match['run']}")
    if uri.startswith(("models:/", "runs:/")):
        raise UserError(f"cannot read '{uri}': use models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID[/PATH]")
    folder = Path(uri).expanduser()
    if not folder.is_dir():
        raise UserError(f"cannot read '{uri}': not a models:/ or runs:/ URI, nor a saved SAE folder")
    sae, cfg = load_sae(folder)
    return ResolvedSAE(sae, cfg, run_id or None, folder.resolve().name)


# -- running suites ----------------------------------------------------------------------------------

def parse_options(pairs: list[tuple[str, str]] | dict) -> dict[str, dict]:
    """[('probing.train_size', '100'), ...] or {'probing': {...}} -> {'probing': {'train_size': 100}},
    each value coerced to the type of the option's default."""
    out: dict[str, dict] = {}
    items = pairs.items() if isinstance(pairs, dict) else pairs
    for key, value in items:
        if isinstance(value, dict):  # already grouped by suite
            for name, v in value.items():
                out.setdefault(key, {})[name] = eval_suites.coerce_option(key, name, v)
            continue
        suite, _, name = key.partition(".")
        if not name:
            raise UserError(f"expected SUITE.OPTION=VALUE, got '{key}={value}'")
        eval_suites.get(suite)
        out.setdefault(suite, {})[name] = eval_suites.coerce_option(suite, name, value)
    return out


def build_context(sae: variants.Variant, cfg: dict, model=None, tokenizer=None, *, model_name: str = "",
                  dataset: str = "", batch_contexts: int = 8, progress=None) -> EvalContext:
    """The EvalContext for an SAE: the model named in its cfg.json (or model_name), loaded whole."""
    from saeforge.activations import producer_device
    from saeforge.hooks import HookPoint
    from saeforge.model import load_model, load_tokenizer, resolve_model

    name = model_name or cfg.get("model_name")
    if not name:
        raise UserError("the SAE's cfg.json names no model_name: pass --model")
    if model is None or tokenizer is None:
        spec = resolve_model(name)
        if tokenizer is None:
            tokenizer = load_tokenizer(spec)
        if model is None:
            device, dtype = producer_device()
            model = load_model(spec, dtype=dtype, device=device)
    sae.eval()
    return EvalContext(model=model, tokenizer=tokenizer, sae=sae, hook=HookPoint.parse(cfg["hook_name"]),
                       context_size=int(cfg.get("context_size", 128)),
                       dataset=dataset or cfg.get("dataset_path") or "wiki", batch_contexts=batch_contexts,
                       progress=progress)


def run_one(ctx: EvalContext, suite: str, options: dict | None = None) -> SuiteResult:
    started = time.perf_counter()
    result = eval_suites.get(suite).run(ctx, **(options or {}))
    result.seconds = time.perf_counter() - started
    return result


def _payload(sae: variants.Variant, cfg: dict) -> dict:
    from safetensors.torch import save

    return {"cfg": cfg, "weights": save({k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()})}


def _suite_task(payload: dict, suite: str, options: dict, context_kwargs: dict, threads: int) -> dict:
    """One suite in a Ray task: rebuild the SAE from its bytes, load the model, run, return a dict."""
    import torch
    from safetensors.torch import load

    torch.set_num_threads(threads)
    own = payload["cfg"]["saeforge"]
    sae = variants.from_config_dict(own["variant"], own["config"])
    sae.load_state_dict(load(payload["weights"]))
    ctx = build_context(sae, payload["cfg"], **context_kwargs)
    return run_one(ctx, suite, options).to_dict()


def run_suites(sae: variants.Variant, cfg: dict, suites: str | list[str] | None = None, model=None, *,
               tokenizer=None, options: dict | list | None = None, model_name: str = "", dataset: str = "",
               batch_contexts: int = 8, use_ray: bool = False, address: str = "",
               progress: Callable[[str], None] | None = None) -> dict[str, SuiteResult]:
    """Run evaluation suites on an SAE (its cfg.json dict says which model, hook and context size).

    suites: names, 'a,b' or None/'all'; options: {suite: {option: value}} or [('suite.option', 'value')];
    model/tokenizer: already loaded ones to reuse (in-process only). Returns {suite: SuiteResult}.
    """
    names = eval_suites.parse_suites(suites)
    opts = parse_options(options or {})
    if not use_ray:
        ctx = build_context(sae, cfg, model, tokenizer, model_name=model_name, dataset=dataset,
                            batch_contexts=batch_contexts, progress=progress)
        results = {}
        for name in names:
            if progress:
                progress(f"saeforge: eval {name}...")
            results[name] = run_one(ctx, name, opts.get(name))
        return results
    import ray

    from saeforge.train_job import connect_ray

    connect_ray(address)
    payload = ray.put(_payload(sae, cfg))
    threads = max(1, (os.cpu_count() or 1) // len(names))
    task = ray.remote(num_cpus=1)(_suite_task)
    kwargs = {"model_name": model_name, "dataset": dataset, "batch_contexts": batch_contexts}
    if progress:
        progress(f"saeforge: eval {', '.join(names)} as {len(names)} Ray task(s)...")
    futures = {name: task.remote(payload, name, opts.get(name, {}), kwargs, threads) for name in names}
    return {name: SuiteResult.from_dict(ray.get(future)) for name, future in futures.items()}


# -- reporting ---------------------------------------------------------------------------------------

def flat_metrics(results: dict[str, SuiteResult]) -> dict[str, float]:
    """{'eval/<suite>/<metric>': value} for every finite number (what MLflow receives)."""
    out = {}
    for suite, result in results.items():
        for key, value in result.metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                out[f"eval/{suite}/{key}"] = float(value)
        out[f"eval/{suite}/seconds"] = float(result.seconds)
    return out


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ",".join(_fmt(v) for v in value)
    return str(value)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def format_report(results: dict[str, SuiteResult]) -> str:
    """The summary table (each suite's headline metrics and wall time), then each suite's tables."""
    rows = [["suite", "metric", "value"]]
    for suite, result in results.items():
        keys = result.headline or tuple(result.metrics)
        rows += [[suite, key, _fmt(result.metrics.get(key, float("nan")))] for key in keys]
        rows.append([suite, "wall time (s)", f"{result.seconds:.1f}"])
    parts = [_table(rows)]
    for suite, result in results.items():
        for title, table in result.tables.items():
            if table:
                header = list(table[0])
                body = [[_fmt(r.get(k)) for k in header] for r in table]
                parts.append(f"\n{suite}: {title}\n" + _table([header] + body))
    return "\n".join(parts)


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


def log_to_run(run_id: str, results: dict[str, SuiteResult], report: dict) -> None:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in flat_metrics(results).items()]
    for start in range(0, len(metrics), 500):  # MLflow caps one batch at 1000 metrics
        client.log_batch(run_id, metrics=metrics[start:start + 500])
    client.log_dict(run_id, report, REPORT_ARTIFACT)


@dataclass
class EvalArgs:
    """Everything `saeforge eval` accepts (the CLI's flags map one to one)."""

    uri: str
    suites: str = "all"
    out: str = ""  # default ./eval_<name>.json
    run_id: str = ""
    model: str = ""  # default: cfg.json's model_name
    dataset: str = ""  # default: cfg.json's dataset_path
    options: list = field(default_factory=list)  # [('suite.option', 'value')]
    batch_contexts: int = 8
    use_ray: bool = False
    address: str = ""
    log: bool = True


def run_eval(args: EvalArgs, progress: Callable[[str], None] | None = print) -> dict:
    """The whole `saeforge eval`: returns the report (also written as JSON and logged)."""
    names = eval_suites.parse_suites(args.suites)  # input mistakes first, before anything loads
    options = parse_options(args.options)
    if args.batch_contexts < 1:
        raise UserError("--batch-contexts must be at least 1")
    resolved = resolve_sae(args.uri, args.run_id)
    if args.log and args.run_id:  # check the run now, not after a long evaluation
        _check_store(args.uri)
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        try:
            MlflowClient().get_run(args.run_id)
        except MlflowException as err:
            raise UserError(f"cannot log to run '{args.run_id}': {str(err).splitlines()[0]}") from None
    if progress:
        progress(f"saeforge: evaluating {args.uri} ({resolved.cfg['saeforge']['variant']}, d_sae "
                 f"{resolved.cfg['d_sae']}, {resolved.cfg['hook_name']} of {args.model or resolved.cfg['model_name']}) "
                 f"on {', '.join(names)}")
    results = run_suites(resolved.sae, resolved.cfg, names, options=options, model_name=args.model,
                         dataset=args.dataset, batch_contexts=args.batch_contexts, use_ray=args.use_ray,
                         address=args.address, progress=progress)
    report = {
        "uri": args.uri, "run_id": resolved.run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "sae": {k: resolved.cfg.get(k) for k in ("model_name", "hook_name", "context_size", "dataset_path", "d_in",
                                                  "d_sae")} | {"variant": resolved.cfg["saeforge"]["variant"]},
        "model": args.model or resolved.cfg.get("model_name"), "options": options,
        "suites": {name: result.to_dict() for name, result in results.items()},
    }
    out = Path(args.out or f"eval_{re.sub(r'[^A-Za-z0-9_.-]+', '-', resolved.label)}.json")
    write_json(out, report)
    report["report_file"] = str(out.resolve())
    report["logged"] = bool(args.log and resolved.run_id)
    if report["logged"]:
        from mlflow.exceptions import MlflowException

        try:
            log_to_run(resolved.run_id, results, report)
        except MlflowException as err:
            raise UserError(f"report written to {out}, but logging to MLflow run {resolved.run_id} failed: "
                            f"{str(err).splitlines()[0]}") from None
    report["table"] = format_report(results)
    return report


# -- command line ------------------------------------------------------------------------------------

def _option_pair(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected SUITE.OPTION=VALUE, got '{text}'")
    name, value = text.split("=", 1)
    return name.strip(), value.strip()


def _option_text(value) -> str:
    if isinstance(value, tuple):
        return ",".join(_option_text(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else repr(value) if isinstance(value, str) else str(value)


def _suite_help() -> str:
    lines = []
    for name in eval_suites.names():
        suite = eval_suites.get(name)
        lines.append(f"  {name:<16} {suite.description}")
        opts = ", ".join(f"{k}={_option_text(v)}" for k, v in suite.options().items())
        lines.append(f"  {'':<16} options: {opts}")
    return "\n".join(lines)


def add_eval_parser(sub) -> None:
    p = sub.add_parser(
        "eval", help="evaluate a registered or saved SAE (core, probing, disentanglement, unlearning, ...)",
        description="Evaluate an SAE with the real model: print a table, write a JSON report and log the metrics "
                    "(eval/<suite>/<metric>) to the SAE's MLflow run.",
        epilog="suites (set options with --set SUITE.OPTION=VALUE; tuples comma-separated):\n" + _suite_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("uri", metavar="MODEL_URI",
                   help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID[/PATH] or a saved SAE folder")
    p.add_argument("--suite", dest="suites", default="all",
                   help=f"comma-separated suites, or 'all' (default; known: {', '.join(eval_suites.names())})")
    p.add_argument("--out", default="", help="JSON report file (default ./eval_<name>.json)")
    p.add_argument("--run-id", default="", help="MLflow run to log to (required to log a bare SAE folder)")
    p.add_argument("--no-log", dest="log", action="store_false", help="do not log to MLflow")
    p.add_argument("--model", default="", help="model to run (default: model_name in the SAE's cfg.json)")
    p.add_argument("--dataset", default="",
                   help="text source of the held-out contexts of core and disentanglement "
                        "(default: the SAE's training source)")
    p.add_argument("--set", dest="options", action="append", type=_option_pair, default=[],
                   metavar="SUITE.OPTION=VALUE", help="a suite option (repeatable; options listed below)")
    p.add_argument("--batch-contexts", type=int, default=8, help="sequences per activation forward pass")
    p.add_argument("--ray", dest="use_ray", action="store_true", help="run each suite as its own Ray task")
    p.add_argument("--address", default="", help="Ray cluster address with --ray (default: RAY_ADDRESS, else local)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_eval)


def cmd_eval(ns: argparse.Namespace) -> int:
    import sys

    args = EvalArgs(uri=ns.uri, suites=ns.suites, out=ns.out, run_id=ns.run_id, model=ns.model, dataset=ns.dataset,
                    options=ns.options, batch_contexts=ns.batch_contexts, use_ray=ns.use_ray, address=ns.address,
                    log=ns.log)
    report = run_eval(args, progress=None if ns.json else lambda m: print(m, file=sys.stderr, flush=True))
    if ns.json:
        print(json.dumps({k: v for k, v in report.items() if k != "table"}, indent=2, default=str))
        return 0
    print(report["table"])
    print(f"\nsaeforge: report written to {report['report_file']}")
    if report["logged"]:
        print(f"saeforge: metrics logged to MLflow run {report['run_id']} as eval/<suite>/<metric>")
    else:
        print("saeforge: not logged to MLflow (" + ("--no-log" if not args.log else "no run: pass --run-id") + ")")
    return 0
