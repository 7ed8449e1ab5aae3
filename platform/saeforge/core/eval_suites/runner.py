"""Running suites in this process: the EvalContext an SAE needs, suite options from the command
line, one suite or several, and the flat metrics and printed report of their results. The jobs
layer adds MLflow and Ray on top (`saeforge.jobs.eval`)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import variants
from saeforge.core import eval_suites
from saeforge.core.eval_suites.context import EvalContext, SuiteResult
from saeforge.core.hooks import HookPoint
from saeforge.core.model import load_tokenizer, load_whole_model, resolve_model
from saeforge.core.reporting import format_rows
from saeforge.core.sae_files import SaeMeta
from saeforge.errors import UserError


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


def build_context(
    sae: variants.Variant,
    cfg: dict,
    model=None,
    tokenizer=None,
    *,
    model_name: str = "",
    dataset: str = "",
    batch_contexts: int = 8,
    progress=None,
) -> EvalContext:
    """The EvalContext for an SAE: the model named in its cfg.json (or model_name), loaded whole
    unless an already loaded one is given."""
    meta = SaeMeta.from_cfg(cfg)
    name = model_name or meta.model_name
    if not name:
        raise UserError("the SAE's cfg.json names no model_name: pass --model")
    if model is None or tokenizer is None:
        spec = resolve_model(name)
        tokenizer = tokenizer or load_tokenizer(spec)
        model = model if model is not None else load_whole_model(spec)
    sae.eval()
    return EvalContext(
        model=model,
        tokenizer=tokenizer,
        sae=sae,
        hook=HookPoint.parse(meta.hook_name),
        context_size=meta.context_size,
        dataset=dataset or meta.dataset_path or "wiki",
        batch_contexts=batch_contexts,
        progress=progress,
    )


def run_one(ctx: EvalContext, suite: str, options: dict | None = None) -> SuiteResult:
    started = time.perf_counter()
    result = eval_suites.get(suite).run(ctx, **(options or {}))
    result.seconds = time.perf_counter() - started
    return result


def run_local(
    ctx: EvalContext, names: list[str], options: dict[str, dict], progress: Callable[[str], None] | None = None
) -> dict[str, SuiteResult]:
    """Every named suite, one after the other, on one loaded model."""
    results = {}
    for name in names:
        if progress:
            progress(f"saeforge: eval {name}...")
        results[name] = run_one(ctx, name, options.get(name))
    return results


def flat_metrics(results: dict[str, SuiteResult]) -> dict[str, float]:
    """{'eval/<suite>/<metric>': value} for every finite number (what MLflow receives)."""
    out = {}
    for suite, result in results.items():
        for key, value in result.metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                out[f"eval/{suite}/{key}"] = float(value)
        out[f"eval/{suite}/seconds"] = float(result.seconds)
    return out


def format_report(results: dict[str, SuiteResult]) -> str:
    """The summary table (each suite's headline metrics and wall time), then each suite's tables."""
    rows = []
    for suite, result in results.items():
        keys = result.headline or tuple(result.metrics)
        rows += [{"suite": suite, "metric": key, "value": result.metrics.get(key, math.nan)} for key in keys]
        rows.append({"suite": suite, "metric": "wall time (s)", "value": f"{result.seconds:.1f}"})
    parts = [format_rows(rows, ["suite", "metric", "value"])]
    for suite, result in results.items():
        for title, table in result.tables.items():
            if table:
                parts.append(f"\n{suite}: {title}\n" + format_rows(table, list(table[0])))
    return "\n".join(parts)
