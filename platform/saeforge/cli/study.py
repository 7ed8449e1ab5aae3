"""`saeforge study SEED`: a seed paper's comparison at matched L0, with a verdict per claim."""

from __future__ import annotations

import argparse

from saeforge.cli.flags import parse_into, verb_parser
from saeforge.cli.output import print_json, progress, summary_only_on_stdout
from saeforge.core.reporting import format_rows
from saeforge.jobs.arguments import StudyArgs

NAME = "study"


def add_parser(sub) -> None:
    verb_parser(
        sub,
        NAME,
        StudyArgs,
        run,
        help="re-run a seed paper's comparison at matched L0 and write a report with a verdict per claim",
        description="Produce the activations once; bring the paper's variant, its baselines and the modern "
        "references (topk, matryoshka_batchtopk) to each target L0 with a Ray Tune search over their "
        "sparsity coefficient; train every final SAE at --seeds seeds; evaluate each with every suite; "
        "log the study as an MLflow parent run with one child run per SAE and write a Markdown report "
        "with tables and plots. Default scale and rules: docs/study.md.",
    )


def run(ns: argparse.Namespace) -> int:
    from saeforge.jobs.study.driver import run_study

    with summary_only_on_stdout(ns.json):
        summary = run_study(parse_into(StudyArgs, ns), progress=progress)
    if ns.json:
        print_json(summary)
        return 0
    print(
        f"\nsaeforge: study done in {summary['seconds'] / 60:.1f} min: {len(summary['saes'])} SAEs on "
        f"{summary['tokens']:,} activation tokens produced once; parent run {summary['parent_run_id']}"
    )
    keys = ["paper", "claim", "target_l0", "sae", "baseline", "sae_value", "baseline_value", "claimed", "verdict"]
    print(format_rows(summary["verdicts"], keys))
    print()
    keys = ["variant", "target_l0", "seeds", "core/l0", "l0_matched", "core/ce_loss_recovered", "unlearning/score"]
    print(format_rows(summary["rows"], keys))
    failed = [s for s in summary["saes"] if s.get("error")]
    for s in failed:
        print(f"  failed: {s['job']}: {s['error']}")
    print(f"\n  report {summary['report']}")
    print(f"  browse with mlflow ui --backend-store-uri {summary['tracking_uri']}")
    return 0
