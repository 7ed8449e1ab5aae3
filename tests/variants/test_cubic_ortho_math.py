"""cubic_ortho's defining maths on tiny tensors, against an independent (naive) computation."""

import math

import pytest
import torch
from math_helpers import gen, pearson
from torch.nn import functional as F

import variants

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def test_cubic_omega_matches_a_hand_loop():
    from variants.cubic_ortho import omega

    g = gen(16)
    f = torch.relu(torch.randn(40, 7, generator=g, dtype=torch.float64))
    f[:, 5] = 0.0  # silent latent: c = 0, so restricting to active latents changes nothing
    w = F.normalize(torch.randn(7, 5, generator=g, dtype=torch.float64), dim=-1)
    eps0, beta, power = 0.1, 1.5, 3.0
    mean = f.mean(0).tolist()
    total = 0.0
    for i in range(7):
        for j in range(7):
            if i == j:
                continue
            c = abs(pearson(f[:, i], f[:, j]))
            eps = eps0 * math.exp(-beta * math.log(1 + mean[i] * mean[j]))
            total += c**power * max(0.0, abs(float(w[i] @ w[j])) - eps)
    assert omega(f, w, power, eps0, beta).item() == pytest.approx(total, rel=1e-9)
    plain = sum(
        abs(pearson(f[:, i], f[:, j])) ** 2 * abs(float(w[i] @ w[j])) for i in range(7) for j in range(7) if i != j
    )
    assert omega(f, w, 2.0, 0.0, beta).item() == pytest.approx(plain, rel=1e-9)


def test_cubic_init_is_tied_by_default_and_kaiming_on_request():
    tied = variants.build("cubic_ortho", d_in=8, d_sae=16)
    assert torch.allclose(tied.W_dec.norm(dim=-1), torch.full((16,), 0.1)) and torch.equal(tied.W_enc, tied.W_dec.T)
    assert torch.all(tied.b_enc == 0) and torch.all(tied.b_dec == 0)
    paper = variants.build("cubic_ortho", d_in=8, d_sae=16, overrides={"init": "kaiming", "init_bias_noise": "0.05"})
    assert torch.allclose(paper.W_dec.norm(dim=-1), torch.ones(16))  # unit rows, independent of W_enc
    assert not torch.allclose(paper.W_enc, paper.W_dec.T)
    assert float(paper.W_enc.detach().abs().max()) <= math.sqrt(6 / 8)  # Kaiming-uniform bound, fan_in d_in
    for bias in (paper.b_enc, paper.b_dec):
        assert 0 < float(bias.detach().abs().max()) <= 0.05
    with pytest.raises(variants.ConfigError, match="init must be one of tied, kaiming"):
        variants.build("cubic_ortho", d_in=8, d_sae=16, overrides={"init": "xavier"})


def test_cubic_gamma_ramps_with_the_warmup_and_enters_the_loss():
    model = variants.build("cubic_ortho", d_in=8, d_sae=16, overrides={"warmup_steps": "100", "ortho_alpha": "0.5"})
    assert [model.gamma(s) for s in (0, 50, 100, 1000)] == [0.0, 0.25, 0.5, 0.5]
    x = torch.randn(64, 8, generator=gen(17))
    out = model.loss(x, 50)
    # gamma is on the paper's scale; the term carries it times d_in (MSE summed over d_in).
    assert out.terms["ortho"].item() == pytest.approx(0.25 * 8 * model.omega(out.latents).item(), rel=1e-6)
    assert model.diagnostics(x)["gamma"] == 0.25
