"""The producer actor class, alone and inside a Ray Data actor pool: a row of the stream is one
whole context (its id, its activations, its mask), in the order of the contexts."""

import numpy as np
import torch

from saeforge.core import corpus
from saeforge.core.hooks import HookPoint, capture
from saeforge.core.model import ByteTokenizer, load_model, resolve_model
from saeforge.jobs.activation_stream import ActivationProducer, activation_dataset, step_batches
from saeforge.jobs.plan import StreamSpec

TEXTS = [f"Article {i}: the quick brown fox jumps over the lazy dog. " * (1 + i % 3) for i in range(30)]


def contexts(n=None):
    tok = ByteTokenizer()
    return corpus.pack_contexts(TEXTS, tok, 32, n or 1000), corpus.special_ids(tok)


def spec(hook, special, per_step=4, workers=1):
    return StreamSpec(resolve_model("tiny"), (hook,), tuple(special), 32, per_step, workers)


def test_producer_emits_whole_contexts_with_the_full_models_values_and_mask():
    ctx, special = contexts()
    hook = HookPoint(2)
    producer = ActivationProducer(spec(hook, special))
    out = producer({"context_id": np.arange(10, 14), "input_ids": ctx[:4]})
    assert out[hook.name].shape == (4, 32, 64) and out["context_id"].tolist() == [10, 11, 12, 13]
    assert out["mask"].tolist() == corpus.valid_mask(ctx[:4], special).tolist()
    full = load_model(resolve_model("tiny"))
    with torch.no_grad(), capture(full, [hook]) as want:
        full(input_ids=torch.from_numpy(ctx[:4]).long())
    np.testing.assert_allclose(out[hook.name], want[hook.name].numpy(), rtol=1e-5, atol=1e-5)


def test_ray_data_actor_pool_streams_every_context_in_order(ray_session):
    ctx, special = contexts()
    hook = HookPoint(2)
    ds = activation_dataset(ctx, spec(hook, special), producers=2, first_id=100)
    ids, real = [], 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        ids += batch["context_id"].tolist()
        real += int(batch["mask"].sum())
    assert ids == list(range(100, 100 + len(ctx)))  # every context once, in order, with two producers
    assert real == corpus.valid_mask(ctx, special).sum()


def test_a_step_reads_whole_contexts(ray_session):
    ctx, special = contexts(12)
    hook = HookPoint(1)
    stream = spec(hook, special, per_step=4)
    steps = list(step_batches(activation_dataset(ctx, stream, producers=1), stream))
    assert len(steps) == 3
    assert all(acts.shape == (4, 32, 64) and mask.shape == (4, 32) and not mask[:, 0].any() for acts, mask in steps)
