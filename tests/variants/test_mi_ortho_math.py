"""mi_ortho's defining maths on tiny tensors, against an independent (naive) computation."""

import math

import pytest
import torch
from math_helpers import gen

import variants

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def test_mi_ortho_refresh_finds_the_planted_dependent_pair_and_penalises_it():
    model = variants.build("mi_ortho", d_in=8, d_sae=8, overrides={"n_candidates": "28", "kde_tokens": "300"})
    g = gen(14)
    f = torch.relu(torch.randn(300, 8, generator=g)) * 0.15
    f[:, 6] = f[:, 2] * 1.5 + 0.01 * torch.rand(300, generator=g)  # latent 6 follows latent 2
    model.refresh_pairs(f)
    pairs, mi = model.active_pairs()
    assert 1 <= pairs.shape[0] <= 3  # above the 90th percentile of 28 candidates
    assert sorted(pairs[mi.argmax()].tolist()) == [2, 6]
    # The paper's scale: tau_ij (a_i . a_j)^2, the co-activation summed over the batch's tokens.
    expected = sum(
        0.5 * math.exp(2.0 * float(mi[p])) * float((f[:, i].double() * f[:, j].double()).sum()) ** 2
        for p, (i, j) in enumerate(pairs.tolist())
    )
    assert model.pair_penalty(f).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("scale", [1e-3, 7.0])
def test_mi_ortho_pair_mi_set_and_tau_do_not_depend_on_the_latents_scale(scale):
    """The KDE reads latents standardised per latent, so scaling them changes no estimate."""
    overrides = {"n_candidates": "28", "kde_tokens": "300"}
    g = gen(49)
    f = torch.relu(torch.randn(300, 8, generator=g, dtype=torch.float64)) * 0.15
    f[:, 6] = f[:, 2] * 1.5 + 0.01 * torch.rand(300, generator=g, dtype=torch.float64)
    f[:, 3] = f[:, 0] ** 2  # a non-linear dependence too
    base, scaled = (variants.build("mi_ortho", d_in=8, d_sae=8, overrides=overrides).double() for _ in range(2))
    base.refresh_pairs(f)
    scaled.refresh_pairs(scale * f)
    (pairs, mi), (pairs_s, mi_s) = base.active_pairs(), scaled.active_pairs()
    assert pairs.shape[0] >= 1 and torch.equal(pairs, pairs_s)
    assert torch.allclose(mi, mi_s, rtol=1e-6)
    tau = lambda m: 0.5 * torch.exp(2.0 * m)  # noqa: E731
    assert torch.allclose(tau(mi), tau(mi_s), rtol=1e-6)
    all_pairs = torch.tensor([[i, j] for i in range(8) for j in range(i + 1, 8)])
    assert torch.allclose(base.estimate_pair_mi(f, all_pairs), base.estimate_pair_mi(scale * f, all_pairs), rtol=1e-6)


def test_mi_ortho_refresh_happens_every_interval_and_only_in_training():
    model = variants.build("mi_ortho", d_in=8, d_sae=32, overrides={"refresh_interval": "5", "n_candidates": "50"})
    x = torch.randn(128, 8, generator=gen(15))
    model.loss(x, 3)
    assert int(model.pair_count) == 0
    model.loss(x, 5)
    assert int(model.pair_count) > 0
    model.pair_count.zero_()
    model.eval()
    model.loss(x, 10)
    assert int(model.pair_count) == 0
