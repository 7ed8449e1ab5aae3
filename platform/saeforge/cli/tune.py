"""`saeforge tune`: Ray Tune searches over tune spaces; the best SAE is registered."""

from __future__ import annotations

import argparse

from saeforge.cli.flags import parse_into, verb_parser
from saeforge.cli.output import print_json, progress, summary_only_on_stdout
from saeforge.core.reporting import format_rows
from saeforge.jobs.arguments import TuneArgs

NAME = "tune"


def add_parser(sub) -> None:
    verb_parser(
        sub,
        NAME,
        TuneArgs,
        run,
        help="search a variant's hyperparameters with Ray Tune; register the best SAE",
        description="Search tune_spaces/VARIANT.yaml (or --space FILE) with Ray Tune on activations produced once "
        "for every trial; log a parent MLflow run with one child run per trial, register the best SAE "
        "and move 'champion' if it beats the current one. Format and rules: docs/tuning.md.",
    )


def run(ns: argparse.Namespace) -> int:
    from saeforge.jobs.tune.driver import run_tune

    with summary_only_on_stdout(ns.json):
        summary = run_tune(parse_into(TuneArgs, ns), progress=progress, verbose=0 if ns.json else 1)
    if ns.json:
        print_json(summary)
        return 0
    acts = summary["activations"]
    print(
        f"\nsaeforge: done in {summary['seconds']:.0f}s; activations: {acts['tokens']:,} tokens from "
        f"{acts['source']} ({acts['producer_batches']} producer batches, {acts['seconds']:.0f}s), "
        "shared by every trial"
    )
    for s in summary["searches"]:
        print(
            f"\n{s['variant']} on {s['hook']}: {s['trials']} trials ({s['trials_completed']} completed, "
            f"{s['trials_early_stopped']} stopped early, {s['trials_failed']} failed) in {s['seconds']:.0f}s; "
            f"parent run {s['parent_run_id']}"
        )
        keys = ["trial_id", "status", *s["params"], "l0", "ce_loss_recovered", "explained_variance", "pareto"]
        print(format_rows(s["rows"], keys))
        for r in s["rows"]:
            if r["error"]:
                print(f"  {r['trial_id']} failed: {r['error']}")
        if s["best"]:
            b = s["best"]
            verdict = "is the new champion" if s["champion"] else "did not become champion"
            print(
                f"  best: {b['trial_id']} (CE loss recovered {b['ce_loss_recovered']:.4f} at L0 {b['l0']:.1f}) "
                f"registered as {s['registered_model']} v{s['version']}, {verdict}: {s['champion_reason']}"
            )
        else:
            print(f"  best: none ({s['champion_reason']})")
        print(f"  table {s['table']} | plot {s['plot']}")
    print(f"\n  browse with mlflow ui --backend-store-uri {summary['tracking_uri']}")
    return 0
