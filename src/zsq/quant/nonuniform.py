"""Non-uniform weight quantization: per layer (or per output channel) a codebook of ``2^b`` levels
whose spacing follows the weight distribution, and ``b``-bit indices into it.

The scheme (after GVSL & Kumar, "Hybrid and non-uniform quantization methods using retro synthesis
data", 2020: "the weights are grouped into different clusters and these clusters are assigned a
varied number of quantization steps depending on the number of weights and their ranges"):

1. **Clusters by value range.** For each group of weights (a whole tensor, or one output channel)
   with mean ``mu``, standard deviation ``sigma`` and extremes ``[lo, hi]``, the range is cut at
   ``mu +- e_k * sigma`` for ``e`` in ``edges_sigma`` (default ``(1, 2)``), clipped to ``[lo, hi]``:
   a dense central cluster ``[mu - sigma, mu + sigma]``, two shoulders and two sparse tails
   (``2 * len(edges_sigma) + 1`` clusters, some empty when a group has no tail).
2. **Levels by population and range.** Cluster ``i`` holds ``n_i`` weights over a range of width
   ``r_i``. Quantized with ``a_i`` evenly spaced levels (cells of width ``r_i / a_i``), its squared
   error is about ``n_i * (r_i / a_i)^2 / 12``. The ``L = 2^b`` levels are apportioned to minimise the
   sum of these terms subject to ``sum_i a_i = L`` and ``a_i >= 1`` for every non-empty cluster
   (when ``L`` allows): in the continuous relaxation ``a_i = L * (n_i r_i^2)^(1/3) / sum_j (n_j r_j^2)^(1/3)``
   (more levels where there are more weights and a wider range; the Panter-Dite rule). The integer
   allocation is the exact minimiser, found greedily: starting from one level per non-empty cluster,
   each remaining level goes to the cluster whose error drops most, ``n_i r_i^2 (1/a_i^2 - 1/(a_i+1)^2)``
   (greedy is optimal for a separable convex objective). Empty clusters get no level.
3. **Codebook.** Inside cluster ``i`` (range ``[e_i, e_i + r_i]``) the levels are the centres of
   ``a_i`` equal cells: ``e_i + (j + 1/2) r_i / a_i``, ``j = 0..a_i-1``. The ``L`` levels are sorted.
   Optionally ``refine_iters`` Lloyd steps move each level to the mean of the weights mapped to it
   (never increases the squared error; default 0, i.e. the paper's scheme as described above).
4. **Quantization.** Every weight maps to its nearest level (binary search against the midpoints
   of adjacent levels); the stored form is the level index (``b`` bits) plus the codebook.

The codebook is rounded to float16 when that is exact enough to be lossless on reload (every level
within float16's normal range), so checkpoints store it as float16 (2 bytes/level); otherwise
float32. :func:`codebook_storage_dtype` tells which.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

from ..errors import ConfigError

DEFAULT_EDGES_SIGMA: tuple[float, ...] = (1.0, 2.0)
DEFAULT_REFINE_ITERS = 0
FP16_MAX = 65504.0
FP16_MIN_NORMAL = 6.103515625e-05
_BIG = 1e300


# ------------------------------------------------------------------------------------------------
# Pure primitives (vectorised over groups: rows of a (G, n) matrix)
# ------------------------------------------------------------------------------------------------


def weight_rows(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """``w`` as a (groups, weights per group) matrix: one row per output channel, or a single row."""
    return w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)


def check_edges(edges_sigma: Sequence[float]) -> tuple[float, ...]:
    """Validate cluster edges (strictly increasing positive multiples of sigma)."""
    try:
        e = tuple(float(v) for v in edges_sigma)
    except (TypeError, ValueError):
        raise ConfigError(f"edges_sigma must be a sequence of positive numbers, got {edges_sigma!r}") from None
    if any(not math.isfinite(v) or v <= 0 for v in e) or any(b <= a for a, b in zip(e, e[1:])):
        raise ConfigError(f"edges_sigma must be strictly increasing positive numbers (e.g. (1, 2)), "
                          f"got {edges_sigma!r}")
    return e


def cluster_edges(rows: torch.Tensor, edges_sigma: Sequence[float] = DEFAULT_EDGES_SIGMA) -> torch.Tensor:
    """Cluster boundaries per row, ``(G, 2k + 2)`` float64 and non-decreasing:
    ``[lo, mu - e_k s, ..., mu - e_1 s, mu + e_1 s, ..., mu + e_k s, hi]`` clipped to ``[lo, hi]``."""
    e = torch.tensor(check_edges(edges_sigma), dtype=torch.float64)
    x = rows.detach().double()
    lo, hi = x.min(dim=1).values, x.max(dim=1).values
    mu = x.mean(dim=1)
    sigma = x.std(dim=1, unbiased=False) if x.shape[1] > 1 else torch.zeros_like(mu)
    offsets = torch.cat([-e.flip(0), e])  # (2k,)
    inner = mu[:, None] + offsets[None, :] * sigma[:, None]
    inner = torch.minimum(torch.maximum(inner, lo[:, None]), hi[:, None])
    edges = torch.cat([lo[:, None], inner, hi[:, None]], dim=1)
    return torch.cummax(edges, dim=1).values


def cluster_index(rows: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Cluster of every weight, ``(G, n)`` int64 in ``0..K-1`` (a weight on an inner edge goes right;
    the maximum belongs to the last non-empty cluster ending at ``hi``)."""
    inner = edges[:, 1:-1].contiguous()
    idx = torch.searchsorted(inner, rows.detach().double().contiguous(), right=True)
    # Clusters of zero width cannot hold weights: move a weight on a repeated edge to the cluster left of it.
    k = edges.shape[1] - 1
    widths = edges[:, 1:] - edges[:, :-1]
    empty = widths <= 0
    # walk left until a cluster of positive width (or cluster 0) is reached
    for _ in range(k):
        bad = torch.gather(empty, 1, idx) & (idx > 0)
        if not bool(bad.any()):
            break
        idx = idx - bad.long()
    return idx


