"""The Ray-free training loop on planted sparse features (batches of whole contexts, as the stream
makes them)."""

import copy
import math

import pytest
import torch

import variants
from saeforge.core.training import (
    LoopSettings,
    LoopState,
    effective_warmup,
    estimate_act_scale,
    lr_factor,
    start_fresh,
    train_loop,
)


def planted_batches(n_batches, contexts=8, length=33, d=16, n_features=48, scale=50.0, seed=0):
    """Batches as the stream makes them: whole contexts (contexts, length, d) and a mask whose
    first position (BOS) is false; 8 x 32 = 256 real tokens each."""
    gen = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(n_features, d, generator=gen)
    dictionary /= dictionary.norm(dim=-1, keepdim=True)
    mask = torch.ones(contexts, length, dtype=torch.bool)
    mask[:, 0] = False
    for _ in range(n_batches):
        shape = (contexts, length, n_features)
        codes = torch.rand(shape, generator=gen) * (torch.rand(shape, generator=gen) < 0.06)
        acts = scale * codes @ dictionary
        acts[:, 0] = 1000.0  # BOS activations are huge in a real model; they must never reach the SAE
        yield acts, mask


@pytest.mark.parametrize("name", ["relu", "topk"])
def test_loop_lowers_the_loss_on_planted_features(name):
    overrides = {"lr": "3e-3", "warmup_steps": "10"} | ({"k": "4"} if name == "topk" else {})
    variant = variants.build(name, d_in=16, d_sae=64, overrides=overrides)
    logs = []
    state = train_loop(
        variant,
        start_fresh(variant, planted_batches(300)),
        LoopSettings(300, log_every=30),
        on_log=lambda s, m: logs.append(m),
    )
    assert state.step == 300 and state.tokens_seen == 300 * 256
    assert logs[-1]["loss"] < 0.5 * logs[0]["loss"]
    assert logs[-1]["explained_variance"] > 0.7
    assert {"l0", "dead_fraction", "tokens_per_s", "loss/mse"} <= set(logs[-1])


def test_act_scale_makes_mean_norm_sqrt_d_over_real_tokens():
    x = torch.randn(10, 100, 64) * 37.0
    mask = torch.ones(10, 100, dtype=torch.bool)
    mask[:, 0] = False
    x[:, 0] = 1e5  # BOS: excluded from the estimate
    scaled = x[mask] * estimate_act_scale(x, mask)
    assert scaled.norm(dim=-1).mean().item() == pytest.approx(8.0, rel=1e-4)


def test_start_fresh_sets_the_scale_from_the_first_batch_and_keeps_it():
    variant = variants.build("relu", d_in=16, d_sae=32)
    batches = list(planted_batches(3))
    again = list(start_fresh(variant, iter(batches)))
    assert len(again) == 3 and again[0][0] is batches[0][0]  # the first batch is still trained on
    acts, mask = batches[0]
    assert variant.act_scale.item() == pytest.approx(estimate_act_scale(acts, mask))


def test_checkpoints_follow_the_cadence_and_resume_the_optimizer():
    variant = variants.build("relu", d_in=16, d_sae=32)
    snaps = []
    settings = LoopSettings(12, checkpoint_every=5)
    train_loop(variant, start_fresh(variant, planted_batches(12)), settings, on_checkpoint=snaps.append)
    assert [s.step for s in snaps] == [5, 10, 12]
    resumed = LoopState(snaps[1].step, snaps[1].tokens_seen, snaps[1].optimizer, snaps[1].scheduler)
    final = train_loop(variant, planted_batches(12), settings, state=resumed)
    assert final.step == 12 and final.tokens_seen == 12 * 256


def test_the_state_tallies_the_contexts_trained_and_a_checkpoint_keeps_the_tally(tmp_path):
    """Batches that carry their context ids: the loop counts them (count, sum, sum of squares)
    into the state, checkpoints carry the tally, and a resumed loop goes on from it."""
    from saeforge.core.sae_files import SaeMeta
    from saeforge.jobs.train.checkpoints import load_checkpoint, save_checkpoint

    def with_ids(batches):
        for step, (acts, mask) in enumerate(batches):
            yield acts, mask, torch.arange(8 * step, 8 * step + 8)

    variant = variants.build("relu", d_in=16, d_sae=32)
    snaps = []
    settings = LoopSettings(6, checkpoint_every=3)
    final = train_loop(
        variant, start_fresh(variant, with_ids(planted_batches(6))), settings, on_checkpoint=snaps.append
    )
    ids = range(48)
    assert (final.contexts.count, final.contexts.id_sum, final.contexts.id_square_sum) == (
        48,
        sum(ids),
        sum(i * i for i in ids),
    )
    assert snaps[0].contexts.count == 24  # a snapshot, not the running tally
    save_checkpoint(tmp_path / "ck", [(variant, snaps[0], SaeMeta("tiny", "h", 1, 33, "wiki"))], {})
    ((_, state),) = load_checkpoint(tmp_path / "ck", ["h"])
    assert state.contexts == snaps[0].contexts
    later = (b for step, b in enumerate(with_ids(planted_batches(6))) if step >= 3)
    assert train_loop(variant, later, settings, state=state).contexts == final.contexts


