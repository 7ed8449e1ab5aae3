"""`saeforge eval`: evaluation suites on a registered or saved SAE; a table, a JSON report, MLflow."""

from __future__ import annotations

import argparse

from saeforge.cli.flags import parse_into, verb_parser
from saeforge.cli.output import not_logged, print_json, progress, summary_only_on_stdout
from saeforge.core import eval_suites
from saeforge.jobs.arguments import EvalArgs

NAME = "eval"


def _option_text(value) -> str:
    if isinstance(value, tuple):
        return ",".join(_option_text(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else repr(value) if isinstance(value, str) else str(value)


def suite_help() -> str:
    lines = []
    for name in eval_suites.names():
        suite = eval_suites.get(name)
        lines.append(f"  {name:<16} {suite.description}")
        opts = ", ".join(f"{k}={_option_text(v)}" for k, v in suite.options().items())
        lines.append(f"  {'':<16} options: {opts}")
    return "\n".join(lines)


def add_parser(sub) -> None:
    verb_parser(
        sub,
        NAME,
        EvalArgs,
        run,
        help="evaluate a registered or saved SAE (core, probing, disentanglement, unlearning, ...)",
        description="Evaluate an SAE with the real model: print a table, write a JSON report and log the metrics "
        "(eval/<suite>/<metric>) to the SAE's MLflow run.",
        epilog="suites (set options with --set SUITE.OPTION=VALUE; tuples comma-separated):\n" + suite_help(),
        json_help="print only the report, as JSON, on stdout",
    )


def run(ns: argparse.Namespace) -> int:
    from saeforge.jobs.eval import run_eval

    args = parse_into(EvalArgs, ns)
    with summary_only_on_stdout(ns.json):
        report = run_eval(args, progress=progress)
    if ns.json:
        print_json({k: v for k, v in report.items() if k != "table"})
        return 0
    print(report["table"])
    print(f"\nsaeforge: report written to {report['report_file']}")
    if report["logged"]:
        print(f"saeforge: metrics logged to MLflow run {report['run_id']} as eval/<suite>/<metric>")
    else:
        print(not_logged(args.log))
    return 0
