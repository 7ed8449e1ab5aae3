"""What a verb prints: progress lines on stderr (so stdout holds only the summary, and with
--json only the JSON: `saeforge train --json | jq` works), the summary on stdout."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator


def quiet_libraries() -> None:
    """Keep the libraries' informational chatter (MLflow's store migrations, download bars,
    registration notices; Ray's start-up notes) off the terminal: errors still show."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported
    # transformers' "Loading weights" / "Writing model shards" bars (first-time model preparation):
    # the run prints its own phase lines. Both libraries read this when first imported...
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "huggingface_hub" in sys.modules:  # ...and one imported already is told directly
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    for name in ("mlflow", "ray", "alembic"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="mlflow")


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def summary_only_on_stdout(enabled: bool) -> Iterator[None]:
    """While the verb runs, send everything written to stdout (by any library, at the level of
    the file descriptor) to stderr, so that stdout ends up holding only the summary printed after."""
    if not enabled:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def print_json(data) -> None:
    print(json.dumps(data, indent=2, default=str), flush=True)


def variant_list() -> str:
    import variants

    return "\n".join(f"  {name:<18} {variants.get(name).description}" for name in variants.names())


def not_logged(log: bool) -> str:
    """Why eval / browse did not log to MLflow."""
    return "saeforge: not logged to MLflow (" + ("--no-log" if not log else "no run: pass --run-id") + ")"
