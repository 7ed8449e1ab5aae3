"""Fault injection for the fault tests: the one testing hook in production code.

A run's processes call `reached(point, n)` where a crash is worth testing: rank 0 of the Train
workers before each training step (`WORKER_STEP`), a producer actor before each batch and while
it loads the model (`PRODUCER_BATCH`, 0). Nothing happens unless the environment variable
SAEFORGE_FAULTS names a folder holding `<point>.json`, the faults armed at that point (`arm`
adds one); the tests set it before Ray starts, so every Ray process inherits it. At an armed
`at` the process exits at once (os._exit: no exception, no clean-up, as an out-of-memory kill or
a lost node ends it), or with `hang` stops there until it is killed. With a `marker` file a fault
fires once per run: the process that fires creates the marker (holding its Ray node id), which
disarms the processes restarted after it; without one it fires every time (a crash that recurs).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

ENV = "SAEFORGE_FAULTS"
WORKER_STEP = "worker_step"
PRODUCER_BATCH = "producer_batch"


def reached(point: str, n: int) -> None:
    """Exit (or hang) here if a fault is armed for `point` at `n`; otherwise do nothing."""
    folder = os.environ.get(ENV)
    if not folder:
        return
    try:
        armed = json.loads((Path(folder) / f"{point}.json").read_text())
    except FileNotFoundError:
        return
    for fault in armed:
        if n == fault["at"] and fires(fault["marker"]):
            while fault["hang"]:
                time.sleep(1)
            os._exit(1)


def fires(marker: str) -> bool:
    """Whether a fault fires now: always without a marker; with one, only in the first process
    to get here (it creates the marker, with its Ray node id)."""
    if not marker:
        return True
    try:
        with open(marker, "x") as handle:
            handle.write(_node_id())
    except FileExistsError:
        return False
    return True


@contextlib.contextmanager
def arm(point: str, at: int, marker: str | Path = "", hang: bool = False) -> Iterator[None]:
    """While the block runs, processes reaching `point` at `at` fail as `reached` describes
    (SAEFORGE_FAULTS must name a folder, and must have named it when Ray started). Faults armed
    at the same point together each fire on their own."""
    path = Path(os.environ[ENV]) / f"{point}.json"
    fault = {"at": at, "marker": str(marker), "hang": hang}
    armed = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps([*armed, fault]))
    try:
        yield
    finally:
        left = [f for f in json.loads(path.read_text()) if f != fault] if path.exists() else []
        if left:
            path.write_text(json.dumps(left))
        else:
            path.unlink(missing_ok=True)


def _node_id() -> str:
    """The Ray node this process runs on ("" outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
