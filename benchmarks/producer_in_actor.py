"""The producer's forward in a plain process against the same forward inside a Ray actor: in a
`saeforge bench --same-work` run the producer actor made activations slower than the same
`ActivationProducer` in the plain loop's process (docs/benchmarks.md#same-work-as-a-plain-loop);
this script found why (measured: docs/benchmarks.md#producers-in-a-ray-actor).

Every arm builds the same `ActivationProducer` (the default run's model slice, precision and
threads) and times the same batches of 16 training contexts, one after another, back to back in
one invocation: first in this process, then in a fresh Ray actor left with glibc's own malloc
thresholds, then in a fresh Ray actor as saeforge runs it (`core.allocator.keep_freed_memory`),
each actor with one CPU declared, as Ray Data's producers are, on a local Ray of this process.
Each arm also reports the bare forward (`ActivationProducer.activations`, no Ray call around it),
the CPU its threads used and its process's minor page faults, so a gap can be told apart from
Ray's call overhead, from other processes taking the cores, and from memory paged in again.

    .venv/bin/python benchmarks/producer_in_actor.py [--batches 24] [--threads 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import numpy as np
import torch

from saeforge.jobs.data.activation_stream import BATCH_CONTEXTS, ID_COLUMN, TOKENS_COLUMN, ActivationProducer


class TimedProducer(ActivationProducer):
    """The producer, with the seconds of its bare forwards, its process's CPU time and page faults."""

    def forward_seconds(self, batches: list[dict]) -> tuple[float, float, int]:
        """(wall, CPU) seconds and the minor page faults of the bare forwards of `batches`."""
        wall, cpu = time.perf_counter(), time.process_time()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for batch in batches:
            self.activations(torch.from_numpy(np.asarray(batch[TOKENS_COLUMN], dtype=np.int64)))
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        return time.perf_counter() - wall, time.process_time() - cpu, faults


class GlibcDefaultsProducer(TimedProducer):
    """The same, its process left with glibc's own malloc thresholds (saeforge.core.allocator):
    the producer's call to keep freed memory is skipped in this actor's process only."""

    def __init__(self, *args, **kwargs):
        from saeforge.jobs.data import activation_stream

        activation_stream.keep_freed_memory = lambda: False
        super().__init__(*args, **kwargs)


def local_call(producer: TimedProducer):
    return lambda name, *args: getattr(producer, name)(*args)


def actor_call(actor):
    import ray

    return lambda name, *args: ray.get(getattr(actor, name).remote(*args))


def side(call, batches: list[dict]) -> dict:
    call("__call__", batches[0])  # warm-up: the first batch is not timed
    started = time.perf_counter()
    for batch in batches[1:]:
        call("__call__", batch)
    calls = time.perf_counter() - started
    wall, cpu, faults = call("forward_seconds", batches[1:])
    n = len(batches) - 1
    return {"call_ms": calls / n * 1000, "forward_ms": wall / n * 1000, "forward_cpu": cpu / wall, "faults": faults}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=24, help="batches of 16 contexts (the first is a warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the producer (default 2)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import ray

    from saeforge.jobs.arguments import TrainArgs
    from saeforge.jobs.validate import plan_train

    plan, contexts = plan_train(TrainArgs(tokens=BATCH_CONTEXTS * 128 * (args.batches + 2)), lambda *_: None)
    ids = np.asarray(contexts.train.pack())[: BATCH_CONTEXTS * args.batches]
    batches = [
        {ID_COLUMN: np.arange(i, i + BATCH_CONTEXTS), TOKENS_COLUMN: ids[i : i + BATCH_CONTEXTS]}
        for i in range(0, len(ids), BATCH_CONTEXTS)
    ]
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    what = f"{BATCH_CONTEXTS} contexts, {plan.stream.precision}, {args.threads} threads"
    print(f"{len(batches) - 1} timed batches of {what}")
    print("| round | where | ms per producer call | ms per bare forward | CPU cores of the forward | page faults |")
    print("|---|---|---|---|---|---|")
    plain_producer = TimedProducer(plan.stream, threads=args.threads)  # this process keeps freed memory from here on
    arms = (("Ray actor, glibc's thresholds", GlibcDefaultsProducer), ("Ray actor", TimedProducer))
    for r in range(1, args.rounds + 1):
        rows = [("plain process", side(local_call(plain_producer), batches))]
        for where, cls in arms:
            actor = ray.remote(num_cpus=1)(cls).remote(plan.stream, threads=args.threads)
            rows.append((where, side(actor_call(actor), batches)))
            ray.kill(actor)
        for where, s in rows:
            print(
                f"| {r} | {where} | {s['call_ms']:.0f} | {s['forward_ms']:.0f} | {s['forward_cpu']:.2f} | "
                f"{s['faults']:,} |"
            )
        plain = rows[0][1]
        for where, s in rows[1:]:
            call, forward = (s[k] / plain[k] for k in ("call_ms", "forward_ms"))
            print(f"| {r} | {where} / plain process | {call:.2f}x | {forward:.2f}x | | |")
    print(f"(pid {os.getpid()}; other processes on the machine are not controlled)")


if __name__ == "__main__":
    main()
