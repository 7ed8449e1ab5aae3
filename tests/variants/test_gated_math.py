"""gated's defining maths on tiny tensors, against an independent (naive) computation."""

import math

import pytest
import torch
from math_helpers import gen

import variants

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def gated(**overrides):
    model = variants.build("gated", d_in=6, d_sae=10, overrides={"l1_coeff": "0.3", **overrides}).double()
    g = gen(70)
    with torch.no_grad():
        model.b_gate.copy_(0.2 * torch.randn(10, generator=g, dtype=torch.float64))
        model.b_mag.copy_(0.2 * torch.randn(10, generator=g, dtype=torch.float64))
        model.r_mag.copy_(0.5 * torch.randn(10, generator=g, dtype=torch.float64))
        model.b_dec.copy_(0.3 * torch.randn(6, generator=g, dtype=torch.float64))
        model.W_dec.mul_(torch.linspace(0.5, 3.0, 10, dtype=torch.float64).unsqueeze(-1))
    return model


def test_gated_encoder_is_gate_times_magnitude_sharing_w_enc():
    model = gated()
    x = torch.randn(9, 6, generator=gen(71), dtype=torch.float64)
    w, b_dec, b_gate, b_mag, r_mag = (
        p.detach() for p in (model.W_enc, model.b_dec, model.b_gate, model.b_mag, model.r_mag)
    )
    f = model.encode(x).detach()
    both = 0
    for t in range(9):
        for i in range(10):
            shared = sum((float(x[t, d]) - float(b_dec[d])) * float(w[d, i]) for d in range(6))
            gate = shared + float(b_gate[i])
            mag = math.exp(float(r_mag[i])) * shared + float(b_mag[i])
            expected = (1.0 if gate > 0 else 0.0) * max(0.0, mag)
            assert float(f[t, i]) == pytest.approx(expected, rel=1e-12, abs=1e-15)
            both += gate > 0 and mag > 0
    assert 0 < both < 90  # some latents fire, some are shut by the gate or the magnitude


def test_gated_l1_and_auxiliary_reconstruction_match_a_naive_computation():
    model = gated(normalize_decoder="false")
    x = torch.randn(9, 6, generator=gen(72), dtype=torch.float64)
    out = model.loss(x)
    gate, _ = model.gate_and_magnitude(x)
    gate, w, b = gate.detach(), model.W_dec.detach(), model.b_dec.detach()
    norms = [math.sqrt(sum(float(w[i, d]) ** 2 for d in range(6))) for i in range(10)]
    l1 = sum(max(0.0, float(gate[t, i])) * norms[i] for t in range(9) for i in range(10)) / 9
    assert out.terms["l1"].item() == pytest.approx(0.3 * 6 * l1, rel=1e-9)  # coefficient x d_in
    aux = 0.0
    for t in range(9):
        for d in range(6):
            via_gate = float(b[d]) + sum(max(0.0, float(gate[t, i])) * float(w[i, d]) for i in range(10))
            aux += (float(x[t, d]) - via_gate) ** 2
    assert out.terms["aux"].item() == pytest.approx(aux / 9, rel=1e-9)
    assert out.terms["mse"].item() == pytest.approx(float((x - out.recon.detach()).pow(2).sum(-1).mean()), rel=1e-12)


def test_gated_gradients_follow_the_paper():
    """The auxiliary term reads a frozen decoder; the reconstruction never reaches the gate bias
    (the Heaviside passes nothing); the L1 never reaches the magnitude path."""
    x = torch.randn(16, 6, generator=gen(73), dtype=torch.float64)
    grads = {}
    for term in ("mse", "l1", "aux"):
        model = gated(normalize_decoder="false")
        model.loss(x).terms[term].backward()
        grads[term] = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}
    assert torch.all(grads["aux"]["W_dec"] == 0)
    # b_dec reaches the auxiliary term only through the encoder's input x - b_dec, not its output
    model = gated(normalize_decoder="false")
    b_in = model.b_dec.detach().clone().requires_grad_(True)
    gate_acts = ((x - b_in) @ model.W_enc.detach() + model.b_gate.detach()).relu()
    naive = (x - gate_acts @ model.W_dec.detach() - model.b_dec.detach()).pow(2).sum(-1).mean()
    naive.backward()
    torch.testing.assert_close(grads["aux"]["b_dec"], b_in.grad, rtol=1e-12, atol=1e-14)
    assert grads["aux"]["W_enc"].abs().sum() > 0 and grads["aux"]["b_gate"].abs().sum() > 0
    assert torch.all(grads["mse"]["b_gate"] == 0) and grads["mse"]["b_mag"].abs().sum() > 0
    assert grads["mse"]["r_mag"].abs().sum() > 0
    assert torch.all(grads["l1"]["b_mag"] == 0) and torch.all(grads["l1"]["r_mag"] == 0)
    assert grads["l1"]["b_gate"].abs().sum() > 0 and grads["l1"]["W_dec"].abs().sum() > 0  # decoder-norm weights


def test_gated_saelens_fold_keeps_raw_pre_activations():
    """The folded tensors on raw activations give our pre-activations on normalised ones."""
    model = gated()
    model.act_scale.fill_(0.125)
    t = {k: v.detach() for k, v in model.saelens_tensors().items()}
    assert set(t) == {"W_enc", "W_dec", "b_dec", "b_gate", "b_mag", "r_mag"}
    x_raw = 30 * torch.randn(7, 6, generator=gen(74), dtype=torch.float64)
    centred = x_raw - t["b_dec"]
    gate = centred @ t["W_enc"] + t["b_gate"]
    mag = centred @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"]
    ours_gate, ours_mag = model.gate_and_magnitude(x_raw * 0.125)
    torch.testing.assert_close(gate, ours_gate.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mag, ours_mag.detach(), rtol=1e-12, atol=1e-12)
    f = (gate > 0) * mag.relu()
    torch.testing.assert_close(f @ t["W_dec"] + t["b_dec"], model.decode(f).detach() / 0.125, rtol=1e-12, atol=1e-12)
