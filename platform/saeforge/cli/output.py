"""What a verb prints: progress lines on stderr (so stdout holds only the summary, and with
--json only the JSON: `saeforge train --json | jq` works), the summary on stdout."""

from __future__ import annotations

import json
import sys


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def print_json(data) -> None:
    print(json.dumps(data, indent=2, default=str))


def variant_list() -> str:
    import variants

    return "\n".join(f"  {name:<18} {variants.get(name).description}" for name in variants.names())
