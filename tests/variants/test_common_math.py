"""The shared maths of variants/common.py, and the rules every variant follows through it (the
base initialisation, the capped penalty warm-ups), on tiny tensors against naive computations."""

import math

import pytest
import torch
from math_helpers import gen, pearson
from torch.nn import functional as F

import variants
from variants.common import (
    auxk_loss,
    capped_warmup,
    categorical_entropy,
    correlation_matrix,
    geometric_median,
    gram_matrix,
    info_nce_to_centroids,
    kde_bandwidth,
    kde_mutual_information,
    linear_ramp,
    mean_abs_correlation,
    membership_centroids,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def test_correlation_matrix_matches_numpy_with_subset_and_weights():
    a = torch.randn(50, 6, generator=gen(1), dtype=torch.float64)
    a[:, 4] = 2.0  # a constant column correlates 0 with everything
    corr = correlation_matrix(a)
    for i in range(6):
        for j in range(6):
            expected = 1.0 if i == j else pearson(a[:, i], a[:, j])
            assert corr[i, j].item() == pytest.approx(expected, abs=1e-9)
    index = torch.tensor([5, 0, 2])
    assert torch.allclose(correlation_matrix(a, index=index), corr[index][:, index])
    keep = torch.rand(50, generator=gen(2)) > 0.3
    weighted = correlation_matrix(a, weights=keep)
    assert torch.allclose(weighted, correlation_matrix(a[keep]))


def test_mean_abs_correlation_independent_duplicated_and_silent():
    g = gen(3)
    independent = torch.relu(torch.randn(4000, 20, generator=g)) * (torch.rand(4000, 20, generator=g) < 0.3)
    assert mean_abs_correlation(independent) < 0.05
    column = independent[:, :1]
    assert mean_abs_correlation(torch.cat([column, column, 2 * column], dim=1)) == pytest.approx(1.0, abs=1e-4)
    silent = torch.zeros(4000, 5)  # latents that never fire are left out
    assert mean_abs_correlation(torch.cat([column, column, silent], dim=1)) == pytest.approx(1.0, abs=1e-4)
    # Half the pairs duplicated, half independent: the mean of |corr| over the 4 x 3 ordered pairs.
    pair = torch.cat([column, column, independent[:, 1:2], independent[:, 1:2]], dim=1)
    expected = (4 * 1.0 + 8 * abs(pearson(column[:, 0], independent[:, 1]))) / 12
    assert mean_abs_correlation(pair) == pytest.approx(expected, abs=1e-5)
    # The chunked path gives the same answer: in float64 the two summation orders agree to
    # rounding; in float32 they differ by a few ulps of the sum (2.6e-6 seen), so compare relatively.
    pair64 = pair.double()
    assert mean_abs_correlation(pair64, chunk=1) == pytest.approx(mean_abs_correlation(pair64), rel=1e-12)
    assert mean_abs_correlation(pair, chunk=1) == pytest.approx(mean_abs_correlation(pair), rel=3e-5)


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.8, 0.9])
def test_kde_mutual_information_of_correlated_gaussians(rho):
    """I(X; Y) = -0.5 log(1 - rho^2) for a Gaussian pair. The data have std 0.14, where mi_ortho's
    bandwidth rule 0.15 n^(-1/5) is Silverman's rule of thumb; KDE estimates are biased, hence the
    loose tolerance."""
    n, reps = 400, 4
    z = torch.randn(reps, 2, n, generator=gen(4))
    x = 0.14 * z[:, 0]
    y = 0.14 * (rho * z[:, 0] + math.sqrt(1 - rho**2) * z[:, 1])
    estimate = kde_mutual_information(x, y, kde_bandwidth(n, 0.15)).mean().item()
    assert estimate == pytest.approx(-0.5 * math.log(1 - rho**2), abs=0.12)


