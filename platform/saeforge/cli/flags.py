"""Flags from the argument model: every verb's flags and help are generated from the fields of
the dataclass its driver takes (`saeforge.jobs.arguments`), never typed out again here."""

from __future__ import annotations

import argparse
import dataclasses

from saeforge.errors import UserError
from saeforge.jobs.arguments import flag_name, split_pair

KINDS = {"int": int, "float": float, "str": str, "bool": bool, "list": list}


def _pair(text: str) -> tuple[str, str]:
    try:
        return split_pair(text)
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One flag (or positional argument) per field of the dataclass `cls`."""
    defaults = cls()  # every field has a default (a list's comes from a factory)
    for f in dataclasses.fields(cls):
        meta, kind = f.metadata, KINDS[f.type if isinstance(f.type, str) else f.type.__name__]
        default = getattr(defaults, f.name)
        extra = {k: meta[k] for k in ("choices", "metavar") if k in meta}
        if meta.get("positional"):
            parser.add_argument(f.name, help=meta["help"], **extra)
        elif meta.get("pairs"):
            parser.add_argument(
                flag_name(f), dest=f.name, action="append", type=_pair, default=[], help=meta["help"], **extra
            )
        elif kind is bool:
            flag = flag_name(f)
            if default:  # on by default: the flag turns it off
                flag = "--no-" + flag[2:]
            parser.add_argument(flag, dest=f.name, action="store_false" if default else "store_true", help=meta["help"])
        else:
            parser.add_argument(flag_name(f), dest=f.name, type=kind, default=default, help=meta["help"], **extra)


def parse_into(cls, ns: argparse.Namespace):
    """The dataclass `cls` from the parsed flags."""
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})


def verb_parser(
    sub,
    name: str,
    cls,
    run,
    *,
    help: str,
    description: str,
    epilog: str = "",
    json_help: str = "print only the summary, as JSON, on stdout",
) -> argparse.ArgumentParser:
    """A verb's parser: its flags from `cls`, --json, and `run` as what the verb does."""
    p = sub.add_parser(
        name,
        help=help,
        description=description,
        epilog=epilog or None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_flags(p, cls)
    p.add_argument("--json", action="store_true", help=json_help)
    p.set_defaults(run=run)
    return p
