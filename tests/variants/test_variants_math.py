"""Each variant's defining maths on tiny tensors, against an independent (naive) computation."""

import math

import numpy as np
import pytest
import torch
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


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def pearson(a, b) -> float:
    """Naive Pearson correlation; 0 when either side is constant."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std()))


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


# -- shared maths ---------------------------------------------------------------------------------
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


# -- relu and topk ----------------------------------------------------------------------------------
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


# -- AuxK (topk and batchtopk) ----------------------------------------------------------------------
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


# -- batchtopk --------------------------------------------------------------------------------------
def test_batchtopk_training_keeps_k_times_batch_and_tracks_threshold():
    model = variants.build("batchtopk", d_in=8, d_sae=32, overrides={"k": "4", "threshold_beta": "0.5"})
    x = torch.randn(10, 8, generator=gen(10))
    f = model.encode(x)
    pre = model.pre_activations(x).detach()
    assert int((f > 0).sum()) == 40  # k * B over the whole batch, not k per token
    assert (f > 0).sum(-1).unique().numel() > 1
    kept_min = f[f > 0].min()
    assert torch.all(pre[pre.relu() > kept_min] == f[pre.relu() > kept_min])
    model.loss(x, 0)
    assert torch.allclose(model.threshold, kept_min.expand(32))  # the first batch sets it
    x2 = 2 * torch.randn(10, 8, generator=gen(11))
    kept_min2 = model.encode(x2).detach()
    kept_min2 = kept_min2[kept_min2 > 0].min()
    model.loss(x2, 1)
    assert torch.allclose(model.threshold, (0.5 * kept_min + 0.5 * kept_min2).expand(32))


def test_batchtopk_inference_uses_the_threshold():
    model = variants.build("batchtopk", d_in=8, d_sae=32, overrides={"k": "4"}).eval()
    model.threshold.fill_(0.3)
    x = torch.randn(50, 8, generator=gen(12))
    pre = model.pre_activations(x).detach()
    f = model.encode(x).detach()
    assert torch.equal(f, torch.where(pre > 0.3, pre, torch.zeros_like(pre)))
    assert ((pre > 0) & (pre <= 0.3)).any() and torch.all(f[pre <= 0.3] == 0)
    # Per-token independence: a token's latents do not depend on the rest of the batch.
    assert torch.equal(model.encode(x[:1]), f[:1])
    assert torch.equal(model.jumprelu_threshold(), torch.full((32,), 0.3))


# -- matryoshka_batchtopk ---------------------------------------------------------------------------
def matryoshka(**overrides):
    model = variants.build(
        "matryoshka_batchtopk", d_in=8, d_sae=32, overrides={"k": "4", "matryoshka_widths": "4,8,20,32", **overrides}
    ).double()
    with torch.no_grad():
        model.W_enc.mul_(10.0)  # token-dependent selections that reach every prefix
        model.b_enc.copy_(0.3 * torch.randn(32, generator=gen(59), dtype=torch.float64))
        model.b_dec.copy_(torch.linspace(-1.0, 1.0, 8, dtype=torch.float64))
    return model


def naive_prefix_mses(f, w_dec, b_dec, x, widths) -> list[float]:
    """||x - (f[:m] W_dec[:m] + b_dec)||^2 summed over d_in, averaged over tokens, per prefix."""
    out = []
    for m in widths:
        total = 0.0
        for t in range(x.shape[0]):
            for d in range(x.shape[1]):
                x_hat = float(b_dec[d]) + sum(float(f[t, i]) * float(w_dec[i, d]) for i in range(m))
                total += (float(x[t, d]) - x_hat) ** 2
        out.append(total / x.shape[0])
    return out


@pytest.mark.parametrize("prefix_coeff", [1.0, 0.25])
def test_matryoshka_prefix_losses_match_a_loop_over_prefixes(prefix_coeff):
    model = matryoshka(prefix_coeff=repr(prefix_coeff))
    x = torch.randn(12, 8, generator=gen(60), dtype=torch.float64)
    out = model.loss(x)  # training mode: batch top-k over the whole dictionary
    f, w, b = out.latents.detach(), model.W_dec.detach(), model.b_dec.detach()
    assert int((f > 0).sum()) == 4 * 12
    assert all((f[:, start:end] > 0).any() for start, end in ((0, 4), (4, 8), (8, 20), (20, 32)))
    mses = naive_prefix_mses(f, w, b, x, (4, 8, 20, 32))
    assert out.terms["mse"].item() == pytest.approx(mses[-1], rel=1e-9)  # the full dictionary's
    assert out.terms["prefix_mse"].item() == pytest.approx(prefix_coeff * sum(mses[:-1]), rel=1e-9)
    assert out.terms["auxk"].item() == 0.0  # nothing is dead yet
    assert out.total.item() == pytest.approx(mses[-1] + prefix_coeff * sum(mses[:-1]), rel=1e-9)
    torch.testing.assert_close(out.recon, model.decode(f), rtol=1e-12, atol=1e-12)
    assert len({round(m, 9) for m in mses}) == 4  # each prefix reconstructs differently


def test_matryoshka_prefix_gradients_reach_only_the_prefixes_latents():
    """The innermost prefix's MSE trains only its own decoder rows (and b_dec)."""
    model = matryoshka(matryoshka_widths="4,32")
    x = torch.randn(12, 8, generator=gen(63), dtype=torch.float64)
    out = model.loss(x)
    assert (out.latents[:, :4] > 0).any()
    out.terms["prefix_mse"].backward()
    assert torch.all(model.W_dec.grad[4:] == 0) and model.W_dec.grad[:4].abs().sum() > 0
    assert model.b_dec.grad.abs().sum() > 0


