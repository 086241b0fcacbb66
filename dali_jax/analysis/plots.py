"""Report plots (matplotlib, Agg backend): aggregate bars with CIs and per-context heatmaps."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

__all__ = ["plot_metric_bars", "context_grid", "plot_return_heatmap", "pyplot", "save"]

_ROUND = 6


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path, dpi: int = 120) -> Path:
    """Lays out ``fig``, writes it to ``path`` (making its folder) and closes it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def plot_metric_bars(estimates: Mapping[str, Mapping[str, object]], path,
                     ylabel: str = "IQM normalised score", title: str | None = None) -> Path:
    """Bars per method with CI whiskers, one panel per regime.

    Args:
      estimates: ``{regime: {method: Interval}}`` (``Interval`` has estimate/low/high).
      path: output PNG path.
    """
    plt = pyplot()
    regimes = [r for r in estimates if estimates[r]]
    if not regimes:
        raise ValueError("plot_metric_bars: nothing to plot")
    methods = []
    for r in regimes:
        methods += [m for m in estimates[r] if m not in methods]
    colours = plt.get_cmap("tab10")(np.arange(len(methods)) % 10)
    fig, axes = plt.subplots(1, len(regimes), figsize=(1.2 + 0.9 * len(methods) * len(regimes)
                                                         + 1.5 * len(regimes), 3.6),
                             squeeze=False, sharey=True)
    for ax, r in zip(axes[0], regimes):
        for i, m in enumerate(methods):
            if m not in estimates[r]:
                continue
            iv = estimates[r][m]
            ax.bar(i, iv.estimate, color=colours[i], width=0.7, label=m)
            ax.errorbar(i, iv.estimate, yerr=[[iv.estimate - iv.low], [iv.high - iv.estimate]],
                        color="black", capsize=4, lw=1.2)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=30, ha="right", fontsize=8)
        ax.set_title(r)
        ax.axhline(0.0, color="grey", lw=0.6)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    if title:
        fig.suptitle(title)
    return save(fig, path)


def context_grid(values: Sequence[Mapping[str, float]], data: Sequence[float],
                 names: tuple[str, str], default: Mapping[str, float]):
    """Place per-context data on the 2-D double grid.

    The axes hold the factor values used by the double-grid contexts (both factors off their
    defaults) plus the default; single-factor contexts fill the default row/column. Contexts whose
    values are not on the axes are left out. Without double-grid contexts, the axes hold every
    value present.

    Returns:
      ``(x_values (n0,), y_values (n1,), Z (n1, n0))`` with NaN where no context lies.
    """
    f0, f1 = names
    d0, d1 = round(float(default[f0]), _ROUND), round(float(default[f1]), _ROUND)
    pts = [(round(float(v[f0]), _ROUND), round(float(v[f1]), _ROUND)) for v in values]
    pairs = [(a, b) for a, b in pts if a != d0 and b != d1]
    src = pairs if pairs else pts
    xs = sorted({a for a, _ in src} | {d0})
    ys = sorted({b for _, b in src} | {d1})
    xi = {x: i for i, x in enumerate(xs)}
    yi = {y: i for i, y in enumerate(ys)}
    z = np.full((len(ys), len(xs)), np.nan)
    for (a, b), v in zip(pts, data):
        if a in xi and b in yi:
            z[yi[b], xi[a]] = float(v)
    return np.asarray(xs), np.asarray(ys), z


def plot_return_heatmap(values: Sequence[Mapping[str, float]], data: Sequence[float],
                        names: tuple[str, str], default: Mapping[str, float], path,
                        title: str = "", cbar_label: str = "mean return",
                        train_box: Mapping[str, tuple[float, float]] | None = None) -> Path:
    """Heatmap of per-context ``data`` over the double grid (see ``context_grid``).

    The default context is outlined in red; ``train_box`` (``{factor: (low, high)}``), when given,
    is drawn as a dashed white rectangle around the cells inside the train range.
    """
    plt = pyplot()
    xs, ys, z = context_grid(values, data, names, default)
    fig, ax = plt.subplots(figsize=(1.6 + 0.62 * len(xs), 1.4 + 0.5 * len(ys)))
    im = ax.imshow(np.ma.masked_invalid(z), origin="lower", cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(xs)))
    ax.set_xticklabels([f"{x:g}" for x in xs], rotation=45, fontsize=8)
    ax.set_yticks(range(len(ys)))
    ax.set_yticklabels([f"{y:g}" for y in ys], fontsize=8)
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    finite = z[np.isfinite(z)]
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for j in range(len(ys)):
        for i in range(len(xs)):
            if np.isfinite(z[j, i]):
                ax.text(i, j, f"{z[j, i]:.0f}" if abs(z[j, i]) >= 10 else f"{z[j, i]:.2f}",
                        ha="center", va="center", fontsize=6,
                        color="black" if z[j, i] > mid else "white")
    # outline the default context
    dx = int(np.argmin(np.abs(xs - float(default[names[0]]))))
    dy = int(np.argmin(np.abs(ys - float(default[names[1]]))))
    ax.add_patch(plt.Rectangle((dx - 0.5, dy - 0.5), 1, 1, fill=False, ec="red", lw=1.5))
    if train_box is not None:
        inx = np.flatnonzero((xs >= train_box[names[0]][0] - 1e-9)
                             & (xs <= train_box[names[0]][1] + 1e-9))
        iny = np.flatnonzero((ys >= train_box[names[1]][0] - 1e-9)
                             & (ys <= train_box[names[1]][1] + 1e-9))
        if inx.size and iny.size:
            ax.add_patch(plt.Rectangle((inx[0] - 0.5, iny[0] - 0.5), inx[-1] - inx[0] + 1,
                                       iny[-1] - iny[0] + 1, fill=False, ec="white", lw=1.5,
                                       ls="--"))
    shown = int(np.isfinite(z).sum())
    ax.set_title(f"{title}\n({shown} of {len(values)} contexts on the double grid)", fontsize=9)
    fig.colorbar(im, ax=ax, label=cbar_label)
    return save(fig, path)
