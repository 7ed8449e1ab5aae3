"""`saeforge browse`: the feature browser of a registered or saved SAE, as a static site."""

from __future__ import annotations

import argparse

from saeforge.cli.flags import parse_into, verb_parser
from saeforge.cli.output import not_logged, print_json, progress, summary_only_on_stdout
from saeforge.jobs.arguments import BrowseArgs

NAME = "browse"


def add_parser(sub) -> None:
    verb_parser(
        sub,
        NAME,
        BrowseArgs,
        run,
        help="write a feature browser (static HTML site) for a registered or saved SAE",
        description="Run the SAE over held-out text on Ray producer actors and write a self-contained site: an "
        "overview (L0, firing frequencies, dead and dense latents, decoder cosines, groups or levels, a sortable "
        "latent table) and a page per chosen latent (top and quantile contexts, activation histogram, promoted and "
        "suppressed tokens, similar latents). The site is logged to the SAE's MLflow run under browser/.",
        json_help="print only the summary, as JSON, on stdout",
    )


def run(ns: argparse.Namespace) -> int:
    from saeforge.jobs.browse import run_browse

    args = parse_into(BrowseArgs, ns)
    with summary_only_on_stdout(ns.json):
        summary = run_browse(args, progress=progress)
    if ns.json:
        print_json({k: v for k, v in summary.items() if k != "stats"})
        return 0
    memory = {k: v / 1024 for k, v in summary["peak_memory_mb"].items()}
    print(
        f"saeforge: {summary['pages']} latent pages over {summary['tokens']:,} tokens "
        f"({summary['dead']} latents never fired), {summary['seconds']:.0f} s; peak memory "
        f"{memory['driver']:.2f} GiB driver, {memory['producer']:.2f} GiB per producer"
    )
    print(f"saeforge: feature browser written to {summary['index']}")
    if summary["logged"]:
        print(f"saeforge: logged to MLflow run {summary['run_id']} as {summary['artifact_path']}")
    else:
        print(not_logged(args.log))
    return 0
