"""zsq.quant.primitives: bit-exact against torch's fake-quantize ops, edge cases, STE, MSE weight ranges."""

from __future__ import annotations

import pytest
import torch

from zsq.quant import primitives as P

BITS = list(range(2, 9))


def _per_tensor_params(x: torch.Tensor, bits: int, symmetric: bool):
    lo, hi = P.minmax(x)
    s, z = P.scale_zero_point(lo, hi, bits=bits, symmetric=symmetric)
    qmin, qmax = P.qrange(bits, symmetric)
    return s, z, qmin, qmax


def _per_channel_params(x: torch.Tensor, bits: int, symmetric: bool, axis: int = 0):
    lo, hi = P.minmax(x, axis)
    s, z = P.scale_zero_point(lo, hi, bits=bits, symmetric=symmetric)
    qmin, qmax = P.qrange(bits, symmetric)
    return s, z, qmin, qmax


def _weights(gen: torch.Generator) -> torch.Tensor:
    # Per-channel magnitudes that differ by orders of magnitude, with an offset so ranges are asymmetric.
    w = torch.randn(8, 4, 3, 3, generator=gen)
    mag = torch.logspace(-3, 1, 8).view(8, 1, 1, 1)
    return w * mag + 0.3 * mag


# --------------------------------------------------------------------------------------------
# qrange / scale_zero_point
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
def test_qrange(bits):
    assert P.qrange(bits, True) == (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
    assert P.qrange(bits, False) == (0, 2**bits - 1)
    assert P.qrange(8, True) == (-127, 127)
    assert P.qrange(2, True) == (-1, 1)
    assert P.qrange(2, False) == (0, 3)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", BITS)
def test_scale_zero_point_covers_range(bits, symmetric):
    lo = torch.tensor([-3.0, -0.5, 0.0, 0.2, -7.0])
    hi = torch.tensor([5.0, 0.25, 0.0, 4.0, -1.0])
    s, z = P.scale_zero_point(lo, hi, bits=bits, symmetric=symmetric)
    qmin, qmax = P.qrange(bits, symmetric)
    assert s.dtype == torch.float32 and z.dtype == torch.int32
    assert s.shape == lo.shape and z.shape == lo.shape
    assert (s > 0).all() and torch.isfinite(s).all()
    assert ((z >= qmin) & (z <= qmax)).all()
    if symmetric:
        assert (z == 0).all()
    # The grid covers the range (up to half a step from rounding the zero-point).
    grid_lo = (qmin - z.float()) * s
    grid_hi = (qmax - z.float()) * s
    assert (grid_lo <= torch.minimum(lo, torch.zeros_like(lo)) + s / 2 + 1e-6).all()
    assert (grid_hi >= torch.maximum(hi, torch.zeros_like(hi)) - s / 2 - 1e-6).all()


def test_scale_zero_point_per_tensor_is_0dim():
    s, z = P.scale_zero_point(torch.tensor(-1.0), torch.tensor(2.0), bits=8, symmetric=False)
    assert s.dim() == 0 and z.dim() == 0


# --------------------------------------------------------------------------------------------
# Bit-exact against torch
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym_narrow_int", "asym_uint"])
@pytest.mark.parametrize("bits", BITS)
def test_fake_quantize_per_tensor_bit_exact_vs_torch(bits, symmetric):
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(4, 5, 7, 7, generator=gen) * 2.5 + 0.7
    s, z, qmin, qmax = _per_tensor_params(x, bits, symmetric)
    ours = P.fake_quantize(x, s, z, qmin, qmax)
    ref = torch.fake_quantize_per_tensor_affine(x, float(s), int(z), qmin, qmax)
    assert torch.equal(ours, ref)
    # The tensor-scale overload too, and values outside the calibrated range (clamped).
    x_wide = x * 3
    ours = P.fake_quantize(x_wide, s, z, qmin, qmax)
    ref = torch.fake_quantize_per_tensor_affine(x_wide, s, z, qmin, qmax)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym_narrow_int", "asym_uint"])
@pytest.mark.parametrize("bits", BITS)
def test_fake_quantize_per_channel_bit_exact_vs_torch(bits, symmetric):
    gen = torch.Generator().manual_seed(100 + bits)
    w = _weights(gen)
    s, z, qmin, qmax = _per_channel_params(w, bits, symmetric)
    ours = P.fake_quantize(w, s, z, qmin, qmax, axis=0)
    ref = torch.fake_quantize_per_channel_affine(w, s, z, 0, qmin, qmax)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quantize_per_channel_other_axis_bit_exact(symmetric):
    gen = torch.Generator().manual_seed(7)
    x = _weights(gen).transpose(0, 1).contiguous()  # channels along axis 1
    s, z, qmin, qmax = _per_channel_params(x, 4, symmetric, axis=1)
    assert s.shape == (8,)
    ours = P.fake_quantize(x, s, z, qmin, qmax, axis=1)
    ref = torch.fake_quantize_per_channel_affine(x, s, z, 1, qmin, qmax)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fake_quantize_values_identical_with_autograd(bits, symmetric):
    """The STE formulation must not change the forward values."""
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(2000, generator=gen) * 3
    s, z, qmin, qmax = _per_tensor_params(x * 0.5, bits, symmetric)  # some values clip
    plain = P.fake_quantize(x, s, z, qmin, qmax)
    with_grad = P.fake_quantize(x.clone().requires_grad_(True), s, z, qmin, qmax)
    assert torch.equal(plain, with_grad.detach())


# --------------------------------------------------------------------------------------------
# quantize / dequantize
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", BITS)
def test_quantize_dequantize_round_trip_equals_fake_quantize(bits, symmetric):
    gen = torch.Generator().manual_seed(200 + bits)
    w = _weights(gen)
    # per channel
    s, z, qmin, qmax = _per_channel_params(w, bits, symmetric)
    q = P.quantize(w, s, z, qmin, qmax, axis=0)
    assert q.dtype == torch.int32
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    assert torch.equal(P.dequantize(q, s, z, axis=0), P.fake_quantize(w, s, z, qmin, qmax, axis=0))
    # per tensor, with values beyond the range
    x = torch.randn(3, 50, generator=gen) * 4
    s, z, qmin, qmax = _per_tensor_params(x * 0.6, bits, symmetric)
    q = P.quantize(x, s, z, qmin, qmax)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    assert torch.equal(P.dequantize(q, s, z), P.fake_quantize(x, s, z, qmin, qmax))


# --------------------------------------------------------------------------------------------
# Edge cases
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("value", [3.7, -2.25, 0.0, 1e-12])
def test_constant_tensor(value, symmetric):
    x = torch.full((4, 4), value)
    s, z, qmin, qmax = _per_tensor_params(x, 8, symmetric)
    assert float(s) > 0 and torch.isfinite(s)
    out = P.fake_quantize(x, s, z, qmin, qmax)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, x, atol=float(s) / 2 + 1e-12, rtol=0)
    if value == 0.0:
        assert torch.equal(out, torch.zeros_like(x))
    ref = torch.fake_quantize_per_tensor_affine(x, float(s), int(z), qmin, qmax)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_all_zero_channel(bits, symmetric):
    gen = torch.Generator().manual_seed(11)
    w = _weights(gen)
    w[3] = 0.0
    s, z, qmin, qmax = _per_channel_params(w, bits, symmetric)
    assert (s > 0).all() and torch.isfinite(s).all()
    assert ((z >= qmin) & (z <= qmax)).all()
    out = P.fake_quantize(w, s, z, qmin, qmax, axis=0)
    assert torch.isfinite(out).all()
    assert torch.equal(out[3], torch.zeros_like(out[3]))
    q = P.quantize(w, s, z, qmin, qmax, axis=0)
    assert torch.equal(P.dequantize(q[3:4], s[3:4], z[3:4], axis=0)[0], torch.zeros_like(w[3]))
    # The other channels are unaffected by the zero channel and still match torch.
    ref = torch.fake_quantize_per_channel_affine(w, s, z, 0, qmin, qmax)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("bits", BITS)
