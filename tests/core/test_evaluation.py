"""The core evaluation against an independent computation on the tiny Gemma, with SAELens's
conventions written out by hand: the SAE spliced in at real tokens only, zero ablation at every
position (BOS included), CE of the predictions made at real tokens, KL(clean || patched) at real
positions, explained variance over real tokens with one global mean."""

import numpy as np
import pytest
import torch

import variants
from saeforge.core import corpus
from saeforge.core.evaluation import CORE_METRICS, baseline, bootstrap_stderr, evaluate_core
from saeforge.core.hooks import HookPoint
from saeforge.core.model import ByteTokenizer, build_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

HOOK = HookPoint(2)


@torch.no_grad()
def naive_metrics(model, sae, contexts, special):
    """One context and one position at a time, float64, with a hook registered by hand. A
    token-order variant reads its whole context with BOS/padding zeroed, as it trains."""
    layer = model.model.layers[HOOK.layer]
    ce = {"clean": [], "sae": [], "zero": []}
    kl_sae, kl_zero, rows, recons = [], [], [], []
    for row in contexts:
        ids = torch.from_numpy(row.astype(np.int64))[None]
        real = [int(t) not in special for t in row]
        seen = {}
        handle = layer.register_forward_hook(
            lambda m, i, o, seen=seen: seen.update(x=o[0] if isinstance(o, tuple) else o)
        )
        clean = model(input_ids=ids).logits[0].double()
        handle.remove()
        x = seen["x"][0]
        edited = x.clone()
        if sae.batch_layout == "contexts":
            keep = torch.tensor(real, dtype=x.dtype)[:, None]
            whole = sae.decode(sae.encode((x * sae.act_scale * keep)[None]))[0] / sae.act_scale
        for t in range(len(row)):
            if real[t]:
                one = x[t : t + 1] * sae.act_scale
                edited[t] = (
                    whole[t] if sae.batch_layout == "contexts" else sae.decode(sae.encode(one))[0] / sae.act_scale
                )
                rows.append(x[t].double().numpy())
                recons.append(edited[t].double().numpy())
        logits = {"clean": clean}
        for tag, patched in (("sae", edited), ("zero", torch.zeros_like(x))):
            handle = layer.register_forward_hook(lambda m, i, o, p=patched: p[None])
            logits[tag] = model(input_ids=ids).logits[0].double()
            handle.remove()
        for t in range(len(row)):
            if not real[t]:
                continue
            p = torch.softmax(logits["clean"][t], -1)
            kl_sae.append(float((p * (p.log() - torch.log_softmax(logits["sae"][t], -1))).sum()))
            kl_zero.append(float((p * (p.log() - torch.log_softmax(logits["zero"][t], -1))).sum()))
            if t + 1 < len(row):
                for tag in ce:
                    ce[tag].append(-float(torch.log_softmax(logits[tag][t], -1)[int(row[t + 1])]))
    x, x_hat = np.array(rows), np.array(recons)
    ev = 1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    means = {k: np.mean(v) for k, v in ce.items()}
    return {
        "explained_variance": ev,
        "ce_loss_clean": means["clean"],
        "ce_loss_sae": means["sae"],
        "ce_loss_zero": means["zero"],
        "kl_div_sae": np.mean(kl_sae),
        "kl_div_zero": np.mean(kl_zero),
        "ce_loss_recovered": (means["zero"] - means["sae"]) / (means["zero"] - means["clean"]),
        "mse": ((x - x_hat) ** 2).sum(-1).mean(),
        "eval_tokens": len(x),
    }