def test_kde_mutual_information_matches_naive_double_loop_and_chunks():
    x = torch.rand(3, 12, generator=gen(5), dtype=torch.float64)
    y = torch.rand(3, 12, generator=gen(6), dtype=torch.float64)
    h = 0.2
    fast = kde_mutual_information(x, y, h)
    chunked = kde_mutual_information(x, y, h, chunk_elems=1)
    k = lambda u: math.exp(-u * u / (2 * h * h))  # noqa: E731
    for p in range(3):
        xs, ys = x[p].tolist(), y[p].tolist()
        total = 0.0
        for t in range(12):
            joint = sum(k(xs[t] - xs[s]) * k(ys[t] - ys[s]) for s in range(12)) / 12
            px = sum(k(xs[t] - xs[s]) for s in range(12)) / 12
            py = sum(k(ys[t] - ys[s]) for s in range(12)) / 12
            total += math.log(joint / (px * py))
        assert fast[p].item() == pytest.approx(total / 12, rel=1e-4)
    assert torch.allclose(fast, chunked)


def test_linear_ramp_gram_entropy_and_info_nce():
    assert [linear_ramp(s, 100, end=2.0) for s in (0, 50, 100, 500)] == [0.0, 1.0, 2.0, 2.0]
    assert linear_ramp(3, 0, end=0.5) == 0.5
    rows = torch.randn(5, 3, generator=gen(7))
    naive = torch.tensor([[float(rows[a] @ rows[b]) for b in range(5)] for a in range(5)])
    assert torch.allclose(gram_matrix(rows), naive)
    p = torch.tensor([0.5, 0.25, 0.25])
    assert categorical_entropy(p).item() == pytest.approx(-(0.5 * math.log(0.5) + 0.5 * math.log(0.25)))
    directions = torch.randn(6, 4, generator=gen(8))
    membership = torch.softmax(torch.randn(6, 3, generator=gen(9)), dim=-1)
    centroids = membership_centroids(directions, membership)
    assert torch.allclose(centroids[1], (membership[:, 1:2] * directions).sum(0) / membership[:, 1].sum())
    positive = torch.tensor([0, 1, 2, 0, 1, 2])
    loss = 0.0
    for i in range(6):
        cos = [F.cosine_similarity(directions[i], centroids[g], dim=0) / 0.1 for g in range(3)]
        loss += -(cos[positive[i]] - torch.logsumexp(torch.stack(cos), 0))
    got = info_nce_to_centroids(directions, centroids, positive, 0.1).item()
    assert got == pytest.approx(loss.item() / 6, rel=1e-5)


def test_geometric_median_known_cases():
    """Collinear points 0, 1, 2, 10 on a line: every point of [1, 2] is a median (and the mean, 3.25,
    is not); a triangle with a 120+ degree angle has its median at that vertex; elsewhere the
    first-order condition holds (the unit vectors to the points sum to zero)."""
    direction = F.normalize(torch.randn(5, generator=gen(40), dtype=torch.float64), dim=0)
    line = torch.tensor([0.0, 1.0, 2.0, 10.0], dtype=torch.float64).unsqueeze(-1) * direction
    t = float(geometric_median(line) @ direction)
    assert 1.0 - 1e-6 <= t <= 2.0 + 1e-6
    assert torch.allclose(geometric_median(line), t * direction, atol=1e-9)  # on the line
    triangle = torch.tensor([[0.0, 0.0], [1.0, 0.0], [-1.0, 0.2]], dtype=torch.float64)
    assert torch.allclose(geometric_median(triangle, iters=2000), torch.zeros(2, dtype=torch.float64), atol=1e-4)
    cloud = torch.randn(200, 6, generator=gen(41), dtype=torch.float64)
    cloud[:10] += 50.0  # outliers move the mean, not the median
    median = geometric_median(cloud, iters=1000, tol=1e-12)
    pull = F.normalize(cloud - median, dim=-1).sum(0)
    assert pull.norm() < 1e-6 * cloud.shape[0]
    assert median.norm() < 1.0 < cloud.mean(0).norm()
    assert geometric_median(cloud.float()).dtype == torch.float32


