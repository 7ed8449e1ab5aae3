"""The producer actor class, alone and inside a Ray Data actor pool."""

import numpy as np
import torch

from saeforge import corpus
from saeforge.activations import ActivationProducer, ProducerSpec, activation_dataset
from saeforge.hooks import HookPoint, capture
from saeforge.model import ByteTokenizer, load_model, resolve_model

TEXTS = [f"Article {i}: the quick brown fox jumps over the lazy dog. " * (1 + i % 3) for i in range(30)]


def contexts(n=None):
    tok = ByteTokenizer()
    return corpus.pack_contexts(TEXTS, tok, 32, n or 1000), corpus.special_ids(tok)


def test_producer_emits_only_real_tokens_with_the_full_models_values():
    ctx, special = contexts()
    hook = HookPoint(2)
    producer = ActivationProducer(ProducerSpec(resolve_model("tiny"), (hook,), tuple(special), threads=1))
    out = producer({"input_ids": ctx[:4]})
    mask = corpus.valid_mask(ctx[:4], special)
    assert out[hook.name].shape == (mask.sum(), 64)
    full = load_model(resolve_model("tiny"))
    with torch.no_grad(), capture(full, [hook]) as want:
        full(input_ids=torch.from_numpy(ctx[:4]).long())
    np.testing.assert_allclose(out[hook.name], want[hook.name][torch.from_numpy(mask)].numpy(), rtol=1e-5, atol=1e-5)


def test_context_layout_keeps_order_and_mask():
    ctx, special = contexts()
    hook = HookPoint(1)
    producer = ActivationProducer(ProducerSpec(resolve_model("tiny"), (hook,), tuple(special), "contexts", threads=1))
    out = producer({"input_ids": ctx[:3]})
    assert out[hook.name].shape == (3, 32, 64)
    assert out["mask"].tolist() == corpus.valid_mask(ctx[:3], special).tolist()


def test_ray_data_actor_pool_streams_every_real_token(ray_session):
    ctx, special = contexts()
    hook = HookPoint(2)
    spec = ProducerSpec(resolve_model("tiny"), (hook,), tuple(special), threads=1)
    ds = activation_dataset(ctx, spec, producers=2, batch_contexts=4, cpus_per_producer=0.5)
    rows = sum(len(b[hook.name]) for b in ds.iter_batches(batch_size=None, batch_format="numpy"))
    assert rows == corpus.valid_mask(ctx, special).sum()
