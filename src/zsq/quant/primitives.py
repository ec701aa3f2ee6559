"""Pure, vectorised quantization primitives (no modules, no state).

Conventions
-----------
* Integer grid: ``q = clamp(round(x / scale) + zero_point, qmin, qmax)`` and
  ``x_hat = (q - zero_point) * scale`` (round half to even, as ``torch.round`` and ONNX do).
* Symmetric quantization is signed with a *narrow* range ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` and
  ``zero_point = 0`` (what ONNX Runtime expects for int8 weights).
* Asymmetric quantization is unsigned ``[0, 2^b - 1]``; the range is first widened to contain 0
  so that zero (padding, ReLU outputs) is represented exactly, and the zero-point is an integer.
* ``axis`` selects per-channel quantization: ``scale``/``zero_point`` have one entry per index
  along ``axis``; ``axis=None`` means per-tensor (0-dim scale/zero-point).
"""

from __future__ import annotations

import torch

# Smallest scale we ever produce: keeps constant or all-zero tensors well defined.
MIN_SCALE = 1e-8


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range ``(qmin, qmax)`` for ``bits`` bits (signed narrow if symmetric, else unsigned)."""
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def scale_zero_point(
    min_val: torch.Tensor, max_val: torch.Tensor, *, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero-point (int32) that cover ``[min_val, max_val]`` (elementwise).

    Works for per-tensor (0-dim) and per-channel (1-dim) ranges alike. Constant and all-zero
    ranges get a tiny positive scale instead of a division by zero.
    """
    min_val = torch.as_tensor(min_val, dtype=torch.float32)
    max_val = torch.as_tensor(max_val, dtype=torch.float32)
    qmin, qmax = qrange(bits, symmetric)
    if symmetric:
        amax = torch.maximum(min_val.abs(), max_val.abs())
        scale = (amax / qmax).clamp_min(MIN_SCALE)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
        return scale, zero_point
    lo = torch.minimum(min_val, torch.zeros_like(min_val))
    hi = torch.maximum(max_val, torch.zeros_like(max_val))
    scale = ((hi - lo) / float(qmax - qmin)).clamp_min(MIN_SCALE)
    zero_point = (qmin - torch.round(lo / scale)).clamp(qmin, qmax).to(torch.int32)
    return scale, zero_point


def _broadcast(t: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None or t.dim() == 0:
        return t
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, *, axis: int | None = None
) -> torch.Tensor:
    """Float tensor -> integer grid values (returned as int32)."""
    s = _broadcast(scale.to(x.dtype), x, axis)
    z = _broadcast(zero_point.to(x.dtype), x, axis)
    return torch.clamp(torch.round(x * (1.0 / s)) + z, qmin, qmax).to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, *, axis: int | None = None) -> torch.Tensor:
    """Integer grid values -> float32 tensor."""
    s = _broadcast(scale.to(torch.float32), q, axis)
    z = _broadcast(zero_point.to(torch.float32), q, axis)
    return (q.to(torch.float32) - z) * s


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, *, axis: int | None = None
) -> torch.Tensor:
    """Quantize-dequantize ``x`` in float (same values as ``dequantize(quantize(x))``).

    The gradient is the straight-through estimator inside the range and zero outside it.
    float32 inputs use PyTorch's fused kernels (bit-identical to the formula, much faster).
    """
    if x.dtype == torch.float32 and qmin <= 0 <= qmax and -128 <= qmin and qmax <= 255:
        if axis is None or scale.dim() == 0:
            return torch.fake_quantize_per_tensor_affine(
                x, scale.reshape(()).float(), zero_point.reshape(()).to(torch.int32), qmin, qmax)
        return torch.fake_quantize_per_channel_affine(
            x, scale.float(), zero_point.to(torch.int32), axis % x.dim(), qmin, qmax)
    s = _broadcast(scale.to(x.dtype), x, axis)
    z = _broadcast(zero_point.to(x.dtype), x, axis)
    inv = 1.0 / s
    q = torch.round(x * inv) + z
    q_c = torch.clamp(q, qmin, qmax)
    out = (q_c - z) * s
    if x.requires_grad:
        inside = (q >= qmin) & (q <= qmax)
        out = x * inside + (out - x * inside).detach()
    return out