@pytest.mark.parametrize(
    "name", ["relu", next(n for n in variants.names() if variants.get(n).batch_layout == "contexts")]
)
def test_core_metrics_match_an_independent_computation(name):
    tok = ByteTokenizer()
    special = corpus.special_ids(tok)
    texts = ["The first held-out text, long enough to fill a context and more.", "A second, shorter one."]
    contexts = corpus.pack_contexts(texts * 3, tok, 40, 6)
    contexts[-1, -5:] = tok.pad_token_id  # some padding, as the last packed context has
    model = build_tiny_model("tiny")
    sae = variants.build(name, d_in=64, d_sae=128, overrides={"seed": "1"})
    sae.act_scale.fill_(0.3)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    ours = evaluate_core(model, sae, HOOK, contexts, special, batch_contexts=4)
    want = naive_metrics(model, sae.eval(), contexts, set(special))
    for key, value in want.items():
        assert ours[key] == pytest.approx(value, rel=2e-4, abs=1e-6), key
    # every figure the evaluation names (what a search may be judged on) is there, and no other
    assert {k for k in ours if not k.startswith("diag/")} == set(CORE_METRICS)


def test_a_baseline_computed_once_gives_the_same_figures():
    tok = ByteTokenizer()
    special = corpus.special_ids(tok)
    contexts = corpus.pack_contexts(["Some held-out text for the baseline, packed into contexts."] * 4, tok, 24, 5)
    model = build_tiny_model("tiny")
    sae = variants.build("relu", d_in=64, d_sae=128)
    reference = baseline(model, HOOK, contexts, special)
    again = evaluate_core(model, sae, HOOK, contexts, special, reference=reference)
    full = evaluate_core(model, sae, HOOK, contexts, special)
    for key in ("ce_loss_zero", "kl_div_zero", "ce_loss_recovered", "ce_loss_recovered_stderr"):
        assert again[key] == pytest.approx(full[key], rel=1e-6), key


def test_a_bf16_evaluation_runs_the_model_in_bf16_and_the_sae_in_fp32(monkeypatch):
    """--precision bfloat16 evaluates with the model's matmuls in bf16 (the figures move, a little)
    while the SAE reads the captured activations in fp32 (its encoder sees fp32 inputs)."""
    tok = ByteTokenizer()
    special = corpus.special_ids(tok)
    contexts = corpus.pack_contexts(["Held-out text for the precision check, in a few contexts."] * 4, tok, 24, 5)
    model = build_tiny_model("tiny")
    sae = variants.build("relu", d_in=64, d_sae=128, overrides={"seed": "2"})
    sae.act_scale.fill_(0.3)
    seen = []
    encode = type(sae).encode
    monkeypatch.setattr(type(sae), "encode", lambda self, x: seen.append(x.dtype) or encode(self, x))
    fp32 = evaluate_core(model, sae, HOOK, contexts, special)
    bf16 = evaluate_core(model, sae, HOOK, contexts, special, precision="bfloat16")
    assert set(seen) == {torch.float32}
    reference = baseline(model, HOOK, contexts, special, precision="bfloat16")
    assert bf16["ce_loss_clean"] != fp32["ce_loss_clean"]  # the model did compute in bf16
    for key in ("ce_loss_clean", "ce_loss_sae", "explained_variance"):
        assert bf16[key] == pytest.approx(fp32[key], rel=0.02), key
    with_reference = evaluate_core(model, sae, HOOK, contexts, special, reference=reference, precision="bfloat16")
    for key in ("ce_loss_zero", "ce_loss_recovered"):  # a search's bf16 reference serves its bf16 trials
        assert with_reference[key] == pytest.approx(bf16[key], rel=1e-6), key