def test_matryoshka_widths_from_strings_defaults_and_errors():
    from variants.base import ConfigError

    assert variants.build("matryoshka_batchtopk", d_in=8, d_sae=5120).widths == (320, 640, 1280, 2560, 5120)
    assert variants.build("matryoshka_batchtopk", d_in=8, d_sae=24, overrides={"k": "4"}).widths == (1, 3, 6, 12, 24)
    built = variants.build("matryoshka_batchtopk", d_in=8, d_sae=64, overrides={"matryoshka_widths": " 8, 16,64"})
    assert built.widths == (8, 16, 64)
    for bad in ("8,16", "16,8,64", "8,8,64", "0,64", "8,x,64"):
        with pytest.raises(ConfigError, match="matryoshka_widths"):
            variants.build("matryoshka_batchtopk", d_in=8, d_sae=64, overrides={"matryoshka_widths": bad})


def test_matryoshka_threshold_is_learnt_as_batchtopk_learns_it():
    """Same weights, same batches: the same k*B selection and the same tracked threshold, and the
    threshold (not the batch) decides at inference, token by token."""
    overrides = {"k": "4", "threshold_beta": "0.5", "seed": "2"}
    ours = variants.build("matryoshka_batchtopk", d_in=8, d_sae=32, overrides=overrides)
    plain = variants.build("batchtopk", d_in=8, d_sae=32, overrides=overrides)
    for seed, scale in ((62, 1.0), (63, 2.0)):
        x = scale * torch.randn(10, 8, generator=gen(seed))
        assert torch.equal(ours.loss(x).latents, plain.loss(x).latents)
    assert torch.equal(ours.threshold, plain.threshold) and int(ours.threshold_updates) == 2
    ours.eval()
    x = torch.randn(50, 8, generator=gen(64))
    pre = ours.pre_activations(x).detach()
    f = ours.encode(x).detach()
    assert torch.equal(f, torch.where(pre > ours.threshold, pre, torch.zeros_like(pre)))
    assert torch.equal(ours.encode(x[:1]), f[:1])


