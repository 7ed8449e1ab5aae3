"""relu's defining maths on tiny tensors, against an independent (naive) computation."""

import math

import pytest
import torch
from math_helpers import gen

import variants

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def test_relu_l1_is_decoder_norm_weighted_and_on_the_papers_scale():
    model = variants.build("relu", d_in=6, d_sae=10, overrides={"l1_coeff": "0.3"}).double()
    with torch.no_grad():
        model.W_dec.mul_(torch.linspace(0.5, 3.0, 10, dtype=torch.float64).unsqueeze(-1))
        model.b_enc.fill_(0.05)
    x = torch.randn(9, 6, generator=gen(42), dtype=torch.float64)
    with torch.no_grad():
        out = model.loss(x)
    f, w = out.latents, model.W_dec.detach()
    naive = (
        sum(float(f[t, i]) * math.sqrt(sum(float(w[i, d]) ** 2 for d in range(6))) for t in range(9) for i in range(10))
        / 9
    )
    assert (f > 0).any()
    assert out.terms["l1"].item() == pytest.approx(0.3 * 6 * naive, rel=1e-9)  # coefficient x d_in


def test_relu_decoder_rows_are_unit_norm_by_default_and_free_on_request():
    assert variants.build("relu", d_in=6, d_sae=10).cfg.normalize_decoder
    x = torch.randn(9, 6, generator=gen(44))
    for normalize, expected in (("true", True), ("false", False)):
        model = variants.build("relu", d_in=6, d_sae=10, overrides={"normalize_decoder": normalize})
        with torch.no_grad():
            model.W_dec.mul_(torch.linspace(0.5, 3.0, 10).unsqueeze(-1))
        model.after_step(0)
        assert torch.allclose(model.W_dec.norm(dim=-1), torch.ones(10)) == expected
        assert torch.isfinite(model.loss(x).total)
