"""Figures of EMI results, in one place for notebooks, the W&B callback and ``emimimic table``.

Every function takes plain numpy / pandas data and returns a :class:`matplotlib.figure.Figure`
built without pyplot (so nothing here changes a notebook's backend or keeps figures alive);
:func:`save_png` writes one with the Agg canvas. Each figure is a :class:`PlotFigure`, whose
``_repr_png_`` renders it with that canvas too, so Jupyter and IPython show a figure left as a
cell's last expression as an image (and ``IPython.display.display(fig)`` shows it anywhere in a
cell), with no ``%matplotlib`` backend involved. matplotlib is imported inside the functions, so
``import emimimic`` does not pay for it; it comes with the ``plots`` extra.
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from emimimic import constants

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

#: Resolution of :func:`save_png`: a figure of ``(w, h)`` inches becomes ``100 w × 100 h`` pixels.
DPI = 100


@functools.cache
def _figure_class() -> type[Figure]:
    """Returns :class:`PlotFigure`, defined on first use so that importing this module does not
    import matplotlib (``emimimic.plots.PlotFigure`` reaches it through the module's
    ``__getattr__``, which is also how pickle finds it)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "emimimic.plots needs matplotlib: pip install -e \".[plots]\" (or \".[dev]\")"
        ) from err

    class PlotFigure(Figure):
        """A :class:`matplotlib.figure.Figure` that IPython and Jupyter display as a PNG.

        IPython's PNG formatter calls ``_repr_png_`` of an object that has one (unless a printer
        is registered for its type, as ``%matplotlib inline`` does for every Figure: then that one
        draws it, just as well). The image is the figure rendered by the Agg canvas at
        :data:`DPI`, the image :func:`save_png` writes; no pyplot, no GUI backend.
        """

        def _repr_png_(self) -> bytes:
            buffer = io.BytesIO()
            _write_png(self, buffer, DPI)
            return buffer.getvalue()

    PlotFigure.__module__ = __name__
    PlotFigure.__qualname__ = PlotFigure.__name__
    return PlotFigure


def __getattr__(name: str) -> object:
    if name == "PlotFigure":
        return _figure_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _figure(width: float, height: float) -> Figure:
    return _figure_class()(figsize=(width, height), layout="constrained")


def _write_png(fig: Figure, target: str | os.PathLike[str] | io.BytesIO, dpi: int) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # attaches the Agg canvas: no pyplot, no GUI backend
    fig.savefig(target, format="png", dpi=dpi)


