"""Figures for mixed precision, drawn with matplotlib's Agg canvas (no display, no global pyplot state):

* :func:`plot_sensitivity` — sensitivity of every layer (data-flow order) for each candidate bit width,
  on a log scale, like ZeroQ's per-layer sensitivity figure;
* :func:`plot_pareto` — the size/sensitivity Pareto frontier of the bit allocation, with the chosen
  point, the uniform-precision points and the budget marked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from .allocate import MB, Allocation, FrontierPoint
from .sensitivity import SensitivityTable


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(str(path))
    return path


def plot_sensitivity(table: SensitivityTable, path: str | Path, *, title: str | None = None) -> Path:
    """Per-layer sensitivity ``Omega_i(k)`` for each candidate ``k`` (log scale); returns ``path``."""
    names = table.names
    n = len(names)
    fig = _figure(min(24.0, max(7.0, 0.22 * n + 3.0)), 4.8)
    ax = fig.add_subplot(1, 1, 1)
    positive = [v for row in table.values.values() for v in row.values() if v > 0]
    floor = min(positive) / 10 if positive else 1e-12
    xs = list(range(n))
    markers = "os^Dvp*hx+"
    for j, k in enumerate(table.bits):
        ys = [max(table.values[name][k], floor) for name in names]
        ax.plot(xs, ys, marker=markers[j % len(markers)], markersize=4, linewidth=1.2, label=f"{k}-bit")
    ax.set_yscale("log")
    ax.set_xlabel("layer (data-flow order)")
    label = {"kl": "KL(FP32 || layer quantized)", "hessian": "Hessian-weighted weight error"}.get(table.method,
                                                                                              table.method)
    ax.set_ylabel(f"sensitivity: {label}")
    step = max(1, n // 40)
    ax.set_xticks(xs[::step])
    ax.set_xticklabels([names[i] for i in xs[::step]], rotation=90, fontsize=6)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(title="weights", fontsize=8)
    ax.set_title(title or f"{table.model or 'model'}: per-layer {table.method} sensitivity")
    return _save(fig, path)


def plot_pareto(
    allocation: Allocation,
    path: str | Path,
    *,
    uniform: Mapping[int, FrontierPoint] | None = None,
    others: Mapping[str, Allocation] | None = None,
    title: str | None = None,
) -> Path:
    """Size (MB, whole model) vs total sensitivity: the Pareto frontier, the chosen point, the budget,
    the uniform-precision points (``uniform``) and any other allocations (``others``, e.g. random)."""
    overhead = allocation.size_overhead_bytes

    def mb(size_bits: float) -> float:
        return (overhead + size_bits / 8) / MB

    fig = _figure(7.5, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    pts = sorted(allocation.frontier, key=lambda p: p.size_bits)
    positive = [p.sensitivity for p in pts if p.sensitivity > 0]
    floor = min(positive) / 10 if positive else 1e-12
    if pts:
        ax.step([mb(p.size_bits) for p in pts], [max(p.sensitivity, floor) for p in pts], where="post",
                linewidth=1.3, color="tab:blue", label=f"Pareto frontier ({len(pts)} points)")
    if allocation.budget.kind == "size":
        ax.axvline(mb(allocation.budget.value), color="gray", linestyle="--", linewidth=1,
                   label=f"budget {allocation.budget.label or ''}".strip())
    for k, p in sorted((uniform or {}).items()):
        ax.scatter([mb(p.size_bits)], [max(p.sensitivity, floor)], marker="s", s=45, color="tab:orange",
                   zorder=3, label="uniform precision" if k == min(uniform or {0: 0}) else None)
        ax.annotate(f"W{k}", (mb(p.size_bits), max(p.sensitivity, floor)), textcoords="offset points",
                    xytext=(5, 5), fontsize=8)
    for name, other in (others or {}).items():
        ax.scatter([mb(other.size_bits)], [max(other.sensitivity, floor)], marker="x", s=45, zorder=3, label=name)
    ax.scatter([mb(allocation.size_bits)], [max(allocation.sensitivity, floor)], marker="*", s=160, color="tab:red",
               zorder=4, label=f"chosen ({allocation.average_bits:.2f} bits/weight)")
    ax.set_yscale("log")
    ax.set_xlabel("model size (MB)")
    ax.set_ylabel(f"total sensitivity ({allocation.method})")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "mixed-precision Pareto frontier")
    return _save(fig, path)


def plot_frontiers(frontiers: Mapping[str, Sequence[FrontierPoint]], path: str | Path, *, overhead_bytes: int = 0,
                   title: str | None = None) -> Path:
    """Several frontiers (e.g. kl vs hessian) on one size axis (sensitivities normalised to their max)."""
    fig = _figure(7.5, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    for name, pts in frontiers.items():
        pts = sorted(pts, key=lambda p: p.size_bits)
        top = max((p.sensitivity for p in pts), default=1.0) or 1.0
        ax.step([(overhead_bytes + p.size_bits / 8) / MB for p in pts], [max(p.sensitivity / top, 1e-12) for p in pts],
                where="post", label=name)
    ax.set_yscale("log")
    ax.set_xlabel("model size (MB)")
    ax.set_ylabel("total sensitivity / max")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "Pareto frontiers")
    return _save(fig, path)
