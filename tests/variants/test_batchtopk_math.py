"""batchtopk's defining maths on tiny tensors, against an independent (naive) computation."""

import pytest
import torch
from math_helpers import gen

import variants

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


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


def test_batchtopk_threshold_window_is_capped_at_ten_percent_of_the_run():
    model = variants.build("batchtopk", d_in=8, d_sae=32, overrides={"k": "4", "threshold_beta": "0.999"})
    assert model.threshold_ema_beta() == pytest.approx(0.999)  # before begin_run: as configured
    model.begin_run(300)
    assert model.threshold_ema_beta() == pytest.approx(1 - 1 / 30)  # a 30-step window, not 1000
    model.begin_run(100_000)
    assert model.threshold_ema_beta() == pytest.approx(0.999)