def test_negative_only_range_represents_zero_exactly(bits):
    x = torch.linspace(-5.0, -1.0, 101)
    s, z, qmin, qmax = _per_tensor_params(x, bits, symmetric=False)
    assert int(z) == qmax  # 0 sits at the top of the unsigned grid
    zero = P.fake_quantize(torch.zeros(3), s, z, qmin, qmax)
    assert torch.equal(zero, torch.zeros(3))
    out = P.fake_quantize(x, s, z, qmin, qmax)
    assert float(out.max()) <= 0.0
    assert float(out.min()) <= -5.0 + float(s) / 2 + 1e-6


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("lo,hi", [(1.0, 4.0), (-0.37, 1.93), (-3.1, 0.05), (-1e-3, 250.0)])
def test_asymmetric_zero_is_exact(bits, lo, hi):
    s, z = P.scale_zero_point(torch.tensor(lo), torch.tensor(hi), bits=bits, symmetric=False)
    qmin, qmax = P.qrange(bits, False)
    assert qmin <= int(z) <= qmax
    assert float(P.fake_quantize(torch.zeros(()), s, z, qmin, qmax)) == 0.0


@pytest.mark.parametrize("symmetric", [True, False])
def test_two_bit_grid(symmetric):
    x = torch.linspace(-2.0, 3.0, 1001)
    s, z, qmin, qmax = _per_tensor_params(x, 2, symmetric)
    out = P.fake_quantize(x, s, z, qmin, qmax)
    levels = torch.unique(out)
    assert len(levels) <= (3 if symmetric else 4)
    assert len(levels) >= 2
    q = P.quantize(x, s, z, qmin, qmax)
    assert set(q.unique().tolist()) <= set(range(qmin, qmax + 1))
    if symmetric:
        assert set(levels.tolist()) <= {-float(s), 0.0, float(s)}
    ref = torch.fake_quantize_per_tensor_affine(x, float(s), int(z), qmin, qmax)
    assert torch.equal(out, ref)


