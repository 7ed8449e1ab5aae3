"""matryoshka_batchtopk's defining maths on tiny tensors, against an independent (naive) computation."""

import pytest
import torch
from math_helpers import gen

import variants

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


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