def fake_quantize_inside(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor :func:`fake_quantize` of ``x`` (no autograd; the same values as the fused kernel, bit for bit)
    and the boolean mask of the elements whose code ``round(x / scale) + zero_point`` lies in ``[qmin, qmax]``
    (where the straight-through gradient passes).

    Written as a chain of in-place passes over one new tensor: on CPU this is about twice as fast as PyTorch's
    fused per-tensor kernels (``fake_quantize_per_tensor_affine`` and the mask-keeping variant behind its
    backward), which dominated a BRECQ step on ImageNet-sized activations."""
    x = x.detach()
    s = scale.detach().reshape(()).to(x.dtype)
    z = zero_point.detach().reshape(()).to(x.dtype)
    q = torch.mul(x, 1.0 / s).round_().add_(z)
    inside = (q >= qmin).logical_and_(q <= qmax)
    return q.clamp_(qmin, qmax).sub_(z).mul_(s), inside


def reduce_dims(x: torch.Tensor, axis: int | None) -> tuple[int, ...]:
    """Dimensions to reduce over to get per-``axis`` statistics (all dims when per-tensor)."""
    if axis is None:
        return tuple(range(x.dim()))
    axis = axis % x.dim()
    return tuple(d for d in range(x.dim()) if d != axis)


def minmax(x: torch.Tensor, axis: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of ``x`` per channel along ``axis`` (or over everything)."""
    if axis is None:
        return x.min(), x.max()
    flat = x.transpose(0, axis).reshape(x.shape[axis], -1)
    return flat.min(dim=1).values, flat.max(dim=1).values


def mse_weight_range(
    w: torch.Tensor, *, bits: int, symmetric: bool, axis: int | None, grid: int = 60, min_ratio: float = 0.3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipping range minimising ``||Q(w) - w||^2`` per channel, by a grid search over shrink ratios.

    Candidate ranges are ``ratio * [min, max]`` for ``ratio`` in ``[min_ratio, 1]``; all candidates are
    evaluated in one vectorised pass per chunk.
    """
    lo, hi = minmax(w, axis)
    qmin, qmax = qrange(bits, symmetric)
    if axis is None:
        flat = w.reshape(1, -1)
        lo, hi = lo.reshape(1), hi.reshape(1)
    else:
        flat = w.transpose(0, axis).reshape(w.shape[axis], -1)
    ratios = torch.linspace(min_ratio, 1.0, grid, dtype=flat.dtype, device=flat.device)
    best_err = torch.full((flat.shape[0],), float("inf"), device=flat.device)
    best_ratio = torch.ones(flat.shape[0], device=flat.device)
    for r in ratios:
        s, z = scale_zero_point(lo * r, hi * r, bits=bits, symmetric=symmetric)
        xq = fake_quantize(flat, s, z, qmin, qmax, axis=0)
        err = (xq - flat).pow(2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, r.expand_as(best_ratio), best_ratio)
    lo_b, hi_b = lo * best_ratio, hi * best_ratio
    if axis is None:
        return lo_b[0], hi_b[0]
    return lo_b, hi_b


# Grid of the output-error weight range search (output_error_grid): the step is the min/max step times a factor
# in [OUTPUT_GRID_MIN_FACTOR, OUTPUT_GRID_MAX_FACTOR] (OUTPUT_GRID_STEPS values), combined with every zero-point.
OUTPUT_GRID_MIN_FACTOR = 0.3
OUTPUT_GRID_MAX_FACTOR = 1.2
OUTPUT_GRID_STEPS = 61


def output_error_grid(
    w: torch.Tensor,
    moments: torch.Tensor,
    *,
    bits: int,
    symmetric: bool,
    factors: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel scale and zero-point that minimise the expected *output* error of nearest rounding.

    ``w`` is ``(C, K)``: each output channel's ``K`` weights (a depthwise conv's ``k*k`` taps). ``moments`` is
    ``(C, K, K)``: the second moment ``E[p p^T]`` of the ``K`` inputs each channel multiplies (its input
    patches). Channel ``c``'s output error power for quantized weights ``q`` is ``(q - w)^T M_c (q - w)``;
    unlike ``||q - w||^2`` it counts errors that cancel over correlated inputs (neighbouring pixels) as small.

    The search tries steps ``factor * s_minmax`` for every factor of ``factors`` (default
    ``linspace(OUTPUT_GRID_MIN_FACTOR, OUTPUT_GRID_MAX_FACTOR, OUTPUT_GRID_STEPS)``, to which 1 is always
    added) and, for asymmetric grids, every integer zero-point; symmetric grids keep zero-point 0. The min/max
    grid is among the candidates, so the result is never worse than it by this measure. Returns ``scale``
    (float32, ``(C,)``) and ``zero_point`` (int32, ``(C,)``).
    """
    if w.dim() != 2 or moments.shape != (w.shape[0], w.shape[1], w.shape[1]):
        raise ValueError(f"output_error_grid expects w (C, K) and moments (C, K, K), got {tuple(w.shape)} and "
                         f"{tuple(moments.shape)}")
    w = w.detach().float()
    m = moments.detach().float()
    qmin, qmax = qrange(bits, symmetric)
    lo, hi = minmax(w, 0)
    s0, z0 = scale_zero_point(lo, hi, bits=bits, symmetric=symmetric)
    if factors is None:
        factors = torch.linspace(OUTPUT_GRID_MIN_FACTOR, OUTPUT_GRID_MAX_FACTOR, OUTPUT_GRID_STEPS)
    factors = torch.cat([torch.ones(1), factors.float().reshape(-1).cpu()]).to(w.device)
    zs = (torch.zeros(1) if symmetric else torch.arange(qmin, qmax + 1, dtype=torch.float32)).to(w.device)
    zgrid = zs.reshape(-1, 1, 1)  # Z, 1, 1
    best_err = torch.full((w.shape[0],), float("inf"), device=w.device)
    best_s, best_z = s0.clone().to(w.device), z0.to(torch.float32).to(w.device)
    for f in factors:
        s = (s0.to(w.device) * f).clamp_min(MIN_SCALE).reshape(1, -1, 1)  # 1, C, 1
        q = torch.clamp(torch.round(w / s) + zgrid, qmin, qmax)  # Z, C, K
        d = (q - zgrid) * s - w
        err = torch.einsum("zci,cij,zcj->zc", d, m, d)
        e, iz = err.min(0)
        better = e < best_err
        best_err = torch.where(better, e, best_err)
        best_s = torch.where(better, s.reshape(-1), best_s)
        best_z = torch.where(better, zs[iz], best_z)
    return best_s.float(), best_z.to(torch.int32)