# --------------------------------------------------------------------------------------------
# Straight-through estimator
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
def test_ste_gradient_one_inside_zero_outside(symmetric):
    bits = 4
    s, z = P.scale_zero_point(torch.tensor(-1.0), torch.tensor(1.0), bits=bits, symmetric=symmetric)
    qmin, qmax = P.qrange(bits, symmetric)
    grid_lo = (qmin - int(z)) * float(s)
    grid_hi = (qmax - int(z)) * float(s)
    inside = torch.tensor([grid_lo + 0.3 * float(s), -0.5, -0.01, 0.0, 0.2, 0.77, grid_hi - 0.3 * float(s)])
    outside = torch.tensor([grid_lo - 2 * float(s), -5.0, 3.0, grid_hi + 2 * float(s)])
    x = torch.cat([inside, outside]).requires_grad_(True)
    out = P.fake_quantize(x, s, z, qmin, qmax)
    out.backward(torch.ones_like(out))
    expected = torch.cat([torch.ones(len(inside)), torch.zeros(len(outside))])
    assert torch.equal(x.grad, expected)


@pytest.mark.parametrize("symmetric", [True, False])
def test_ste_gradient_matches_torch(symmetric):
    gen = torch.Generator().manual_seed(5)
    w = _weights(gen)
    s, z, qmin, qmax = _per_channel_params(w * 0.5, 3, symmetric)  # ranges too small: some values clip
    upstream = torch.randn(w.shape, generator=gen)
    a = w.clone().requires_grad_(True)
    P.fake_quantize(a, s, z, qmin, qmax, axis=0).backward(upstream)
    b = w.clone().requires_grad_(True)
    torch.fake_quantize_per_channel_affine(b, s, z, 0, qmin, qmax).backward(upstream)
    assert torch.equal(a.grad, b.grad)
    assert (a.grad == 0).any() and (a.grad != 0).any()


# --------------------------------------------------------------------------------------------
# minmax / reduce_dims
# --------------------------------------------------------------------------------------------


def test_minmax_per_tensor_and_per_channel():
    gen = torch.Generator().manual_seed(9)
    w = torch.randn(6, 3, 2, 2, generator=gen)
    lo, hi = P.minmax(w)
    assert lo.dim() == 0 and float(lo) == float(w.min()) and float(hi) == float(w.max())
    lo, hi = P.minmax(w, 0)
    assert torch.equal(lo, w.amin(dim=(1, 2, 3))) and torch.equal(hi, w.amax(dim=(1, 2, 3)))
    lo, hi = P.minmax(w, 1)
    assert torch.equal(lo, w.amin(dim=(0, 2, 3))) and torch.equal(hi, w.amax(dim=(0, 2, 3)))
    lo, hi = P.minmax(w, -1)
    assert torch.equal(lo, w.amin(dim=(0, 1, 2)))


def test_reduce_dims():
    x = torch.zeros(2, 3, 4, 5)
    assert P.reduce_dims(x, None) == (0, 1, 2, 3)
    assert P.reduce_dims(x, 1) == (0, 2, 3)
    assert P.reduce_dims(x, -1) == (0, 1, 2)


# --------------------------------------------------------------------------------------------
# MSE weight ranges
# --------------------------------------------------------------------------------------------


def _channel_errors(w, lo, hi, bits, symmetric, axis):
    s, z = P.scale_zero_point(lo, hi, bits=bits, symmetric=symmetric)
    qmin, qmax = P.qrange(bits, symmetric)
    err = (P.fake_quantize(w, s, z, qmin, qmax, axis=axis) - w).pow(2)
    if axis is None:
        return err.sum()
    return err.sum(dim=P.reduce_dims(w, axis))


