"""`saeforge compare`: the registered champions (and a search's trials) side by side, and a plot."""

from __future__ import annotations

import argparse

from saeforge.cli.flags import parse_into, verb_parser
from saeforge.cli.output import print_json, summary_only_on_stdout
from saeforge.core.reporting import format_rows
from saeforge.jobs.arguments import CompareArgs

NAME = "compare"


def add_parser(sub) -> None:
    verb_parser(
        sub,
        NAME,
        CompareArgs,
        run,
        help="table and L0-vs-CE-loss-recovered plot of the registered champions (and a search's trials)",
        description="Print one row per registered SAE model (its champion, else its latest version) and, with "
        "--search, every trial of a search; plot L0 against CE loss recovered with each variant's "
        "Pareto frontier and log the plot to MLflow.",
        json_help="print the tables as JSON",
    )


def run(ns: argparse.Namespace) -> int:
    from saeforge.jobs.compare import run_compare

    args = parse_into(CompareArgs, ns)
    with summary_only_on_stdout(ns.json):
        result = run_compare(args)
    if ns.json:
        print_json(result)
        return 0
    if result["champions"]:
        print(format_rows(result["champions"], ["name", "version", "alias", "variant", "ce_loss_recovered", "l0"]))
    else:
        print("saeforge: no registered SAEs" + (" match" if args.model or args.hook else " yet"))
    if result["trials"]:
        print(f"\nsearch {args.search}:")
        print(format_rows(result["trials"], [k for k in result["trials"][0] if k != "run_id"]))
    logged = f" (logged to MLflow run {result['logged_to']})" if result["logged_to"] else ""
    print(f"\nplot: {result['plot']}{logged}")
    return 0
