"""A run that failed inside Ray, told in one line: what died or raised, and what the run had
allowed (`--max-failures`). Ray's own errors carry a traceback per hop (worker, controller,
executor); the line keeps the part a user acts on, and the error is chained for a program."""

from __future__ import annotations

import re

from saeforge.errors import RunFailed

LOGS = "/tmp/ray/session_latest/logs"  # where a local Ray keeps the workers' own output


def one_line(err: BaseException | str) -> str:
    """The most telling line of an error (Ray wraps the worker's own exception in its report)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", line):
            return line
    return lines[-1] if lines else type(err).__name__


def _died(err: BaseException) -> str | None:
    """'<actor class> died: <why>' for an actor whose process ended, else None."""
    from ray.exceptions import RayActorError

    if not isinstance(err, RayActorError):
        return None
    text = str(err)
    cls = re.search(r"class_name: (\S+)", text)
    who = cls.group(1) if cls else "an actor"
    if "ActivationProducer" in who:
        who = "a producer actor"
    elif "RayTrainWorker" in who:
        who = "a Train worker"
    why = "its process died (out of memory, a crash or a lost node)" if "process has died" in text else one_line(text)
    return f"{who} died: {why}"


def describe(err: BaseException) -> str:
    """One line for an error out of Ray Data or Ray Train."""
    from ray.train import TrainingFailedError

    worker_failures = getattr(err, "worker_failures", None)
    if isinstance(err, TrainingFailedError) and worker_failures:
        rank, first = min(worker_failures.items())
        return f"rank {rank}: {describe(first)}"
    if isinstance(err, TrainingFailedError) and getattr(err, "controller_failure", None) is not None:
        return describe(err.controller_failure)
    if not type(err).__module__.startswith("ray."):  # the worker's own exception, as it raised it
        return f"{type(err).__name__}: {one_line(err)}"
    return _died(err) or one_line(err)


def run_failed(err: BaseException, max_failures: int) -> RunFailed:
    """The RunFailed to raise from `err` (chain it: `raise run_failed(err, n) from err`)."""
    return RunFailed(
        f"the run failed ({describe(err)}) after the restarts --max-failures {max_failures} allows; Ray's logs: {LOGS}"
    )
