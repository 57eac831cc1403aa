"""PNG plots with matplotlib (Agg backend: no display needed); each returns the PNG bytes."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # before pyplot: render to memory, never open a window
import matplotlib.pyplot as plt  # noqa: E402


def png(fig) -> bytes:
    """A finished figure as PNG bytes (the figure is closed)."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def grouped_bars(
    values: Mapping[str, Mapping[str, float | None]],
    *,
    title: str,
    ylabel: str,
    reference: float | None = None,
    errors: Mapping[str, Mapping[str, Sequence[float] | None]] | None = None,
) -> bytes:
    """values: {group (x tick): {series: value}}; missing/None values are left out.

    errors: the same shape, {group: {series: [low, high]}}: drawn as error bars (a 95 % interval).
    """
    groups = list(values)
    series = list(dict.fromkeys(s for g in groups for s in values[g]))
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(series) * len(groups) + 1.2 * len(groups) + 2), 3.8))
    width = 0.8 / max(1, len(series))
    for i, s in enumerate(series):
        shown = [g for g in groups if values[g].get(s) is not None]
        xs = [groups.index(g) + i * width for g in shown]
        ys = [values[g][s] for g in shown]
        yerr = None
        if errors is not None:
            cis = [(errors.get(g) or {}).get(s) for g in shown]
            # matplotlib wants distances below and above each bar; no interval draws none.
            yerr = [[y - ci[0] if ci else 0.0 for y, ci in zip(ys, cis)], [ci[1] - y if ci else 0.0 for y, ci in zip(ys, cis)]]
        ax.bar(xs, ys, width, label=s, yerr=yerr, capsize=2 if yerr else 0, error_kw={"elinewidth": 0.8, "ecolor": "black"})
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], groups, rotation=20, ha="right")
    if reference is not None:
        ax.axhline(reference, color="black", linewidth=0.8, linestyle="--")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    return png(fig)


def lines(xs: Sequence[float], series: Mapping[str, Sequence[float | None]], *, title: str, xlabel: str, ylabel: str) -> bytes:
    fig, ax = plt.subplots(figsize=(7, 3.4))
    for name, ys in series.items():
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=name)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if len(series) > 1:
        ax.legend(fontsize=8)
    return png(fig)


def heatmap(matrix: Sequence[Sequence[float | None]], rows: Sequence[str], cols: Sequence[str], *, title: str, vmin=None, vmax=None) -> bytes:
    import numpy as np

    data = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(cols) + 3), max(3, 0.3 * len(rows) + 1.5)))
    im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    if data.size <= 64:
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                if not np.isnan(data[i, j]):
                    ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", color="white", fontsize=8)
    fig.colorbar(im, ax=ax)
    ax.set_title(title)
    return png(fig)
