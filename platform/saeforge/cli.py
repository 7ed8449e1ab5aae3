"""The `saeforge` command line: one verb per job, `--help` on each, one-line errors (exit 2)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import variants
from saeforge.errors import UserError
from saeforge.hooks import SITES

EXIT_USER_ERROR = 2


def _key_value(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got '{text}'")
    name, value = text.split("=", 1)
    return name.strip(), value.strip()


def _variant_list() -> str:
    return "\n".join(f"  {name:<18} {variants.get(name).description}" for name in variants.names())


def add_train_parser(sub) -> None:
    from saeforge.train_job import TrainArgs

    d = TrainArgs()
    p = sub.add_parser(
        "train", help="train one SAE: Gemma slice actors -> Ray Train workers -> MLflow registry",
        description="Train one SAE on a model's activations, evaluate it on held-out text, log it to "
                    "MLflow, register it and move the 'champion' alias if it beats the current one.",
        epilog="variants:\n" + _variant_list(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=d.model,
                   help="'gemma-3-270m' (packaged, default), 'tiny' / 'tiny-gemma2' (random, for tests), "
                        "a Hugging Face id (e.g. google/gemma-2-2b) or a local model folder")
    p.add_argument("--layer", type=int, default=int(d.hook), help="layer whose output is hooked (default %(default)s)")
    p.add_argument("--site", default="resid_post", choices=sorted(SITES), help="what to read at that layer")
    p.add_argument("--variant", default=d.variant, help="SAE variant (see below; default %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", type=_key_value, default=[], metavar="NAME=VALUE",
                   help="set a variant config field (repeatable; `saeforge variants NAME` lists them)")
    p.add_argument("--tokens", type=int, default=d.tokens, help="activation tokens to train on (default %(default)s)")
    p.add_argument("--d-sae", type=int, default=d.d_sae, help="number of latents (default 8 x d_in)")
    p.add_argument("--dataset", default=d.dataset,
                   help="'wiki' (built-in Wikipedia summaries), a datasets Hub id, or local .txt/.jsonl/.parquet")
    p.add_argument("--text-column", default=d.text_column, help="text column of a dataset (default %(default)s)")
    p.add_argument("--context-size", type=int, default=d.context_size, help="tokens per context (default %(default)s)")
    p.add_argument("--producers", type=int, default=d.producers, help="model-slice actors (default %(default)s)")
    p.add_argument("--workers", type=int, default=d.workers, help="data-parallel SAE workers (default %(default)s)")
    p.add_argument("--eval-contexts", type=int, default=d.eval_contexts,
                   help="held-out contexts for evaluation (default %(default)s)")
    p.add_argument("--eval", dest="eval_suites", default="", metavar="SUITES",
                   help="more evaluation suites after the core one, e.g. probing,unlearning or all "
                        "(see `saeforge eval --help`)")
    p.add_argument("--max-l0", type=float, default=d.max_l0,
                   help="highest L0 a champion may have (default d_in / 2)")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints")
    p.add_argument("--log-every", type=int, default=d.log_every, help="steps between progress lines and metrics")
    p.add_argument("--storage", default=d.storage, help="folder for Ray Train runs and checkpoints")
    p.add_argument("--run-name", default="", help="name of the run (default: variant-hook-time)")
    p.add_argument("--address", default="", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--resume", default="", metavar="PATH",
                   help="resume from a checkpoint folder or a run folder under --storage (other flags ignored)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_train)


def cmd_train(ns: argparse.Namespace) -> int:
    from saeforge.train_job import TrainArgs, run_train

    names = {f.name for f in dataclasses.fields(TrainArgs)}
    values = {k: v for k, v in vars(ns).items() if k in names}
    values["hook"] = f"{ns.site}:{ns.layer}"
    values["overrides"] = dict(ns.overrides)
    summary = run_train(TrainArgs(**values))
    if ns.json:
        print(json.dumps(summary, indent=2))
        return 0
    m = summary["metrics"]
    print(f"\nsaeforge: done in {summary['seconds']:.0f}s")
    print(f"  CE loss recovered {m['ce_loss_recovered']:.4f} | L0 {m['l0']:.1f} | explained variance "
          f"{m['explained_variance']:.3f} | KL {m['kl_div_sae']:.4f} | dead {m['dead_fraction']:.3f}")
    print(f"  MLflow run        {summary['run_id']} (experiment {summary['experiment_id']})")
    print(f"  registered model  {summary['registered_model']} version {summary['version']}")
    verdict = "is the new champion" if summary["champion"] else "did not become champion"
    print(f"  champion          version {summary['version']} {verdict}: {summary['champion_reason']}")
    ref = "@champion" if summary["champion"] else f"/{summary['version']}"
    print(f"  load it with      mlflow.pyfunc.load_model('models:/{summary['registered_model']}{ref}')")
    print(f"  checkpoint        {summary['checkpoint']}")
    print(f"  browse with       mlflow ui --backend-store-uri {summary['tracking_uri']}")
    return 0


def add_variants_parser(sub) -> None:
    p = sub.add_parser("variants", help="list SAE variants, or one variant's config fields",
                       description="List the registered SAE variants; with a name, its config fields.")
    p.add_argument("name", nargs="?", help="show this variant's config fields, defaults and help")
    p.set_defaults(func=cmd_variants)


def cmd_variants(ns: argparse.Namespace) -> int:
    if not ns.name:
        print(_variant_list())
        return 0
    cls = variants.get(ns.name) if ns.name in variants.names() else None
    if cls is None:
        raise UserError(str(variants.UnknownVariant(ns.name)))
    print(f"{ns.name}: {cls.description}  (batches: {cls.batch_layout})")
    for f in dataclasses.fields(cls.Config):
        default = "(from the run)" if f.name in ("d_in", "d_sae") else repr(f.default)
        print(f"  {f.name:<22} {default:<16} {f.metadata.get('help', '')}")
    return 0


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure producer, SAE and end-to-end throughput side by side",
                       description="Benchmark on one model/layer: plain single-process slice forward vs Ray "
                                   "producers, SAE training alone, and end to end vs a plain loop.")
    p.add_argument("--model", default="gemma-3-270m", help="model (default %(default)s)")
    p.add_argument("--layer", type=int, default=6, help="hooked layer (default %(default)s)")
    p.add_argument("--tokens", type=int, default=60_000, help="tokens per measurement (default %(default)s)")
    p.add_argument("--d-sae", type=int, default=0, help="SAE width (default 8 x d_in)")
    p.add_argument("--variant", default="relu", help="variant (default %(default)s)")
    p.add_argument("--producers", type=int, default=1, help="producer actors (default %(default)s)")
    p.add_argument("--variants", default="", metavar="all|A,B",
                   help="instead: one full training run per variant and a comparison table")
    p.add_argument("--eval-contexts", type=int, default=16, help="held-out contexts per variant run (--variants)")
    p.add_argument("--step-cost", action="store_true",
                   help="instead: milliseconds per optimiser step of every variant on the same activations")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(func=cmd_bench)


def cmd_bench(ns: argparse.Namespace) -> int:
    from saeforge.bench import run_bench, run_variant_table

    if ns.step_cost:
        from saeforge.bench import run_step_costs

        costs = run_step_costs(ns.model, ns.layer, ns.d_sae)
        print(json.dumps(costs, indent=2) if ns.json else "")
        return 0
    if ns.variants:
        names = variants.names() if ns.variants == "all" else [n.strip() for n in ns.variants.split(",")]
        for name in names:
            variants.get(name)  # unknown names fail before anything runs
        rows = run_variant_table(ns.model, ns.layer, ns.tokens, ns.d_sae, names, ns.eval_contexts)
        print(json.dumps(rows, indent=2) if ns.json else "")
        return 0
    figures = run_bench(model=ns.model, layer=ns.layer, tokens=ns.tokens, d_sae=ns.d_sae, variant=ns.variant,
                        producers=ns.producers)
    print(json.dumps(figures, indent=2) if ns.json else "")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saeforge", description=__doc__.split("\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    add_train_parser(sub)
    add_variants_parser(sub)
    add_bench_parser(sub)
    from saeforge.eval_job import add_eval_parser

    add_eval_parser(sub)
    from saeforge.compare import add_compare_parser
    from saeforge.tuning import add_tune_parser

    add_tune_parser(sub)
    add_compare_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return ns.func(ns)
    except (UserError, variants.UnknownVariant, variants.ConfigError) as err:
        print(f"saeforge: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("saeforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
