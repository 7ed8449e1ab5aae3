"""hsae's defining maths on tiny tensors, against an independent (naive) computation."""

import pytest
import torch
from math_helpers import gen

import variants

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.mark.parametrize("center_input", [True, False])
def test_hsae_decoder_path_matches_the_formula(center_input):
    model = variants.build("hsae", d_in=5, d_sae=8, overrides={"center_input": str(center_input)}).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen(24), dtype=torch.float64))
    x = torch.randn(5, dtype=torch.float64, generator=gen(25))
    # Column-vector form of the paper: z1 = ReLU(W1 x + b1), z2 = ReLU(W2 z1 + b2),
    # x_hat = Wd1 (Wd2 z2 + bd2) + Ws z1 + bd1 (our row-per-latent matrices are the transposes);
    # with center_input (the default) the encoder reads x - bd1, as a linear SAE's reads x - b_dec.
    W1, W2, Wd1, Wd2, Ws = model.W1.T, model.W2.T, model.Wd1.T, model.Wd2.T, model.Ws.T
    z1 = torch.relu(W1 @ (x - model.bd1 if center_input else x) + model.b1)
    z2 = torch.relu(W2 @ z1 + model.b2)
    expected = Wd1 @ (Wd2 @ z2 + model.bd2) + Ws @ z1 + model.bd1
    f = model.encode(x)
    assert torch.allclose(f, torch.cat([z1, z2]))
    assert torch.allclose(model.decode(f), expected)
    # decoder_directions are exact per-latent directions: x_hat = f @ directions + constant.
    constant = model.bd2 @ model.Wd1 + model.bd1
    assert torch.allclose(f @ model.decoder_directions() + constant, expected)


def test_hsae_gram_penalty_matches_a_naive_loop_and_renormalises_every_reader():
    model = variants.build("hsae", d_in=6, d_sae=8)
    x = torch.randn(7, 6, generator=gen(26))
    with torch.no_grad():
        z1, z2 = model.levels(x)
    # The paper's scale: summed over the B x B token pairs (no / B^2), applied times d_in (6).
    naive = sum(float(z1[a] @ z1[b]) ** 2 * float(z2[a] @ z2[b]) ** 2 for a in range(7) for b in range(7))
    assert model.gram_penalty(z1, z2).item() == pytest.approx(naive, rel=1e-5)
    out = model.loss(x)
    assert out.terms["gram"].item() == pytest.approx(model.cfg.gram_coeff * 6 * naive, rel=1e-5)
    level2_l1 = model.cfg.l1_level2 * 6 * float(z2.sum(-1).mean())
    assert out.terms["l1_level2"].item() == pytest.approx(level2_l1, rel=1e-6)
    with torch.no_grad():
        model.Wd1.mul_(3.0)
        model.Wd1[1:].copy_(model.Wd1[0])  # aligned rows: unit rows of Wd2 and Wd1 alone would leave
        model.Wd2.abs_().mul_(0.5)  # level-2 directions of norm up to 4 (every Wd2 row sums them)
        model.Ws.mul_(2.0)
        model.W2.mul_(4.0)
    model.after_step(0)
    for w in (model.Wd1, model.Ws, model.W2):  # the maps that read z1, and Wd1
        assert torch.allclose(w.norm(dim=-1), torch.ones(4))
    # each level-2 latent's whole direction (row of Wd2 Wd1) is unit, as every decoder row is
    assert torch.allclose((model.Wd2 @ model.Wd1).norm(dim=-1), torch.ones(4))
    assert torch.allclose(model.decoder_directions().norm(dim=-1), torch.ones(8))
    zero = model.diagnostics(x)
    assert zero["zero_fraction_level1"] == pytest.approx(float((z1 == 0).float().mean()))