def test_capped_warmup_is_the_lr_rule():
    """min(warmup, max(1, total // 10)): what the platform caps its lr warm-up with."""
    assert capped_warmup(10_000, 1_000) == 100
    assert capped_warmup(50, 1_000) == 50
    assert capped_warmup(1_000, 5) == 1
    assert capped_warmup(0, 100) == 0


def test_auxk_reconstructs_the_residual_from_dead_latents_only():
    dead = torch.zeros(32, dtype=torch.bool)
    dead[[2, 3, 7, 11]] = True
    g = gen(46)
    x = torch.randn(10, 8, generator=g, dtype=torch.float64)
    x_hat = torch.randn(10, 8, generator=g, dtype=torch.float64)
    pre = torch.randn(10, 32, generator=g, dtype=torch.float64)
    pre[:, ~dead] += 5.0  # live latents have the largest pre-activations: they must still be ignored
    w_dec = torch.randn(32, 8, generator=g, dtype=torch.float64)
    base = auxk_loss(x, x_hat, pre, w_dec, dead, 2)
    other = w_dec.clone()
    other[~dead] = torch.randn(int((~dead).sum()), 8, generator=g, dtype=torch.float64)
    assert auxk_loss(x, x_hat, pre, other, dead, 2).item() == pytest.approx(base.item(), rel=1e-12)
    other = w_dec.clone()
    other[dead] *= 2.0
    assert auxk_loss(x, x_hat, pre, other, dead, 2).item() != pytest.approx(base.item(), rel=1e-6)


def test_penalty_warmups_reach_the_full_coefficient_by_ten_percent_of_a_short_run():
    """jumprelu's lambda ramps over 10,000 steps and cubic_ortho's gamma over the 1,000-step lr
    warm-up; after begin_run(200) both are full at step 20 (10% of the run), as the lr is."""
    x = torch.randn(32, 8, generator=gen(48))
    jump = variants.build("jumprelu", d_in=8, d_sae=16)
    cubic = variants.build("cubic_ortho", d_in=8, d_sae=16)
    with torch.no_grad():
        l0 = float(jump.loss(x, 10**7).terms["l0"])  # long past any warm-up
        assert float(jump.loss(x, 20).terms["l0"]) == pytest.approx(l0 * 20 / 10_000, rel=1e-5)  # never capped
        alpha = cubic.cfg.ortho_alpha
        assert cubic.gamma(20) == pytest.approx(alpha * 20 / 1000)
        for model in (jump, cubic):
            model.begin_run(200)
        assert float(jump.loss(x, 20).terms["l0"]) == pytest.approx(l0, rel=1e-6)
        assert float(jump.loss(x, 10).terms["l0"]) == pytest.approx(l0 / 2, rel=1e-6)
        assert cubic.gamma(20) == pytest.approx(alpha) and cubic.gamma(10) == pytest.approx(alpha / 2)
    clone = variants.from_config_dict("jumprelu", jump.cfg.to_dict())
    clone.load_state_dict(jump.state_dict())  # a checkpoint carries the run length
    assert clone.penalty_warmup(10_000) == 20


def test_init_from_data_puts_the_decoder_bias_at_the_geometric_median():
    x = torch.randn(64, 6, generator=gen(50)) + 3.0
    x[:4] += 40.0
    median = geometric_median(x)
    relu = variants.build("relu", d_in=6, d_sae=12)
    relu.init_from_data(x)
    assert torch.allclose(relu.b_dec, median, atol=1e-5)
    keep = variants.build("relu", d_in=6, d_sae=12, overrides={"b_dec_init": "init"})
    keep.init_from_data(x)
    assert torch.all(keep.b_dec == 0)
    for center_input in ("true", "false"):
        hsae = variants.build("hsae", d_in=6, d_sae=12, overrides={"center_input": center_input})
        with torch.no_grad():
            before = torch.relu((x - median) @ hsae.W1 + hsae.b1)
        hsae.init_from_data(x)
        assert torch.allclose(hsae.bd1, median, atol=1e-5)
        with torch.no_grad():
            assert torch.allclose(hsae.levels(x)[0], before, atol=1e-5)  # the encoder reads x - median
