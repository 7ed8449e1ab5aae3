"""`saeforge variants`: the registered SAE variants, or one variant's config fields."""

from __future__ import annotations

import argparse
import dataclasses

import variants
from saeforge.cli.output import variant_list
from saeforge.errors import UserError

NAME = "variants"


def add_parser(sub) -> None:
    p = sub.add_parser(
        NAME,
        help="list SAE variants, or one variant's config fields",
        description="List the registered SAE variants; with a name, its config fields.",
    )
    p.add_argument("name", nargs="?", help="show this variant's config fields, defaults and help")
    p.set_defaults(run=run)


def run(ns: argparse.Namespace) -> int:
    if not ns.name:
        print(variant_list())
        return 0
    if ns.name not in variants.names():
        raise UserError(str(variants.UnknownVariant(ns.name)))
    cls = variants.get(ns.name)
    print(f"{ns.name}: {cls.description}  (batches: {cls.batch_layout})")
    for f in dataclasses.fields(cls.Config):
        default = "(from the run)" if f.name in ("d_in", "d_sae") else repr(f.default)
        print(f"  {f.name:<22} {default:<16} {f.metadata.get('help', '')}")
    return 0
