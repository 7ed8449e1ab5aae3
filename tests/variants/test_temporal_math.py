"""temporal's defining maths on tiny tensors, against an independent (naive) computation."""

import pytest
import torch
from math_helpers import gen

import variants

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


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
