"""contrastive_hier's defining maths on tiny tensors, against an independent (naive) computation."""

import pytest
import torch
from math_helpers import gen

import variants

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def test_hierarchical_ortho_matches_a_naive_loop():
    from variants.contrastive_hier import hierarchical_ortho

    n_coarse, n_fine, d_sae, batch = 3, 2, 14, 9
    g = gen(18)
    f = torch.relu(torch.randn(batch, d_sae, generator=g, dtype=torch.float64))
    f[:, 3] = 0.0
    fine_id = torch.randint(0, n_coarse * n_fine, (d_sae,), generator=g)
    fine_id[:2] = 5  # make sure some group has several members

    def norm(cols_a, cols_b):
        if not cols_a or not cols_b:
            return 0.0
        return float(torch.linalg.matrix_norm(f[:, cols_a].T @ f[:, cols_b]))

    coarse_of = (fine_id // n_fine).tolist()
    fine_of = fine_id.tolist()
    coarse = sum(
        norm([k for k in range(d_sae) if coarse_of[k] == i], [k for k in range(d_sae) if coarse_of[k] == j])
        for i in range(n_coarse)
        for j in range(n_coarse)
        if i != j
    )
    fine = sum(
        norm(
            [k for k in range(d_sae) if fine_of[k] == c * n_fine + a],
            [k for k in range(d_sae) if fine_of[k] == c * n_fine + b],
        )
        for c in range(n_coarse)
        for a in range(n_fine)
        for b in range(n_fine)
        if a != b
    )
    got_coarse, got_fine = hierarchical_ortho(f, fine_id, n_coarse, n_fine)
    assert got_coarse.item() == pytest.approx(coarse, rel=1e-9)  # the paper's scale: no division by B
    assert got_fine.item() == pytest.approx(fine, rel=1e-9)


def test_contrastive_hier_assignment_is_hierarchical_and_refreshed_on_interval():
    model = variants.build("contrastive_hier", d_in=8, d_sae=64, overrides={"refresh_interval": "7"})
    coarse, fine = model.membership()
    assert torch.allclose(coarse.sum(-1), torch.ones(64)) and torch.allclose(fine.sum(-1), torch.ones(64))
    assert torch.allclose(fine.view(64, 8, 8).sum(-1), coarse)  # fine groups nest in coarse groups
    c = coarse.argmax(-1)
    assert torch.equal(model.assignment // 8, c)
    with torch.no_grad():
        model.q_coarse.mul_(-1.0)
    before = model.assignment.clone()
    x = torch.randn(32, 8, generator=gen(19))
    model.loss(x, 3)
    assert torch.equal(model.assignment, before)  # not a refresh step
    model.loss(x, 7)
    assert torch.equal(model.assignment // 8, model.membership()[0].argmax(-1))
    assert not torch.equal(model.assignment, before)
