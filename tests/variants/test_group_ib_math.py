"""group_ib's defining maths on tiny tensors, against an independent (naive) computation."""

import math

import pytest
import torch
from math_helpers import gen, pearson

import variants

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def test_group_ib_group_signals_match_a_naive_loop():
    model = variants.build("group_ib", d_in=8, d_sae=64)
    with torch.no_grad():
        model.membership_logits.copy_(torch.randn(64, 2, generator=gen(20)))
    f = torch.relu(torch.randn(3, 5, 64, generator=gen(21)))
    s = model.group_signals(f)
    m = torch.softmax(model.membership_logits.detach() / 0.1, dim=-1)
    for b in range(3):
        for t in range(5):
            for g_ in range(2):
                expected = sum(float(m[i, g_]) * float(f[b, t, i]) for i in range(64))
                assert s[b, t, g_].item() == pytest.approx(expected, rel=1e-5)


def test_group_ib_window_correlations_match_a_naive_loop():
    from variants.group_ib import window_correlations

    window, stride = 6, 4
    g = gen(22)
    s = torch.rand(2, 15, 3, generator=g, dtype=torch.float64)
    mask = torch.ones(2, 15, dtype=torch.bool)
    mask[0, 0] = False
    mask[1, 10:] = False
    corr, valid = window_correlations(s, mask, window, stride)
    for b in range(2):
        for w, start in enumerate(range(0, 15, stride)):
            if start > 0 and start + window - stride >= 15:
                break  # the previous window already reached the end
            tokens = [t for t in range(start, min(start + window, 15)) if mask[b, t]]
            assert bool(valid[b, w]) == (len(tokens) >= 2)
            if len(tokens) < 2:
                continue
            for i in range(3):
                for j in range(3):
                    expected = 1.0 if i == j else pearson(s[b, tokens, i], s[b, tokens, j])
                    assert corr[b, w, i, j].item() == pytest.approx(expected, abs=1e-9)
    assert corr.shape[1] == 4  # windows at 0, 4, 8, 12 (the last padded with masked-out tokens)


def test_group_ib_mi_term_sums_live_pairs_under_soft_membership():
    """L_MI with the default soft membership (every latent weighs a little in every group): mean
    over valid windows of the sum over ordered pairs of live groups; a silent group (no own latent
    active in the window) carries only that leak, perfectly correlated with the others."""
    window, stride, eps = 6, 4, 1e-6
    model = variants.build(
        "group_ib", d_in=4, d_sae=3 * 32, overrides={"window": str(window), "window_stride": str(stride)}
    ).double()
    g = gen(23)
    s = 0.1 + torch.rand(2, 15, 3, generator=g, dtype=torch.float64)
    s[1, :, 1:] = 0.0  # context 1: groups 1 and 2 silent throughout
    s[0, 4:10, 2] = 0.0  # context 0: group 2 silent in the window at 4 (tokens 4-9)
    f = torch.zeros(2, 15, 96, dtype=torch.float64)
    f[..., ::32] = s  # latent 32 g (own group g) carries group g's activity
    mask = torch.ones(2, 15, dtype=torch.bool)
    mask[0, 0] = False
    mask[1, 10:] = False
    m = torch.softmax(model.membership_logits.detach() / 0.1, dim=-1)
    assert (m > 0).all() and (m.argmax(-1) == torch.arange(96) // 32).all()  # soft, own group = block
    signals = f @ m
    per_window, silent_pair_corr = [], []
    for b in range(2):
        for start in range(0, 15, stride):
            if start > 0 and start + window - stride >= 15:
                break
            tokens = [t for t in range(start, min(start + window, 15)) if mask[b, t]]
            if len(tokens) < 2:
                continue
            live = [k for k in range(3) if any(f[b, t, 32 * k] > 0 for t in tokens)]
            per_window.append(
                sum(
                    -math.log(1 - abs(pearson(signals[b, tokens, i], signals[b, tokens, j])) + eps)
                    for i in live
                    for j in live
                    if i != j
                )
            )
            if 1 not in live and 2 not in live:
                silent_pair_corr.append(abs(pearson(signals[b, tokens, 1], signals[b, tokens, 2])))
    assert silent_pair_corr and min(silent_pair_corr) > 1 - 1e-9  # what the exclusion keeps out (13.8 a pair)
    assert model.independence(f, mask).item() == pytest.approx(sum(per_window) / len(per_window), rel=1e-6)


def test_group_ib_encode_is_the_sparse_code_the_decoder_reads():
    """encode returns f = ReLU(transform(z)) on z's support: decode(encode(x)) is the loss's
    reconstruction, the L1 is on f, and f is never denser than z even with a trained transform."""
    model = variants.build("group_ib", d_in=8, d_sae=64).eval()
    assert not model.cfg.group_layernorm  # scale-invariant, so off by default
    with torch.no_grad():
        model.group_weight.copy_(torch.randn(model.group_weight.shape, generator=gen(33)))
        model.group_bias.fill_(0.5)  # would make every group dense without the support mask
    x = torch.randn(2, 6, 8, generator=gen(34))
    with torch.no_grad():
        z = torch.relu(model.pre_activations(x))
        f = model.encode(x)
        out = model.loss(x)
    assert torch.all(f[z == 0] == 0) and 0 < int((f > 0).sum()) <= int((z > 0).sum())
    zg = z.reshape(2, 6, 2, 32)
    expected = torch.relu(zg + torch.einsum("btgi,gij->btgj", zg, model.group_weight) + 0.5).reshape(z.shape) * (z > 0)
    assert torch.allclose(f, expected, atol=1e-6)
    assert torch.equal(out.latents, f) and torch.allclose(out.recon, f @ model.W_dec + model.b_dec)
    assert out.terms["l1"].item() == pytest.approx(model.cfg.l1_coeff * 8 * float(f.sum(-1).mean()), rel=1e-5)  # x d_in


def test_group_ib_with_layernorm_penalises_what_the_decoder_reads():
    """With the (scale-invariant) LayerNorm on, shrinking the encoder no longer lowers the L1,
    which reads f after the LayerNorm; the rescaling move goes through the LayerNorm's affine map
    and unit-norm decoder rows undo it."""
    model = variants.build("group_ib", d_in=8, d_sae=64, overrides={"group_layernorm": "true"}).double().eval()
    with torch.no_grad():
        model.W_enc.mul_(10.0)  # unit columns, so the LayerNorm's eps is negligible
        model.b_enc.fill_(1.0)
    x = torch.randn(2, 6, 8, generator=gen(35), dtype=torch.float64)
    with torch.no_grad():
        base = model.loss(x)
        model.W_enc.mul_(0.5)  # the old dodge: z half as large
        model.b_enc.mul_(0.5)
        shrunk = model.loss(x)
        model.W_enc.mul_(2.0)
        model.b_enc.mul_(2.0)
    assert shrunk.terms["l1"].item() == pytest.approx(base.terms["l1"].item(), rel=1e-4)  # LayerNorm eps only
    moved = model.rescaled_latents(0.5)
    with torch.no_grad():
        out = moved.loss(x)
    assert torch.allclose(out.latents, 0.5 * base.latents) and torch.allclose(out.recon, base.recon)
    moved.after_step(0)
    assert torch.allclose(moved.W_dec.norm(dim=-1), torch.ones(64, dtype=torch.float64))
