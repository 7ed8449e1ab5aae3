"""jumprelu's defining maths on tiny tensors, against an independent (naive) computation."""

import math

import pytest
import torch
from math_helpers import gen

import variants

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


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
