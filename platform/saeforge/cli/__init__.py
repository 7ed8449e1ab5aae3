"""The `saeforge` command line: one module per verb, named as the verb.

  train.py     saeforge train      one SAE per hook: producers -> Ray Train -> MLflow registry
  tune.py      saeforge tune       Ray Tune searches of a variant's tune space
  study.py     saeforge study      a seed paper's comparison at matched L0
  eval.py      saeforge eval       evaluation suites on a registered or saved SAE
  browse.py    saeforge browse     the feature browser (a static site)
  compare.py   saeforge compare    the registered champions side by side
  variants.py  saeforge variants   the registered variants and their config fields
  bench.py     saeforge bench      benchmarks (saeforge.bench)
  flags.py     every verb's flags, generated from its argument dataclass (saeforge.jobs.arguments)
  output.py    progress lines on stderr, the summary (or --json) on stdout

A user mistake is one line on stderr and exit code 2, a run that failed one line and exit 1,
never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from saeforge import __doc__ as ABOUT
from saeforge.cli.output import quiet_libraries
from saeforge.errors import RunFailed, UserError
from saeforge.jobs.tracking.store import redact_text
from variants import ConfigError, UnknownVariant

EXIT_USER_ERROR = 2
EXIT_RUN_FAILED = 1
EXIT_INTERRUPTED = 130
VERBS = ("train", "tune", "study", "eval", "browse", "compare", "variants", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saeforge", description=ABOUT.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb in VERBS:
        importlib.import_module(f"saeforge.cli.{verb}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    quiet_libraries()
    try:
        return ns.run(ns)
    except (UserError, UnknownVariant, ConfigError) as err:
        print(f"saeforge: error: {redact_text(str(err))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except RunFailed as err:
        print(f"saeforge: error: {redact_text(str(err))}", file=sys.stderr)
        return EXIT_RUN_FAILED
    except KeyboardInterrupt:
        print("saeforge: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
