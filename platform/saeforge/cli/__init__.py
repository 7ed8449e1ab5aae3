"""The `saeforge` command line: one module per verb, each adding its own parser and running it;
`--help` on every verb; a user mistake is one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import sys

import variants
from saeforge.cli import bench, browse, compare, evaluate, list_variants, study, train, tune
from saeforge.cli.output import quiet_libraries
from saeforge.errors import RunFailed, UserError

EXIT_USER_ERROR = 2
EXIT_RUN_FAILED = 1
VERBS = (train, tune, study, evaluate, browse, compare, list_variants, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saeforge", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb in VERBS:
        verb.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    quiet_libraries()
    try:
        return ns.run(ns)
    except (UserError, variants.UnknownVariant, variants.ConfigError) as err:
        print(f"saeforge: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except RunFailed as err:
        print(f"saeforge: error: {err}", file=sys.stderr)
        return EXIT_RUN_FAILED
    except KeyboardInterrupt:
        print("saeforge: interrupted", file=sys.stderr)
        return 130
