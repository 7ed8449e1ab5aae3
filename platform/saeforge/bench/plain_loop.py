"""The plain single-process loop the benchmarks compare saeforge with: the model slice's forward
and the SAE step in one process, no Ray, no MLflow, with saeforge's own pieces for each part
(the same corpus packing, variant, fresh start, schedule and core evaluation).

    python -m saeforge.bench.plain_loop '<TrainArgs as JSON>'   # the whole plain loop (JSON out)
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import numpy as np
import torch

from saeforge.core.evaluation import evaluate_core
from saeforge.core.model import load_whole_model
from saeforge.core.training import start_fresh, train_loop
from saeforge.jobs.arguments import TrainArgs
from saeforge.jobs.data.activation_stream import BATCH_CONTEXTS, MASK_COLUMN, ActivationProducer
from saeforge.jobs.plan import RunPlan
from saeforge.jobs.runtime.ray_cluster import cores
from saeforge.jobs.validate import plan_train


def forward(producer: ActivationProducer, contexts: np.ndarray) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(activations, mask) per producer batch of contexts, in this process."""
    column = producer.spec.hooks[0].name
    out = []
    for i in range(0, len(contexts), BATCH_CONTEXTS):
        block = contexts[i : i + BATCH_CONTEXTS]
        rows = producer({"context_id": np.arange(len(block)), "input_ids": block})
        out.append((torch.from_numpy(rows[column]), torch.from_numpy(rows[MASK_COLUMN])))
    return out


def steps(blocks: list[tuple[torch.Tensor, torch.Tensor]], per_step: int):
    """Regroup producer batches into steps of `per_step` whole contexts."""
    acts = torch.cat([a for a, _ in blocks])
    mask = torch.cat([m for _, m in blocks])
    for i in range(0, len(acts) - per_step + 1, per_step):
        yield acts[i : i + per_step], mask[i : i + per_step]


def plain_stream(producer: ActivationProducer, contexts: np.ndarray, per_step: int):
    """Forward contexts and cut the activations into steps, in one process (the plain loop)."""
    for i in range(0, len(contexts) - per_step + 1, per_step):
        yield from steps(forward(producer, contexts[i : i + per_step]), per_step)


def train_tokens_per_s(plan: RunPlan, batches) -> float:
    """Real tokens per second of the plan's SAE trained fresh on `batches`, no logging."""
    variant = plan.build_variant()
    start = time.perf_counter()
    state = train_loop(variant, start_fresh(variant, batches), dataclasses.replace(plan.loop, log_every=10**9))
    return state.tokens_seen / (time.perf_counter() - start)


def run_plain_loop(args: TrainArgs) -> dict:
    """The plain single-process loop on `args`' work; returns its figures and phase times."""
    torch.set_num_threads(cores())
    phases, last = {}, time.time()

    def done(phase: str) -> None:
        nonlocal last
        phases[phase], last = time.time() - last, time.time()

    plan, contexts = plan_train(args)
    done("plan")
    producer = ActivationProducer(plan.stream, threads=cores())
    variant = plan.build_variant()
    done("load_slice")
    batches = start_fresh(variant, plain_stream(producer, contexts.train.pack(), plan.stream.contexts_per_step))
    started = time.perf_counter()
    state = train_loop(variant, batches, dataclasses.replace(plan.loop, log_every=10**9))
    train_seconds = time.perf_counter() - started
    done("train")
    del producer
    model = load_whole_model(plan.stream.model)
    metrics = evaluate_core(
        model, variant, plan.hook, contexts.eval, list(plan.stream.special_ids), precision=plan.stream.precision
    )
    done("evaluate")
    return {
        "steps": state.step,
        "tokens_seen": state.tokens_seen,
        "train_tokens_per_s": state.tokens_seen / max(train_seconds, 1e-9),
        "phase_seconds": phases,
        "metrics": {k: metrics[k] for k in ("l0", "explained_variance", "ce_loss_recovered")},
    }


if __name__ == "__main__":
    print(json.dumps(run_plain_loop(TrainArgs(**json.loads(sys.argv[1])))))
