"""`saeforge train`: train one SAE (or one per hook), evaluate, register, print where to find them."""

from __future__ import annotations

import argparse

from saeforge.cli.flags import parse_into, verb_parser
from saeforge.cli.output import print_json, progress, summary_only_on_stdout, variant_list
from saeforge.jobs.arguments import TrainArgs

NAME = "train"


def add_parser(sub) -> None:
    verb_parser(
        sub,
        NAME,
        TrainArgs,
        run,
        help="train one SAE per hook: Gemma slice actors -> Ray Train workers -> MLflow registry",
        description="Train one SAE on a model's activations, evaluate it on held-out text, log it to "
        "MLflow, register it and move the 'champion' alias if it beats the current one. With several "
        "layers (--layer 3,6,9) one model pass trains one SAE per hook, each evaluated, logged, "
        "registered and judged on its own.",
        epilog="variants:\n" + variant_list(),
    )


def run(ns: argparse.Namespace) -> int:
    from saeforge.jobs.train.driver import run_train

    with summary_only_on_stdout(ns.json):
        summary = run_train(parse_into(TrainArgs, ns), progress=progress)
    if ns.json:
        print_json(summary)
        return 0
    print(f"\nsaeforge: done in {summary['seconds']:.0f}s")
    print("  time              " + " | ".join(f"{k} {v:.0f}s" for k, v in summary["phase_seconds"].items()))
    print(f"  producers         the model slice in {summary['producer_precision']} (--precision)")
    hooks = summary["hooks"]
    if len(hooks) > 1:
        acts = summary["activations"]
        print(
            f"  one model pass    {acts['contexts_forwarded']} contexts in {acts['producer_batches']} producer "
            f"forwards for the {len(hooks)} SAEs (checkpoint {summary['checkpoint']})"
        )
    for hook in hooks:
        if len(hooks) > 1:
            print(f"\n  {hook['hook']}")
        print_hook(hook)
    print(f"  browse with       mlflow ui --backend-store-uri {summary['tracking_uri']}")
    return 0


def print_hook(summary: dict) -> None:
    """One SAE's lines: its evaluation, MLflow run, registered version and champion decision."""
    m = summary["metrics"]
    print(
        f"  CE loss recovered {m['ce_loss_recovered']:.4f} +- {m.get('ce_loss_recovered_stderr', 0):.4f} | "
        f"L0 {m['l0']:.1f} | explained variance {m['explained_variance']:.3f} | KL {m['kl_div_sae']:.4f} "
        f"(on {m.get('eval_tokens', 0):.0f} held-out tokens)"
    )
    print(
        f"  silent latents    {m['dead_fraction_train']:.3f} over the last 50k training tokens, "
        f"{m['dead_fraction']:.3f} on the held-out text"
    )
    print(f"  MLflow run        {summary['run_id']} (experiment {summary['experiment_id']})")
    print(f"  registered model  {summary['registered_model']} version {summary['version']}")
    verdict = "is the new champion" if summary["champion"] else "did not become champion"
    print(f"  champion          version {summary['version']} {verdict}: {summary['champion_reason']}")
    ref = "@champion" if summary["champion"] else f"/{summary['version']}"
    print(f"  load it with      mlflow.pyfunc.load_model('models:/{summary['registered_model']}{ref}')")
    print(f"  checkpoint        {summary['checkpoint']}")