def cluster_stats(rows: torch.Tensor, edges: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Population ``n_i`` (float64) and range width ``r_i`` of every cluster, each ``(G, K)``."""
    idx = cluster_index(rows, edges)
    k = edges.shape[1] - 1
    counts = torch.zeros(rows.shape[0], k, dtype=torch.float64).scatter_add_(
        1, idx, torch.ones_like(idx, dtype=torch.float64))
    widths = (edges[:, 1:] - edges[:, :-1]).clamp_min(0.0)
    return counts, widths


def apportion_levels(counts: torch.Tensor, widths: torch.Tensor, total: int) -> torch.Tensor:
    """Integer levels per cluster, ``(G, K)`` int64, each row summing to ``total``.

    Minimises ``sum_i n_i r_i^2 / a_i^2`` with ``a_i >= 1`` for every non-empty cluster (as far as
    ``total`` allows; non-empty clusters are served in order of ``n_i r_i^2`` first) and ``a_i = 0`` for
    empty ones. A row without any weight gets all levels in its first cluster.
    """
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ConfigError(f"the number of levels must be a positive integer, got {total!r}")
    counts = counts.double()
    weight = counts * widths.double() ** 2
    nonempty = counts > 0
    alloc = torch.zeros(counts.shape, dtype=torch.int64)
    no_weights = ~nonempty.any(dim=1)
    rows = torch.arange(counts.shape[0])
    for _ in range(total):
        a = alloc.double()
        gain = weight * (1.0 / a.clamp_min(1.0) ** 2 - 1.0 / (a + 1.0) ** 2)
        gain = torch.where(a == 0, _BIG + weight, gain)  # the first level of a non-empty cluster comes first
        gain = torch.where(nonempty, gain, torch.full_like(gain, -1.0))
        gain[no_weights, 0] = 1.0
        best = gain.argmax(dim=1)
        alloc[rows, best] += 1
    return alloc


def codebook_from_clusters(edges: torch.Tensor, alloc: torch.Tensor) -> torch.Tensor:
    """Sorted levels ``(G, L)``: ``a_i`` centres of equal cells inside each cluster's range."""
    g, _ = alloc.shape
    total = int(alloc[0].sum())
    ends = torch.cumsum(alloc, dim=1)  # (G, K)
    t = torch.arange(total).expand(g, total).contiguous()
    cluster = torch.searchsorted(ends.contiguous(), t, right=True)  # level t lies in this cluster
    starts = ends - alloc
    j = (t - torch.gather(starts, 1, cluster)).double()
    a = torch.gather(alloc, 1, cluster).double()
    left = torch.gather(edges[:, :-1], 1, cluster)
    width = torch.gather((edges[:, 1:] - edges[:, :-1]).clamp_min(0.0), 1, cluster)
    levels = left + (j + 0.5) * width / a
    return torch.sort(levels, dim=1).values


def nearest_level(rows: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index (``(G, n)`` int64) of the nearest codebook level of every weight; ``codebook`` sorted."""
    cb = codebook.to(rows.dtype)
    mids = ((cb[:, 1:] + cb[:, :-1]) * 0.5).contiguous()
    return torch.searchsorted(mids, rows.contiguous(), right=False)


def lloyd_refine(rows: torch.Tensor, codebook: torch.Tensor, iters: int) -> torch.Tensor:
    """``iters`` Lloyd steps: each level moves to the mean of the weights mapped to it (levels that
    receive no weight stay). Returns the sorted, refined codebook (float64)."""
    x = rows.detach().double()
    cb = codebook.double().clone()
    for _ in range(iters):
        idx = nearest_level(x, cb)
        sums = torch.zeros_like(cb).scatter_add_(1, idx, x)
        cnt = torch.zeros_like(cb).scatter_add_(1, idx, torch.ones_like(x))
        cb = torch.where(cnt > 0, sums / cnt.clamp_min(1.0), cb)
        cb = torch.sort(cb, dim=1).values
    return cb


def fp16_exact(codebook: torch.Tensor) -> torch.Tensor:
    """``codebook`` rounded to float16 (returned as float32) where every level fits float16's normal
    range (levels of exactly 0 allowed); rows that do not fit keep float32 values."""
    cb = codebook.float()
    a = cb.abs()
    ok = ((a <= FP16_MAX) & ((a >= FP16_MIN_NORMAL) | (a == 0))).all(dim=1, keepdim=True)
    return torch.where(ok, cb.half().float(), cb)


def codebook_storage_dtype(codebook: torch.Tensor) -> torch.dtype:
    """float16 when every level of ``codebook`` is exactly representable in float16, else float32."""
    cb = codebook.detach().float()
    if bool((cb.abs() <= FP16_MAX).all()) and torch.equal(cb.half().float(), cb):
        return torch.float16
    return torch.float32


def fit_codebook(w: torch.Tensor, *, bits: int, per_channel: bool,
                 edges_sigma: Sequence[float] = DEFAULT_EDGES_SIGMA,
                 refine_iters: int = DEFAULT_REFINE_ITERS) -> torch.Tensor:
    """The ``(groups, 2^bits)`` float32 codebook of ``w`` (groups = output channels or 1)."""
    rows = weight_rows(w.detach(), per_channel).double()
    edges = cluster_edges(rows, edges_sigma)
    counts, widths = cluster_stats(rows, edges)
    alloc = apportion_levels(counts, widths, 2 ** bits)
    cb = codebook_from_clusters(edges, alloc)
    if refine_iters:
        cb = lloyd_refine(rows, cb, refine_iters)
    return torch.sort(fp16_exact(cb), dim=1).values


def quantize_indices(w: torch.Tensor, codebook: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """Codebook index of every weight, shaped like ``w`` (int64)."""
    rows = weight_rows(w.detach(), per_channel)
    return nearest_level(rows.float(), codebook.float()).reshape(w.shape)


def dequantize_indices(idx: torch.Tensor, codebook: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """The weights that ``idx`` (shaped like the weight) selects from ``codebook``."""
    rows = weight_rows(idx, per_channel).long()
    if not per_channel:
        return codebook.reshape(1, -1).expand(1, codebook.shape[-1]).gather(1, rows).reshape(idx.shape)
    return torch.gather(codebook, 1, rows).reshape(idx.shape)


def fake_quantize_nonuniform(w: torch.Tensor, codebook: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """Every weight replaced by its nearest level; straight-through gradient."""
    rows = weight_rows(w, per_channel)
    cb = codebook.to(w.dtype)
    idx = nearest_level(rows.detach(), cb)
    q = torch.gather(cb, 1, idx).reshape(w.shape)
    if w.requires_grad and torch.is_grad_enabled():
        return q + (w - w.detach())  # exactly q in value; gradient 1 (straight-through)
    return q


def pack_indices(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer indices in ``0..2^bits-1`` into a uint8 array at ``bits`` bits each (little-endian
    bit order). Length ``ceil(numel * bits / 8)``."""
    flat = idx.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2 ** bits):
        raise ConfigError(f"indices must lie in 0..{2 ** bits - 1} to be packed at {bits} bits")
    shifts = torch.arange(bits)
    bit_matrix = ((flat[:, None] >> shifts[None, :]) & 1).reshape(-1)
    pad = (-bit_matrix.numel()) % 8
    if pad:
        bit_matrix = torch.cat([bit_matrix, torch.zeros(pad, dtype=bit_matrix.dtype)])
    byte_weights = (1 << torch.arange(8)).long()
    return (bit_matrix.reshape(-1, 8) * byte_weights).sum(dim=1).to(torch.uint8)


def unpack_indices(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_indices`: the first ``count`` indices (int64)."""
    need = (count * bits + 7) // 8
    if packed.numel() < need:
        raise ConfigError(f"packed indices hold {packed.numel()} bytes, {need} needed for {count} x {bits} bits")
    b = packed.reshape(-1)[:need].long()
    bit_matrix = ((b[:, None] >> torch.arange(8)[None, :]) & 1).reshape(-1)[: count * bits]
    return (bit_matrix.reshape(count, bits) << torch.arange(bits)[None, :]).sum(dim=1)


def packed_bytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


# ------------------------------------------------------------------------------------------------
# The module
# ------------------------------------------------------------------------------------------------


class NonUniformWeightQuantizer(nn.Module):
    """Weight quantizer with a fitted codebook of ``2^bits`` levels per output channel (``per_channel``)
    or per tensor. Drop-in for :class:`~zsq.quant.modules.WeightQuantizer` inside QuantConv/QuantLinear:
    ``calibrate_from(w)`` fits the codebook, ``forward(w)`` fake-quantizes, ``integer(w)`` gives the
    indices. ``symmetric``/``estimator`` are kept only so code that copies a quantizer's settings works;
    the codebook always spans the weights' own ``[min, max]``.
    """

    kind = "nonuniform"

    def __init__(self, *, bits: int, per_channel: bool, channels: int, symmetric: bool = True,
                 estimator: str = "minmax", edges_sigma: Sequence[float] = DEFAULT_EDGES_SIGMA,
                 refine_iters: int = DEFAULT_REFINE_ITERS):
        super().__init__()
        self.bits = bits
        self.per_channel = per_channel
        self.symmetric = symmetric
        self.estimator = estimator
        self.edges_sigma = check_edges(edges_sigma)
        if isinstance(refine_iters, bool) or not isinstance(refine_iters, int) or refine_iters < 0:
            raise ConfigError(f"refine_iters must be a non-negative integer, got {refine_iters!r}")
        self.refine_iters = refine_iters
        n = channels if per_channel else 1
        self.register_buffer("codebook", torch.zeros(n, 2 ** bits))

    @property
    def levels(self) -> int:
        return 2 ** self.bits

    @property
    def axis(self) -> int | None:
        return 0 if self.per_channel else None

    @torch.no_grad()
    def calibrate_from(self, w: torch.Tensor) -> None:
        cb = fit_codebook(w, bits=self.bits, per_channel=self.per_channel, edges_sigma=self.edges_sigma,
                          refine_iters=self.refine_iters)
        self.codebook.copy_(cb.to(self.codebook.device, self.codebook.dtype))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quantize_nonuniform(w, self.codebook, self.per_channel)

    def integer(self, w: torch.Tensor) -> torch.Tensor:
        """Codebook indices of ``w`` (int64, shaped like ``w``)."""
        return quantize_indices(w, self.codebook, self.per_channel)

    def dequantize(self, idx: torch.Tensor) -> torch.Tensor:
        return dequantize_indices(idx, self.codebook, self.per_channel)

    def storage_bytes(self, numel: int) -> int:
        """Bytes of ``numel`` weights stored as packed ``bits``-bit indices plus the codebook."""
        item = 2 if codebook_storage_dtype(self.codebook) == torch.float16 else 4
        return packed_bytes(numel, self.bits) + self.codebook.numel() * item

    def extra_repr(self) -> str:
        g = "per_channel" if self.per_channel else "per_tensor"
        return f"bits={self.bits}, nonuniform ({self.levels} levels), {g}, edges_sigma={self.edges_sigma}"


def is_nonuniform(quantizer: object) -> bool:
    return isinstance(quantizer, NonUniformWeightQuantizer)


def uniform_mse(w: torch.Tensor, *, bits: int, per_channel: bool, symmetric: bool = True,
                estimator: str = "minmax") -> float:
    """Mean squared error of zsq's uniform weight quantizer on ``w`` (for comparisons)."""
    from .modules import WeightQuantizer

    wq = WeightQuantizer(bits=bits, symmetric=symmetric, per_channel=per_channel, channels=w.shape[0],
                         estimator=estimator)
    wq.calibrate_from(w)
    return float((wq(w) - w).pow(2).mean())


def nonuniform_mse(w: torch.Tensor, *, bits: int, per_channel: bool, **kw) -> float:
    """Mean squared error of the non-uniform quantizer on ``w``."""
    q = NonUniformWeightQuantizer(bits=bits, per_channel=per_channel, channels=w.shape[0], **kw)
    q.calibrate_from(w)
    return float((q(w) - w).pow(2).mean())
