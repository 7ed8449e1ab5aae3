"""`saeforge bench`: benchmarks measured side by side in one run (`saeforge.bench.modes`)."""

from __future__ import annotations

import argparse

from saeforge.cli.flags import parse_into, verb_parser
from saeforge.cli.output import print_json, summary_only_on_stdout
from saeforge.jobs.arguments import BenchArgs

NAME = "bench"


def add_parser(sub) -> None:
    verb_parser(
        sub,
        NAME,
        BenchArgs,
        run,
        help="measure producer, SAE and end-to-end throughput side by side",
        description="Benchmark on one model/layer: plain single-process slice forward vs Ray producers, SAE "
        "training alone, and end to end vs a plain loop; or one mode of its own (at most one of --same-work, "
        "--layers, --search, --step-cost, --variants).",
        json_help="print the figures as JSON",
    )


def run(ns: argparse.Namespace) -> int:
    from saeforge.bench.modes import runner

    bench = runner(parse_into(BenchArgs, ns))  # bad input is one line before anything runs
    with summary_only_on_stdout(ns.json):
        figures = bench()
    if ns.json:
        print_json(figures)
    return 0
