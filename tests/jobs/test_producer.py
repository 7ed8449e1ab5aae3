"""The producer actor class, alone and inside a Ray Data actor pool: a row of the stream is one
whole context (its id, its activations, its mask), in the order of the contexts."""

import numpy as np
import pytest
import torch

from saeforge.core import corpus
from saeforge.core.hooks import HookPoint, capture
from saeforge.core.model import ByteTokenizer, load_model, resolve_model
from saeforge.jobs.data.activation_stream import ActivationProducer, activation_dataset, step_batches, worker_dataset
from saeforge.jobs.plan import StreamSpec

TEXTS = [f"Article {i}: the quick brown fox jumps over the lazy dog. " * (1 + i % 3) for i in range(30)]


def contexts(n=None):
    tok = ByteTokenizer()
    return corpus.pack_contexts(TEXTS, tok, 32, n or 1000), corpus.special_ids(tok)


def spec(hook, special, per_step=4, workers=1, precision="float32"):
    return StreamSpec(resolve_model("tiny"), (hook,), tuple(special), 32, per_step, workers, precision=precision)


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


def test_a_bfloat16_producer_on_the_cpu_runs_its_matmuls_in_bf16_and_stays_close_to_fp32():
    """--precision bfloat16 on a CPU: the slice's weights stay fp32, its linear layers compute in
    bf16 (autocast), and the emitted activations are fp32 within a bf16 matmul's error of the
    fp32 producer's (the residual stream and the norms stay fp32)."""
    ctx, special = contexts()
    hook = HookPoint(2)
    exact = ActivationProducer(spec(hook, special))
    fast = ActivationProducer(spec(hook, special, precision="bfloat16"))
    assert next(fast.model.parameters()).dtype == torch.float32
    seen = []
    first_linear = next(m for m in fast.model.modules() if isinstance(m, torch.nn.Linear))
    first_linear.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    batch = {"context_id": np.arange(4), "input_ids": ctx[:4]}
    got, want = fast(batch)[hook.name], exact(batch)[hook.name]
    assert seen == [torch.bfloat16] and got.dtype == np.float32
    mask = corpus.valid_mask(ctx[:4], special)
    relative = np.linalg.norm(got[mask] - want[mask], axis=-1) / np.linalg.norm(want[mask], axis=-1)
    assert 0 < relative.mean() < 0.02  # bf16 keeps 8 bits of mantissa: differences of ~0.4-1%


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
    assert all(acts.shape == (4, 32, 64) and mask.shape == (4, 32) and not mask[:, 0].any() for acts, mask, _ in steps)
    assert [ids.tolist() for _, _, ids in steps] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


def test_two_workers_read_the_contexts_one_worker_would_at_each_step(ray_session):
    """Exact data order with data parallelism: two producers stream into Ray Train's split (with
    the ingest options the trainer gives it); at every step the two workers hold together the
    contexts one worker would, each its own half: (step * 2 + rank) * 3 up to the next 3."""
    import threading

    ctx, special = contexts(96)
    stream = spec(HookPoint(1), special, per_step=6, workers=2)
    dataset, config = worker_dataset(activation_dataset(ctx, stream, producers=2), stream)
    splits = config.configure({"train": dataset}, world_size=2, worker_handles=None, worker_node_ids=None)
    got: dict[int, list] = {}

    def read(rank):  # step_batches fails on a context out of its place
        try:
            got[rank] = [ids.tolist() for _, _, ids in step_batches(splits[rank]["train"], stream, rank=rank)]
        except RuntimeError as error:
            got[rank] = error

    readers = [threading.Thread(target=read, args=(rank,)) for rank in (0, 1)]
    [r.start() for r in readers]
    [r.join(timeout=120) for r in readers]
    assert not any(isinstance(g, Exception) for g in got.values()), got
    assert len(got[0]) == len(got[1]) == 16
    for step in range(16):
        assert sorted(got[0][step] + got[1][step]) == list(range(6 * step, 6 * step + 6))
        assert got[1][step] == list(range(6 * step + 3, 6 * step + 6))


def test_a_stream_out_of_order_fails_at_once(ray_session):
    """A worker handed contexts that do not belong to its step (here a stream that starts at the
    wrong step) stops with the contexts it got and those it expected."""
    ctx, special = contexts(8)
    stream = spec(HookPoint(1), special, per_step=4)
    batches = step_batches(activation_dataset(ctx, stream, producers=1, first_id=4), stream)
    with pytest.raises(RuntimeError, match=r"worker 0 got contexts \[4, 5, 6, 7\] for step 0, where contexts 0..3"):
        next(batches)
