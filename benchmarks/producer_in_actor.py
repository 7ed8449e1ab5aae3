"""The producer's forward in a plain process against the same forward inside a Ray actor (issue 11:
the producer actor makes activations about 20% slower than the same `ActivationProducer` in the
plain loop's process).

Both sides build the same `ActivationProducer` (the default run's model slice, precision and
threads) and time the same batches of 16 training contexts, one after another, back to back in
one invocation: first in this process, then in a Ray actor (one CPU declared, as Ray Data's
producers are) started by a local Ray of this process. Each side also reports the bare forward
(`ActivationProducer.activations`, no Ray call around it) and the CPU its threads used, so a gap
can be told apart from Ray's call overhead and from other processes taking the cores.

    .venv/bin/python benchmarks/producer_in_actor.py [--batches 24] [--threads 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from saeforge.jobs.activation_stream import BATCH_CONTEXTS, ID_COLUMN, TOKENS_COLUMN, ActivationProducer


class TimedProducer(ActivationProducer):
    """The producer, with the seconds of its bare forwards and its process's CPU time."""

    def forward_seconds(self, batches: list[dict]) -> tuple[float, float]:
        """(wall, CPU) seconds of the bare forwards of `batches`, one after another."""
        wall, cpu = time.perf_counter(), time.process_time()
        for batch in batches:
            self.activations(torch.from_numpy(np.asarray(batch[TOKENS_COLUMN], dtype=np.int64)))
        return time.perf_counter() - wall, time.process_time() - cpu


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
    wall, cpu = call("forward_seconds", batches[1:])
    n = len(batches) - 1
    return {"call_ms": calls / n * 1000, "forward_ms": wall / n * 1000, "forward_cpu": cpu / wall}


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
    actor_cls = ray.remote(num_cpus=1)(TimedProducer)
    what = f"{BATCH_CONTEXTS} contexts, {plan.stream.precision}, {args.threads} threads"
    print(f"{len(batches) - 1} timed batches of {what}")
    print("| round | where | ms per producer call | ms per bare forward | CPU cores used by the forward |")
    print("|---|---|---|---|---|")
    for r in range(1, args.rounds + 1):
        plain = side(local_call(TimedProducer(plan.stream, threads=args.threads)), batches)
        actor = actor_cls.remote(plan.stream, threads=args.threads)
        in_actor = side(actor_call(actor), batches)
        ray.kill(actor)
        for where, s in (("plain process", plain), ("Ray actor", in_actor)):
            print(f"| {r} | {where} | {s['call_ms']:.0f} | {s['forward_ms']:.0f} | {s['forward_cpu']:.2f} |")
        call, forward = (in_actor[k] / plain[k] for k in ("call_ms", "forward_ms"))
        print(f"| {r} | Ray actor / plain process | {call:.2f}x | {forward:.2f}x | |")
    print(f"(pid {os.getpid()}; other processes on the machine are not controlled)")


if __name__ == "__main__":
    main()
