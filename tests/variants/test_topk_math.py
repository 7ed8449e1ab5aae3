"""topk's defining maths, AuxK's included, on tiny tensors against an independent (naive)
computation."""

import pytest
import torch
from math_helpers import gen

import variants

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def test_topk_keeps_exactly_k_per_token_and_matches_a_naive_sort():
    model = variants.build("topk", d_in=8, d_sae=32, overrides={"k": "5"})
    x = torch.randn(12, 8, generator=gen(43))
    with torch.no_grad():
        model.b_enc.copy_(torch.linspace(-0.2, 0.4, 32))
        pre = model.pre_activations(x)
        f = model.encode(x)
    for t in range(12):
        order = sorted(range(32), key=lambda i: -float(pre[t, i]))
        expected = torch.zeros(32)
        for i in order[:5]:
            expected[i] = max(0.0, float(pre[t, i]))
        assert torch.equal(f[t], expected)
    with torch.no_grad():
        model.b_enc.fill_(10.0)  # every pre-activation positive: exactly k survive the ReLU
        assert torch.equal((model.encode(x) > 0).sum(-1), torch.full((12,), 5))


def auxk_model(dead: list[int], **overrides):
    model = variants.build("topk", d_in=8, d_sae=32, overrides={"k": "4", "aux_k": "3", **overrides}).double()
    with torch.no_grad():
        model.b_enc.copy_(torch.linspace(-0.3, 0.3, 32, dtype=torch.float64))
        model.tokens_since_fired[dead] = model.dead_after()
    return model


def test_auxk_matches_a_naive_computation_on_gaos_scale():
    dead = [1, 4, 5, 9, 17, 30]
    model = auxk_model(dead)
    x = torch.randn(16, 8, generator=gen(44), dtype=torch.float64) + 0.5
    with torch.no_grad():
        out = model.loss(x)
        pre = model.pre_activations(x)
    e = x - out.recon
    e_hat = torch.zeros_like(e)
    for t in range(16):
        top = sorted(dead, key=lambda i: -float(pre[t, i]))[:3]
        for i in top:
            e_hat[t] += max(0.0, float(pre[t, i])) * model.W_dec[i].detach()
    ratio = (e_hat - e).pow(2).sum(-1).mean() / (e - e.mean(0)).pow(2).sum(-1).mean()
    variance = (x - x.mean(0)).pow(2).sum(-1).mean()  # our summed MSE = variance x Gao's normalised MSE
    assert out.terms["auxk"].item() == pytest.approx(float(ratio * variance) / 32, rel=1e-9)
    assert out.terms["mse"].item() == pytest.approx(float(e.pow(2).sum(-1).mean()), rel=1e-12)


def test_auxk_is_zero_when_nothing_is_dead_and_rules_follow_d_in_and_d_sae():
    model = auxk_model([])
    x = torch.randn(16, 8, generator=gen(45), dtype=torch.float64)
    assert model.loss(x).terms["auxk"].item() == 0.0
    assert model.cfg.aux_k == 3 and variants.build("topk", d_in=640, d_sae=64).aux_latents() == 320  # d_in / 2
    assert variants.build("topk", d_in=8, d_sae=5120).dead_after() == 51_200  # 10 x d_sae tokens
    assert variants.build("topk", d_in=8, d_sae=64, overrides={"dead_tokens": "77"}).dead_after() == 77


def test_auxk_gradient_reaches_the_dead_latents_parameters_only():
    dead = [1, 4, 5, 9, 17, 30]
    model = auxk_model(dead, aux_k="6")
    x = torch.randn(16, 8, generator=gen(47), dtype=torch.float64)
    out = model.loss(x)
    out.terms["auxk"].backward()
    is_dead = torch.zeros(32, dtype=torch.bool)
    is_dead[dead] = True
    with torch.no_grad():
        reached = (model.pre_activations(x)[:, is_dead] > 0).any(0)  # dead latents some token used
    assert reached.any()
    assert torch.all(model.W_dec.grad[~is_dead] == 0) and torch.all(model.W_enc.grad[:, ~is_dead] == 0)
    assert torch.all(model.b_enc.grad[~is_dead] == 0)
    assert torch.all(model.W_dec.grad[is_dead][reached].abs().sum(-1) > 0)
    assert torch.all(model.W_enc.grad[:, is_dead][:, reached].abs().sum(0) > 0)


def test_topk_training_decode_is_the_dense_decode():
    """The training loss decodes the k non-zeros sparsely; it must be the dense decode of the same code."""
    model = variants.build("topk", d_in=8, d_sae=32, overrides={"k": "4"}).double()
    x = torch.randn(50, 8, generator=gen(77), dtype=torch.float64)
    out = model.loss(x)
    assert torch.allclose(out.recon, model.decode(model.encode(x)), rtol=1e-12, atol=1e-12)
    assert torch.equal(out.latents, model.encode(x))