def save_png(fig: Figure, path: str | os.PathLike[str], dpi: int = DPI) -> Path:
    """Writes ``fig`` as a PNG at ``path`` (parent folders created) and returns the path.

    The image is ``figsize × dpi`` pixels exactly (no tight cropping).
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_png(fig, out, dpi)
    return out


def pearson_bars(r: Sequence[float] | np.ndarray | Mapping[str, float],
                 target_names: Sequence[str] | None = None, title: str | None = None) -> Figure:
    """Returns a bar chart of Pearson's r per target, with the mean (the challenge score) as a line.

    Args:
        r: per-target r, as a sequence (names from ``target_names``) or a name -> r mapping.
        target_names: names of the bars (default the six EMI emotions when there are six).
        title: figure title (default ``mean r = …``).
    """
    if isinstance(r, Mapping):
        names, values = list(r), np.asarray(list(r.values()), dtype=float)
    else:
        values = np.asarray(r, dtype=float).reshape(-1)
        names = constants.target_names(values.size, target_names)
    fig = _figure(6.4, 4.0)
    ax = fig.add_subplot()
    x = np.arange(values.size)
    bars = ax.bar(x, values, color="tab:blue")
    ax.bar_label(bars, labels=[f"{v:.3f}" for v in values], fontsize=8)
    mean = float(values.mean())
    ax.axhline(mean, color="tab:red", linestyle="--", linewidth=1, label=f"mean {mean:.4f}")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("Pearson r")
    ax.set_ylim(min(0.0, values.min() - 0.05), max(1e-3, values.max()) * 1.15)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title or f"mean r = {mean:.4f}")
    return fig


def scatter_grid(preds: np.ndarray, labels: np.ndarray,
                 target_names: Sequence[str] | None = None, ncols: int = 3) -> Figure:
    """Returns predicted-vs-true scatter plots, one panel per target, each titled with its r.

    Labels are rater fractions (few distinct values), so points are drawn translucent, not
    jittered: the columns of points are the label values as they are.

    Args:
        preds: predictions ``[N, K]``.
        labels: labels ``[N, K]``, rows in the same clip order.
        target_names: panel titles (default the six EMI emotions when K = 6).
        ncols: panels per row.
    """
    from emimimic.experiments.stats import pearson

    p, y = np.asarray(preds, dtype=float), np.asarray(labels, dtype=float)
    if p.ndim != 2 or p.shape != y.shape:
        raise ValueError(f"preds {p.shape} and labels {y.shape} must both be [N, K]")
    k = p.shape[1]
    names = constants.target_names(k, target_names)
    r = pearson(p, y, names)
    ncols = max(1, min(ncols, k))
    nrows = -(-k // ncols)
    fig = _figure(3.0 * ncols, 2.8 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True)
    for j, ax in enumerate(axes.flat):
        if j >= k:
            ax.set_axis_off()
            continue
        ax.scatter(y[:, j], p[:, j], s=6, alpha=0.3, color="tab:blue", linewidths=0)
        ax.plot([0, 1], [0, 1], color="gray", linewidth=0.8, linestyle=":")
        ax.set_title(f"{names[j]}  r = {r[j]:.3f}", fontsize=9)
        ax.set_xlim(-0.03, 1.03)
        ax.set_ylim(-0.03, 1.03)
    for ax in axes[-1]:
        ax.set_xlabel("true")
    for ax in axes[:, 0]:
        ax.set_ylabel("predicted")
    return fig


def _per_epoch(metrics: pd.DataFrame, key: str) -> pd.Series | None:
    """Returns ``key`` per epoch from a Lightning metrics.csv (NaN rows dropped), or None."""
    for column in (f"{key}_epoch", key, f"{key}_step"):
        if column in metrics.columns and metrics[column].notna().any():
            rows = metrics[["epoch", column]].dropna()
            return rows.groupby("epoch")[column].mean()
    return None


def training_curves(metrics: pd.DataFrame, loss: str = "train/loss",
                    score: str = "val/pearson") -> Figure:
    """Returns the training loss and the validation score per epoch from a ``metrics.csv``.

    Args:
        metrics: the CSV logger's ``metrics.csv`` as a DataFrame (``epoch`` column, NaN where a
            row does not log a key). ``{loss}_epoch`` is used when logged, else the mean of
            ``{loss}`` / ``{loss}_step`` over each epoch.
        loss: key of the training loss.
        score: key of the validation score; its best epoch is marked.

    Raises:
        ValueError: neither key is in ``metrics`` (the message lists its columns).
    """
    if "epoch" not in metrics.columns:
        raise ValueError(f"metrics has no 'epoch' column (columns: {list(metrics.columns)})")
    curves = {key: _per_epoch(metrics, key) for key in (loss, score)}
    if all(c is None for c in curves.values()):
        raise ValueError(f"metrics logs neither {loss!r} nor {score!r} "
                         f"(columns: {list(metrics.columns)})")
    fig = _figure(9.0, 3.5)
    left, right = fig.subplots(1, 2)
    for ax, key, color in ((left, loss, "tab:blue"), (right, score, "tab:green")):
        curve = curves[key]
        ax.set_xlabel("epoch")
        ax.set_title(key)
        if curve is None:
            ax.text(0.5, 0.5, f"{key} not logged", ha="center", va="center",
                    transform=ax.transAxes)
            continue
        ax.plot(curve.index, curve.to_numpy(), marker="o", markersize=3, color=color)
        ax.grid(alpha=0.3)
    if curves[score] is not None:
        best = curves[score].idxmax()
        right.scatter([best], [curves[score][best]], color="tab:red", zorder=3,
                      label=f"best {curves[score][best]:.4f} (epoch {best})")
        right.legend(fontsize=8)
    return fig


def interval_rows(names: Sequence[str], seed_scores: Sequence[Sequence[float]],
                  differences: Sequence[float], lows: Sequence[float], highs: Sequence[float],
                  reference: str, confidence: float = 0.95) -> Figure:
    """Returns the table as a figure: each row's seed scores, and its difference to the reference.

    Left panel: the mean Pearson of every seed (dots) and their mean ± std (bar). Right panel:
    the difference to the reference row with its bootstrap interval; intervals that cross 0 are
    drawn grey (no evidence of a difference).

    Args:
        names: row names, top to bottom.
        seed_scores: per row, the mean Pearson of each seed's run.
        differences: per row, the observed difference to the reference.
        lows: per row, the interval's lower end.
        highs: per row, the interval's upper end.
        reference: name of the reference row (drawn as a diamond at 0).
        confidence: the intervals' coverage, for the axis label.
    """
    n = len(names)
    if not n == len(seed_scores) == len(differences) == len(lows) == len(highs):
        raise ValueError("names, seed_scores, differences, lows and highs differ in length")
    fig = _figure(9.0, 1.2 + 0.45 * n)
    left, right = fig.subplots(1, 2, sharey=True)
    y = np.arange(n)[::-1]
    for yi, scores in zip(y, seed_scores, strict=True):
        s = np.asarray(scores, dtype=float)
        left.scatter(s, np.full(s.size, yi), s=14, color="tab:blue", alpha=0.6, zorder=3)
        std = s.std(ddof=1) if s.size > 1 else 0.0
        left.errorbar([s.mean()], [yi], xerr=[std], fmt="s", color="black", capsize=3,
                      markersize=4, zorder=4)
    left.set_yticks(y, list(names))
    left.set_ylim(-0.6, n - 0.4)
    left.set_xlabel("mean Pearson per seed (mean ± std)")
    left.grid(axis="x", alpha=0.3)
    for yi, name, d, lo, hi in zip(y, names, differences, lows, highs, strict=True):
        if name == reference:
            right.scatter([0.0], [yi], marker="D", color="black", zorder=3)
            continue
        color = "grey" if lo <= 0.0 <= hi else ("tab:green" if d > 0 else "tab:red")
        right.errorbar([d], [yi], xerr=[[d - lo], [hi - d]], fmt="o", color=color, capsize=3,
                       markersize=4)
    right.axvline(0.0, color="black", linewidth=0.8)
    right.set_xlabel(f"difference to {reference} ({confidence:.0%} paired bootstrap CI)")
    from matplotlib.ticker import MaxNLocator

    for ax in (left, right):  # few, short tick labels: they never run into each other
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
        ax.tick_params(axis="x", labelsize=8)
    right.grid(axis="x", alpha=0.3)
    return fig


def vad_histograms(vad: np.ndarray, names: Sequence[str] = ("V", "A", "D"),
                   bins: int = 30) -> Figure:
    """Returns one histogram per dimension of the audio branch's 3-d VAD latent ``[N, 3]``.

    The latent has no labels (only a prior pulling it to 0.5), so the panels show how much of
    [0, 1] each dimension uses; a spike at 0.5 means the dimension carries nothing.
    """
    v = np.asarray(vad, dtype=float)
    if v.ndim != 2 or v.shape[1] != len(names):
        raise ValueError(f"vad must be [N, {len(names)}], got shape {v.shape}")
    fig = _figure(3.0 * len(names), 2.8)
    axes = fig.subplots(1, len(names), squeeze=False, sharey=True)[0]
    for j, (ax, name) in enumerate(zip(axes, names, strict=True)):
        ax.hist(v[:, j], bins=bins, range=(0.0, 1.0), color="tab:purple")
        ax.axvline(0.5, color="gray", linewidth=0.8, linestyle=":")
        ax.set_title(f"{name}: mean {v[:, j].mean():.3f}, std {v[:, j].std():.3f}", fontsize=9)
        ax.set_xlabel("latent value")
    axes[0].set_ylabel("clips")
    return fig


def modality_weights(weights: Mapping[str, np.ndarray],
                     target_names: Sequence[str] | None = None) -> Figure:
    """Returns which modality a weighing fusion relied on, per target and per clip.

    One panel per target: the clips along x (sorted by the first modality's weight) and each
    clip's weights stacked to 1; the legend gives each modality's mean weight over the clips.

    Args:
        weights: modality -> ``[N, K]`` weights (``EMIOutput.weights`` of the ``gated`` fusion,
            e.g. from :func:`emimimic.training.dashboard.predict_split`).
        target_names: the K target names (default the six EMI emotions when K is 6).
    """
    names = list(weights)
    stacked = np.stack([np.asarray(weights[m], dtype=float) for m in names], axis=-1)
    if stacked.ndim != 3:
        raise ValueError(f"weights must be modality -> [N, K], got shape {stacked.shape[:-1]}")
    n, k, _ = stacked.shape
    targets = constants.target_names(k, target_names)
    cols = min(3, k)
    rows = -(-k // cols)
    fig = _figure(3.6 * cols, 2.6 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    colors = ["tab:orange", "tab:green", "tab:blue", "tab:purple", "tab:red"]
    for j, ax in enumerate(axes.flat):
        if j >= k:
            ax.set_axis_off()
            continue
        order = np.argsort(stacked[:, j, 0], kind="stable")
        ax.stackplot(np.arange(n), *(stacked[order, j, i] for i in range(len(names))),
                     colors=colors[:len(names)],
                     labels=[f"{m} {stacked[:, j, i].mean():.2f}" for i, m in enumerate(names)])
        ax.set_title(targets[j], fontsize=9)
        ax.set_xlim(0, max(n - 1, 1))
        ax.set_ylim(0, 1)
        ax.set_xlabel(f"clips (sorted by {names[0]} weight)", fontsize=8)
        ax.legend(fontsize=7, loc="upper left", title="mean weight", title_fontsize=7)
    axes[0, 0].set_ylabel("modality weight")
    return fig


__all__ = ["DPI", "interval_rows", "modality_weights", "pearson_bars", "save_png",
           "scatter_grid", "training_curves", "vad_histograms"]