def test_matryoshka_diagnostics_report_each_prefix():
    model = matryoshka().eval()
    model.threshold.fill_(0.05)
    x = torch.randn(40, 8, generator=gen(65), dtype=torch.float64)
    diag = model.diagnostics(x)
    f = model.encode(x).detach()
    mses = naive_prefix_mses(f, model.W_dec.detach(), model.b_dec.detach(), x, (4, 8, 20, 32))
    variance = float((x - x.mean(0)).pow(2).sum(-1).mean())
    for m, mse in zip((4, 8, 20, 32), mses):
        assert diag[f"prefix_{m}_explained_variance"] == pytest.approx(1 - mse / variance, rel=1e-9)
        l0 = sum(1 for t in range(40) for i in range(m) if f[t, i] > 0) / 40
        assert diag[f"prefix_{m}_l0"] == pytest.approx(l0, rel=1e-12)
    assert diag["prefix_4_l0"] < diag["prefix_32_l0"]
    assert diag["threshold"] == pytest.approx(0.05)


# -- gated ------------------------------------------------------------------------------------------
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


# -- jumprelu ---------------------------------------------------------------------------------------
def test_jumprelu_ste_gradient_only_inside_the_bandwidth():
    from variants.jumprelu import jumprelu, step_fn

    eps, theta0 = 0.01, 0.5
    # Columns: z inside the band (|z - theta| < eps / 2) for latents 0 and 1, outside for 2 and 3.
    z = torch.tensor(
        [
            [theta0 + 0.002, theta0 - 0.004, theta0 + 0.2, theta0 - 0.02],
            [theta0 - 0.001, theta0 + 0.3, theta0 - 0.3, theta0 + 0.006],
        ],
        requires_grad=True,
    )
    theta = torch.full((4,), theta0, requires_grad=True)
    jumprelu(z, theta, eps).sum().backward()
    assert torch.allclose(theta.grad, torch.tensor([-2 * theta0 / eps, -theta0 / eps, 0.0, 0.0]))
    assert torch.equal(z.grad, (z > theta0).float())
    theta.grad = None
    z.grad = None
    step_fn(z, theta, eps).sum().backward()
    assert torch.allclose(theta.grad, torch.tensor([-2 / eps, -1 / eps, 0.0, 0.0]))
    assert torch.all(z.grad == 0)
    assert torch.equal(jumprelu(z, theta, eps), z * (z > theta0))


def test_jumprelu_l0_gradient_reaches_only_thresholds_near_preactivations():
    model = variants.build("jumprelu", d_in=8, d_sae=16, overrides={"bandwidth": "0.01", "l0_warmup_steps": "0"})
    x = torch.randn(64, 8, generator=gen(13))
    pre = model.pre_activations(x).detach()
    with torch.no_grad():  # latents 0-7: a threshold at one of their pre-activations; 8-15: far above all
        model.log_threshold[:8] = pre[:, :8].max(0).values.log()
        model.log_threshold[8:] = math.log(50.0)
    out = model.loss(x, 0)
    out.terms["l0"].backward()
    theta = model.jumprelu_threshold().detach()
    near = ((pre - theta).abs() < 0.005).any(0)
    assert near[:8].all() and not near[8:].any()
    grad = model.log_threshold.grad
    assert torch.all(grad[8:] == 0) and torch.all(grad[:8] < 0)
    assert model.W_enc.grad is None or torch.all(model.W_enc.grad == 0)  # the L0 STE passes nothing to z


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


# -- mi_ortho ---------------------------------------------------------------------------------------
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


# -- cubic_ortho ------------------------------------------------------------------------------------
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


# -- contrastive_hier -------------------------------------------------------------------------------
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


# -- group_ib ---------------------------------------------------------------------------------------
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


# -- hsae -------------------------------------------------------------------------------------------
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