def test_nan_loss_stops_the_loop():
    variant = variants.build("relu", d_in=16, d_sae=32)
    bad = [(torch.full((2, 8, 16), float("nan")), torch.ones(2, 8, dtype=torch.bool))]
    with pytest.raises(FloatingPointError):
        train_loop(variant, bad, LoopSettings(1))


def test_lr_schedule_warmup_and_cosine():
    assert lr_factor(0, 10, 100, "constant") == pytest.approx(0.1)
    assert lr_factor(50, 10, 100, "constant") == 1.0
    assert lr_factor(100, 10, 100, "cosine") == pytest.approx(0.0, abs=1e-9)
    assert lr_factor(55, 10, 100, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(79, 10, 100, "decay") == 1.0
    assert lr_factor(80, 10, 100, "decay") == pytest.approx(1.0)
    assert lr_factor(90, 10, 100, "decay") == pytest.approx(0.5)
    assert lr_factor(99, 10, 100, "decay") == pytest.approx(0.05)
    assert effective_warmup(variants.build("relu", d_in=4, d_sae=8), 200) == 20
    with pytest.raises(variants.ConfigError, match="lr_schedule"):
        variants.build("relu", d_in=4, d_sae=8, overrides={"lr_schedule": "linear"})


def test_side_by_side_trains_each_sae_exactly_as_it_trains_alone():
    """k SAEs on the k hooks of the same contexts (one model pass): each gets its own optimiser,
    schedule, state, logs and checkpoints, and ends with the weights it reaches trained alone on
    its activations; the steps' counts and context tally are shared."""
    from saeforge.core.training import start_fresh_side_by_side, train_side_by_side

    def hooks(n):  # two "hooks": different activations of the same contexts, one mask, one id range
        for step, ((a, mask), (b, _)) in enumerate(zip(planted_batches(n, seed=1), planted_batches(n, seed=2))):
            yield (a, 2 * b), mask, torch.arange(8 * step, 8 * step + 8)

    def build():
        return [
            variants.build("relu", d_in=16, d_sae=32, overrides={"lr": "3e-3", "warmup_steps": "4"}),
            variants.build("topk", d_in=16, d_sae=32, overrides={"k": "4", "seed": "3"}),
        ]

    settings = LoopSettings(9, log_every=4, checkpoint_every=4)
    together, logs, snaps = build(), [], []
    final = train_side_by_side(
        together,
        start_fresh_side_by_side(together, hooks(9)),
        settings,
        on_log=lambda step, values: logs.append((step, values)),
        on_checkpoint=snaps.append,
    )
    assert [step for step, _ in logs] == [4, 8, 9] and all(len(values) == 2 for _, values in logs)
    assert [[s.step for s in snap] for snap in snaps] == [[4, 4], [8, 8], [9, 9]]
    for i, alone in enumerate(build()):
        alone_logs = []
        state = train_loop(
            alone,
            start_fresh(alone, ((acts[i], mask, ids) for acts, mask, ids in hooks(9))),
            settings,
            on_log=lambda step, values, logged=alone_logs: logged.append(values),
        )
        for name, weight in alone.state_dict().items():
            torch.testing.assert_close(together[i].state_dict()[name], weight, rtol=0, atol=0, msg=name)
        assert (final[i].step, final[i].tokens_seen) == (state.step, state.tokens_seen)
        assert final[i].contexts == state.contexts
        assert [values[i]["loss"] for _, values in logs] == [v["loss"] for v in alone_logs]
    assert final[0].contexts.count == 72


def test_side_by_side_resumes_every_sae_from_its_own_state():
    from saeforge.core.training import start_fresh_side_by_side, train_side_by_side

    def hooks(n, skip=0):
        for step, ((a, mask), (b, _)) in enumerate(zip(planted_batches(n, seed=1), planted_batches(n, seed=2))):
            if step >= skip:
                yield (a, b), mask

    def build():
        return [variants.build("relu", d_in=16, d_sae=32, overrides={"seed": str(s)}) for s in (0, 1)]

    settings = LoopSettings(8, checkpoint_every=3)
    whole = build()
    train_side_by_side(whole, start_fresh_side_by_side(whole, hooks(8)), settings)
    first, snaps = build(), []

    def checkpoint(states):  # what a checkpoint keeps: every SAE's weights and loop state
        snaps.append(copy.deepcopy((first, states)))  # as saved to disk: the optimizer state goes on changing

    train_side_by_side(first, start_fresh_side_by_side(first, hooks(8)), settings, on_checkpoint=checkpoint)
    saes, states = snaps[0]
    assert [s.step for s in states] == [3, 3]
    resumed = train_side_by_side(saes, hooks(8, skip=3), settings, states=states)
    assert [s.step for s in resumed] == [8, 8]
    for a, b in zip(whole, saes):
        for name, weight in a.state_dict().items():
            torch.testing.assert_close(b.state_dict()[name], weight, msg=name)
