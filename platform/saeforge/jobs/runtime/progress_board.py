"""Progress lines from Ray Train workers to the driver, through a small named actor.

saeforge starts Ray with `log_to_driver=False`: Ray's forwarding of every worker's output
(controller tracebacks about autoscaler requests, raylet start-up warnings, Ray Data execution
plans, deprecation notices) drowned a run's own progress. Rank 0 posts its progress lines to a
board actor instead; the driver prints them on stderr while the run trains, so stdout holds only
the summary (and with --json only the JSON).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

from saeforge.jobs.runtime.ray_cluster import on_this_node


def _board_class():
    import ray

    @ray.remote(num_cpus=0)
    class ProgressBoard:
        def __init__(self):
            self.lines: list[str] = []

        def post(self, line: str) -> None:
            self.lines.append(line)

        def take(self) -> list[str]:
            lines, self.lines = self.lines, []
            return lines

    return ProgressBoard


def post(board: str, line: str) -> None:
    """Post a line to the named board (fire and forget; nothing when there is no board)."""
    if not board:
        return
    import ray

    with contextlib.suppress(ValueError):  # the board is gone (nobody listens): the line is not needed
        ray.get_actor(board).post.remote(line)


@contextlib.contextmanager
def printed(board: str, show: Callable[[str], None], every_s: float = 0.5) -> Iterator[str]:
    """A board named `board` (on the driver's node) whose lines `show` prints while the block runs
    (then the rest)."""
    import ray

    actor = _board_class().options(name=board, scheduling_strategy=on_this_node()).remote()
    stop = threading.Event()

    def pump() -> None:
        while not stop.wait(every_s):
            for line in ray.get(actor.take.remote()):
                show(line)

    thread = threading.Thread(target=pump, name="saeforge-progress", daemon=True)
    thread.start()
    try:
        yield board
    finally:
        stop.set()
        thread.join()
        for line in ray.get(actor.take.remote()):
            show(line)
        ray.kill(actor)