# -- temporal ---------------------------------------------------------------------------------------
def test_temporal_encoder_input_matches_a_naive_loop_and_is_causal():
    model = variants.build("temporal", d_in=3, d_sae=8, overrides={"dilations": "1,2,4", "kernel_size": "2"})
    with torch.no_grad():
        model.taps.copy_(torch.randn(model.taps.shape, generator=gen(27)))
    x = torch.randn(2, 10, 3, generator=gen(28))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[:, 0] = False
    u = model.encoder_input(x, mask)
    offsets = [1, 2, 4]  # kernel 2 at dilation d reads offsets 0 (the token itself) and d
    assert model.offsets == offsets
    for b in range(2):
        for t in range(10):
            expected = x[b, t].clone()
            for tap, off in zip(model.taps, offsets):
                if t - off >= 0 and mask[b, t - off]:
                    expected += tap * x[b, t - off]
            assert torch.allclose(u[b, t], expected, atol=1e-6)
    later = x.clone()
    later[:, 6:] += 5.0
    f, g = model.encode(x, mask), model.encode(later, mask)
    assert torch.equal(f[:, :6], g[:, :6]) and not torch.equal(f[:, 6:], g[:, 6:])


def test_temporal_full_convolution_matches_a_naive_loop():
    full = {"dilations": "2", "kernel_size": "2", "depthwise": "false"}  # offsets 0 and 2
    model = variants.build("temporal", d_in=3, d_sae=8, overrides=full)
    with torch.no_grad():
        model.taps.copy_(torch.randn(model.taps.shape, generator=gen(29)))
    x = torch.randn(1, 5, 3, generator=gen(30))
    u = model.encoder_input(x)
    for t in range(5):
        expected = x[0, t] + (x[0, t - 2] @ model.taps[0] if t >= 2 else 0.0)
        assert torch.allclose(u[0, t], expected, atol=1e-6)
    assert torch.allclose(model.encode(x[0]), model.encode(x)[0])  # a single (T, d_in) context


@pytest.mark.parametrize(
    "dilations, kernel_size, expected",
    [
        ("1,2,4", 2, [1, 2, 4]),
        ("1,2,4", 3, [1, 2, 4, 8]),
        ("1,2,4", 1, []),
        ("3", 4, [3, 6, 9]),
        ("2,4", 3, [2, 4, 8]),
    ],
)
def test_temporal_taps_read_distinct_offsets_and_offset_zero_is_the_token(dilations, kernel_size, expected):
    """A kernel of size K at dilation d reads offsets 0, d, ..., (K-1) d; offset 0 is the one shared
    identity path and no two taps read the same offset."""
    model = variants.build(
        "temporal", d_in=3, d_sae=8, overrides={"dilations": dilations, "kernel_size": str(kernel_size)}
    )
    reach = sorted({k * d for d in map(int, dilations.split(",")) for k in range(kernel_size)})
    assert model.offsets == expected == [o for o in reach if o > 0]
    assert len(set(model.offsets)) == len(model.offsets) == (0 if model.taps is None else model.taps.shape[0])
    x = torch.randn(1, 12, 3, generator=gen(32))
    assert torch.equal(model.encoder_input(x), x)  # taps start at zero: just the token


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


# -- adaptive_mask ----------------------------------------------------------------------------------
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


def test_batchtopk_threshold_window_is_capped_at_ten_percent_of_the_run():
    model = variants.build("batchtopk", d_in=8, d_sae=32, overrides={"k": "4", "threshold_beta": "0.999"})
    assert model.threshold_ema_beta() == pytest.approx(0.999)  # before begin_run: as configured
    model.begin_run(300)
    assert model.threshold_ema_beta() == pytest.approx(1 - 1 / 30)  # a 30-step window, not 1000
    model.begin_run(100_000)
    assert model.threshold_ema_beta() == pytest.approx(0.999)


def test_topk_training_decode_is_the_dense_decode():
    """The training loss decodes the k non-zeros sparsely; it must be the dense decode of the same code."""
    model = variants.build("topk", d_in=8, d_sae=32, overrides={"k": "4"}).double()
    x = torch.randn(50, 8, generator=gen(77), dtype=torch.float64)
    out = model.loss(x)
    assert torch.allclose(out.recon, model.decode(model.encode(x)), rtol=1e-12, atol=1e-12)
    assert torch.equal(out.latents, model.encode(x))
