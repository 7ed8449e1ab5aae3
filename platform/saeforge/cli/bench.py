"""`saeforge bench`: throughput of each stage side by side, a per-variant table, or step costs."""

from __future__ import annotations

import argparse

import variants
from saeforge.cli.flags import parse_into, verb_parser
from saeforge.cli.output import print_json, summary_only_on_stdout
from saeforge.errors import UserError
from saeforge.jobs.arguments import BenchArgs

NAME = "bench"


def add_parser(sub) -> None:
    verb_parser(
        sub,
        NAME,
        BenchArgs,
        run,
        help="measure producer, SAE and end-to-end throughput side by side",
        description="Benchmark on one model/layer: plain single-process slice forward vs Ray "
        "producers, SAE training alone, and end to end vs a plain loop; or (--layers) one run of "
        "several layers vs one run per layer; or (--search N) an N-trial search vs its N trials as separate runs.",
        json_help="print the figures as JSON",
    )


def run(ns: argparse.Namespace) -> int:
    from saeforge.bench import stages as bench

    args = parse_into(BenchArgs, ns)
    if not args.layers:
        bench.check_one_layer(args)
    with summary_only_on_stdout(ns.json):
        if args.layers:
            from saeforge.bench.layers import run_layers_bench

            figures = run_layers_bench(args)
        elif args.same_work:
            from saeforge.bench.same_work import run_same_work

            figures = run_same_work(args)
        elif args.search:
            from saeforge.bench.search import run_search_bench

            figures = run_search_bench(args)
        elif args.step_cost:
            figures = bench.run_step_costs(args)
        elif args.variants:
            names = variants.names() if args.variants == "all" else [n.strip() for n in args.variants.split(",")]
            for name in names:  # unknown names fail before anything runs
                if name not in variants.names():
                    raise UserError(str(variants.UnknownVariant(name)))
            figures = bench.run_variant_table(args, names)
        else:
            figures = bench.run_bench(args)
    if ns.json:
        print_json(figures)
    return 0