def _heavy_tailed(gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(8, 16, 3, 3, generator=gen) * torch.logspace(-2, 0, 8).view(8, 1, 1, 1)
    # A few large outliers per channel (heavy tail).
    idx = torch.randint(0, 16 * 9, (8, 2), generator=gen)
    flat = w.view(8, -1)
    for c in range(8):
        flat[c, idx[c]] *= 12.0
    return w


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_mse_weight_range_never_worse_than_minmax(bits, symmetric, per_channel):
    gen = torch.Generator().manual_seed(bits)
    w = _heavy_tailed(gen)
    axis = 0 if per_channel else None
    lo, hi = P.mse_weight_range(w, bits=bits, symmetric=symmetric, axis=axis)
    lo0, hi0 = P.minmax(w, axis)
    if per_channel:
        assert lo.shape == (8,) and hi.shape == (8,)
    else:
        assert lo.dim() == 0 and hi.dim() == 0
    # Shrunk, never widened.
    assert (lo >= lo0 - 1e-7).all() and (hi <= hi0 + 1e-7).all()
    err_mse = _channel_errors(w, lo, hi, bits, symmetric, axis)
    err_mm = _channel_errors(w, lo0, hi0, bits, symmetric, axis)
    assert (err_mse <= err_mm * (1 + 1e-5) + 1e-12).all()


def test_mse_weight_range_strictly_better_on_heavy_tails():
    gen = torch.Generator().manual_seed(0)
    w = _heavy_tailed(gen)
    lo, hi = P.mse_weight_range(w, bits=4, symmetric=True, axis=0)
    err_mse = _channel_errors(w, lo, hi, 4, True, 0).sum()
    lo0, hi0 = P.minmax(w, 0)
    err_mm = _channel_errors(w, lo0, hi0, 4, True, 0).sum()
    assert err_mse < 0.9 * err_mm


def test_mse_weight_range_other_axis_shape():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(4, 6, 5, generator=gen)
    lo, hi = P.mse_weight_range(w, bits=4, symmetric=False, axis=1)
    assert lo.shape == (6,) and hi.shape == (6,)
    lo0, hi0 = P.minmax(w, 1)
    assert (_channel_errors(w, lo, hi, 4, False, 1) <= _channel_errors(w, lo0, hi0, 4, False, 1) * (1 + 1e-5)).all()


def test_mse_weight_range_zero_channel_is_finite():
    w = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(2))
    w[1] = 0
    lo, hi = P.mse_weight_range(w, bits=4, symmetric=True, axis=0)
    assert torch.isfinite(lo).all() and torch.isfinite(hi).all()
    s, _ = P.scale_zero_point(lo, hi, bits=4, symmetric=True)
    assert (s > 0).all()


def _output_error(w, m, s, z, bits, symmetric):
    qmin, qmax = P.qrange(bits, symmetric)
    q = torch.clamp(torch.round(w / s[:, None]) + z[:, None], qmin, qmax)
    d = (q - z[:, None]) * s[:, None] - w
    return torch.einsum("ci,cij,cj->c", d, m, d)


def _correlated_moments(c: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Second moments of strongly correlated inputs (as neighbouring pixels are), one (k, k) per channel."""
    base = torch.randn(c, 4 * k, k, generator=gen) + 3.0 * torch.randn(c, 4 * k, 1, generator=gen)
    return base.transpose(1, 2) @ base / (4 * k)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_output_error_grid_never_worse_than_minmax_and_better_on_skewed_kernels(bits, symmetric):
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(32, 9, generator=gen) * 0.1
    w[:, 4] += 1.0  # a dominant centre tap, as in depthwise kernels
    m = _correlated_moments(32, 9, gen)
    s, z = P.output_error_grid(w, m, bits=bits, symmetric=symmetric)
    assert s.shape == (32,) and z.shape == (32,) and z.dtype == torch.int32 and (s > 0).all()
    qmin, qmax = P.qrange(bits, symmetric)
    assert ((z >= qmin) & (z <= qmax)).all()
    if symmetric:
        assert (z == 0).all()
    lo, hi = P.minmax(w, 0)
    s0, z0 = P.scale_zero_point(lo, hi, bits=bits, symmetric=symmetric)
    err = _output_error(w, m, s, z, bits, symmetric)
    err0 = _output_error(w, m, s0, z0.float(), bits, symmetric)
    assert (err <= err0 * (1 + 1e-5) + 1e-12).all()
    if bits == 4:  # a real gain, not just a tie, where the grid is coarse
        assert err.sum() < 0.8 * err0.sum()


def test_output_error_grid_checks_shapes():
    with pytest.raises(ValueError, match=r"moments \(C, K, K\)"):
        P.output_error_grid(torch.randn(4, 9), torch.randn(4, 9), bits=4, symmetric=False)