def test_the_blocks_before_the_hook_run_once_per_batch_and_a_patched_pass_is_unchanged():
    """The spliced and zero-ablated passes reuse what entered the hook's block in the clean
    pass: block 0 runs once per batch (it ran three times before), the last block three times,
    and a patched pass that skips the early blocks gives the whole pass's hidden states."""
    from saeforge.core.evaluation import final_hidden
    from saeforge.core.hooks import block_input, replace, skip_blocks_before
    from saeforge.core.model import decoder_layers

    tok = ByteTokenizer()
    special = corpus.special_ids(tok)
    contexts = corpus.pack_contexts(["Held-out text for counting the blocks each pass runs."] * 4, tok, 24, 6)
    model = build_tiny_model("tiny")
    blocks = decoder_layers(model)
    calls = {0: 0, len(blocks) - 1: 0}
    handles = [
        blocks[i].mlp.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1)) for i in calls
    ]  # the block's MLP runs only when the block really runs
    evaluate_core(model, variants.build("relu", d_in=64, d_sae=128), HOOK, contexts, special, batch_contexts=4)
    for h in handles:
        h.remove()
    assert calls == {0: 2, len(blocks) - 1: 6}  # 2 batches: 1 clean pass each for block 0, 3 passes for the last

    ids = torch.from_numpy(contexts[:2].astype(np.int64))
    halve = lambda out: out * 0.5  # any patch at the hook
    with torch.no_grad():
        with block_input(model, HOOK.layer) as entering:
            final_hidden(model, ids)
        with replace(model, HOOK, halve):
            whole = final_hidden(model, ids)
        with replace(model, HOOK, halve), skip_blocks_before(model, HOOK.layer, entering["hidden"]):
            skipped = final_hidden(model, ids)
        assert "forward" not in vars(blocks[0])  # the blocks' own forward is back
    torch.testing.assert_close(skipped, whole, rtol=1e-6, atol=1e-6)


def test_bootstrap_stderr_shrinks_with_more_contexts():
    rng = np.random.default_rng(0)

    def per(n):
        return {"a": rng.normal(1.0, 1.0, n), "n": np.ones(n)}

    small = bootstrap_stderr(per(16), lambda s: s["a"] / s["n"])
    large = bootstrap_stderr(per(1024), lambda s: s["a"] / s["n"])
    assert small == pytest.approx(1 / 4, rel=0.3) and large == pytest.approx(1 / 32, rel=0.3)


@pytest.mark.parametrize("name", ["tiny", "tiny-gemma2"])
def test_the_chunked_lm_head_gives_the_models_own_log_probs(name):
    from saeforge.core.evaluation import final_hidden, head_log_probs

    model = build_tiny_model(name)
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), -1)
        got = head_log_probs(model, final_hidden(model, ids))
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_one_clean_pass_serves_the_saes_of_several_hooks():
    """A k-hook run evaluates its SAEs together: each gets exactly the figures of its own
    evaluation, the blocks before the shallowest hook run once per batch, and the last block runs
    once clean plus one spliced and one zero-ablated pass per SAE (not three passes per SAE); the
    zero ablations of several hooks likewise come from one clean pass."""
    from saeforge.core.evaluation import baselines, evaluate_hooks
    from saeforge.core.model import decoder_layers

    tok = ByteTokenizer()
    special = corpus.special_ids(tok)
    contexts = corpus.pack_contexts(["Held-out text read at two hooks by two SAEs at once."] * 4, tok, 24, 6)
    model = build_tiny_model("tiny")
    hooks = [HookPoint(1), HookPoint(3)]
    saes = [variants.build(name, d_in=64, d_sae=128, overrides={"seed": "2"}) for name in ("relu", "topk")]
    for sae in saes:
        sae.act_scale.fill_(0.3)
    blocks = decoder_layers(model)
    calls = {0: 0, len(blocks) - 1: 0}
    handles = [
        blocks[i].mlp.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1)) for i in calls
    ]
    together = evaluate_hooks(model, list(zip(saes, hooks)), contexts, special, batch_contexts=4)
    for h in handles:
        h.remove()
    assert calls == {0: 2, len(blocks) - 1: 2 * 5}  # 2 batches: 1 clean + 2 spliced + 2 zero-ablated passes
    for sae, hook, got in zip(saes, hooks, together):
        alone = evaluate_core(model, sae, hook, contexts, special, batch_contexts=4)
        assert set(got) == set(alone)
        for key, value in alone.items():
            assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9, nan_ok=True), (hook, key)
    both = baselines(model, hooks, contexts, special)
    for hook in hooks:
        one = baseline(model, hook, contexts, special)
        np.testing.assert_allclose(both[hook].ce_zero, one.ce_zero, rtol=1e-6)
        np.testing.assert_allclose(both[hook].kl_zero, one.kl_zero, rtol=1e-6)
