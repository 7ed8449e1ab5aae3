"""adaptive_mask's defining maths on tiny tensors, against an independent (naive) computation."""

import pytest
import torch
from math_helpers import gen

import variants

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def test_adaptive_mask_gates_latents_and_penalises_the_gates():
    model = variants.build("adaptive_mask", d_in=6, d_sae=10, overrides={"mask_l1_coeff": "0.3"})
    with torch.no_grad():
        model.mask_logit.copy_(torch.linspace(-3, 3, 10))
    x = torch.randn(20, 6, generator=gen(31))
    gates = torch.sigmoid(torch.linspace(-3, 3, 10))
    plain = torch.relu((x - model.b_dec) @ model.W_enc + model.b_enc)
    assert torch.allclose(model.encode(x), plain * gates)
    out = model.loss(x)
    gains = gates * model.W_enc.detach().norm(dim=0)  # each gate times its encoder column's norm
    assert out.terms["mask_l1"].item() == pytest.approx(0.3 * 6 * float(gains.sum()), rel=1e-5)  # x d_in
    assert model.diagnostics(x)["mask_mean"] == pytest.approx(float(gates.mean()), rel=1e-6)


def test_adaptive_mask_gate_penalty_reads_the_whole_gain_and_decoder_rows_are_unit():
    """Moving gain between a gate and its encoder column (m by c, the column by 1/c) leaves f and
    the gate penalty unchanged; decoder rows are renormalised, encoder columns only on request."""
    model = variants.build("adaptive_mask", d_in=6, d_sae=10).double()
    x = torch.randn(20, 6, generator=gen(32), dtype=torch.float64)
    with torch.no_grad():
        model.mask_logit.copy_(torch.linspace(-2, 2, 10))
        before = model.loss(x)
        model.mask_logit.copy_(torch.logit(0.5 * model.gates()))
        model.W_enc.mul_(2.0)
        model.b_enc.mul_(2.0)
        after = model.loss(x)
    assert torch.allclose(after.latents, before.latents)
    assert after.terms["mask_l1"].item() == pytest.approx(before.terms["mask_l1"].item(), rel=1e-9)
    with torch.no_grad():
        model.W_enc.mul_(torch.linspace(0.2, 5.0, 10, dtype=torch.float64))
        model.W_dec.mul_(3.0)
    norms = model.W_enc.norm(dim=0).clone()
    model.after_step(0)
    assert torch.allclose(model.W_dec.norm(dim=-1), torch.ones(10, dtype=torch.float64))
    assert torch.equal(model.W_enc.norm(dim=0), norms)  # free by default
    unit = variants.build("adaptive_mask", d_in=6, d_sae=10, overrides={"normalize_encoder": "true"})
    with torch.no_grad():
        unit.W_enc.mul_(5.0)
    unit.after_step(0)
    assert torch.allclose(unit.W_enc.norm(dim=0), torch.ones(10))
