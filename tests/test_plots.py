"""emimimic.plots: each figure is written as a real PNG of the expected size and content."""

from __future__ import annotations

import io
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from emimimic import plots
from emimimic.constants import EMOTIONS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _image(path: Path) -> np.ndarray:
    """Returns the RGB pixels of a PNG file after checking it is one."""
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"))


def _ink(pixels: np.ndarray) -> float:
    """Returns the fraction of pixels that are not white."""
    return float((pixels < 250).any(axis=2).mean())


def _has_colour(pixels: np.ndarray, rgb: tuple[int, int, int], tol: int = 12) -> int:
    return int((np.abs(pixels.astype(int) - rgb) <= tol).all(axis=2).sum())


TAB_BLUE = (31, 119, 180)


@pytest.fixture(scope="module")
def split() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, (200, 6)) / 3.0
    preds = np.clip(0.5 * labels + 0.3 * rng.random((200, 6)), 0, 1)
    return preds, labels


def test_pearson_bars_png(tmp_path):
    r = [0.5, 0.42, 0.31, 0.6, -0.05, 0.45]
    fig = plots.pearson_bars(r)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == list(EMOTIONS)
    heights = [p.get_height() for p in ax.patches]
    np.testing.assert_allclose(heights, r)
    assert "0.3717" in ax.get_title()
    path = plots.save_png(fig, tmp_path / "sub" / "bars.png")
    pixels = _image(path)
    assert pixels.shape == (400, 640, 3)
    assert _has_colour(pixels, TAB_BLUE) > 2000  # the bars themselves
    assert 0.05 < _ink(pixels) < 0.9


def test_pearson_bars_from_mapping_and_dpi(tmp_path):
    fig = plots.pearson_bars({"Valence": 0.3, "Arousal": 0.2})
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["Valence", "Arousal"]
    pixels = _image(plots.save_png(fig, tmp_path / "bars.png", dpi=50))
    assert pixels.shape == (200, 320, 3)


def test_scatter_grid_png(split, tmp_path):
    preds, labels = split
    fig = plots.scatter_grid(preds, labels)
    panels = [ax for ax in fig.axes if ax.axison]
    assert len(panels) == 6
    r0 = np.corrcoef(preds[:, 0], labels[:, 0])[0, 1]
    assert panels[0].get_title() == f"Admiration  r = {r0:.3f}"
    offsets = panels[1].collections[0].get_offsets()
    np.testing.assert_allclose(offsets, np.c_[labels[:, 1], preds[:, 1]])
    pixels = _image(plots.save_png(fig, tmp_path / "scatter.png"))
    assert pixels.shape == (560, 900, 3)
    assert _has_colour(pixels, TAB_BLUE, tol=60) > 500


def test_scatter_grid_leaves_spare_panels_empty(tmp_path):
    y = np.linspace(0, 1, 40).reshape(20, 2)
    fig = plots.scatter_grid(y, y, target_names=["a", "b"], ncols=3)
    assert len([ax for ax in fig.axes if ax.axison]) == 2
    assert _image(plots.save_png(fig, tmp_path / "two.png")).shape == (280, 600, 3)


def _metrics_csv() -> pd.DataFrame:
    """Returns a metrics.csv shaped like CSVLogger's (one key per row, NaN elsewhere)."""
    rows = []
    for epoch in range(4):
        for step in range(3):
            rows.append({"epoch": epoch, "step": epoch * 3 + step,
                         "train/loss_step": 1.0 / (1 + epoch) + 0.01 * step})
        rows.append({"epoch": epoch, "step": epoch * 3 + 2, "val/pearson": [.1, .3, .25, .2][epoch],
                     "val/pearson/Joy": 0.1})
        rows.append({"epoch": epoch, "step": epoch * 3 + 2, "train/loss_epoch": 1.0 / (1 + epoch)})
    return pd.DataFrame(rows)


def test_training_curves_png(tmp_path):
    metrics = _metrics_csv()
    csv = tmp_path / "metrics.csv"
    metrics.to_csv(csv, index=False)
    fig = plots.training_curves(pd.read_csv(csv))
    loss_line = fig.axes[0].get_lines()[0]
    np.testing.assert_allclose(loss_line.get_ydata(), [1.0, 0.5, 1 / 3, 0.25])
    score_line = fig.axes[1].get_lines()[0]
    np.testing.assert_allclose(score_line.get_ydata(), [0.1, 0.3, 0.25, 0.2])
    assert "best 0.3000 (epoch 1)" in fig.axes[1].get_legend().get_texts()[0].get_text()
    pixels = _image(plots.save_png(fig, tmp_path / "curves.png"))
    assert pixels.shape == (350, 900, 3)
    assert _ink(pixels) > 0.03


def test_training_curves_falls_back_to_step_loss_and_names_missing_keys():
    metrics = _metrics_csv().drop(columns=["train/loss_epoch"])
    fig = plots.training_curves(metrics)
    np.testing.assert_allclose(fig.axes[0].get_lines()[0].get_ydata(),
                               [1 / (1 + e) + 0.01 for e in range(4)])
    with pytest.raises(ValueError, match="neither 'train/loss' nor 'val/pearson'"):
        plots.training_curves(pd.DataFrame({"epoch": [0], "step": [0], "lr": [1e-4]}))


def test_interval_rows_png(tmp_path):
    names = ["average", "concat", "concat_temporal"]
    fig = plots.interval_rows(
        names, [[0.46, 0.47, 0.465], [0.47, 0.475, 0.48], [0.44, 0.445, 0.43]],
        differences=[0.0, 0.011, -0.025], lows=[0.0, -0.002, -0.03], highs=[0.0, 0.02, -0.02],
        reference="average")
    left, right = fig.axes
    ticks = zip(left.get_yticks(), [t.get_text() for t in left.get_yticklabels()], strict=True)
    by_height = sorted(ticks, reverse=True)
    assert [name for _, name in by_height] == names  # first row on top
    assert len(right.containers) == 2  # one error bar per non-reference row
    pixels = _image(plots.save_png(fig, tmp_path / "table.png"))
    assert pixels.shape == (round(100 * (1.2 + 0.45 * 3)), 900, 3)
    assert _has_colour(pixels, (128, 128, 128), tol=5) > 20  # the interval that crosses 0
    assert _has_colour(pixels, (214, 39, 40), tol=20) > 20  # the one below 0, in red


def test_vad_histograms_png(tmp_path):
    vad = np.random.default_rng(1).beta(5, 5, (300, 3))
    fig = plots.vad_histograms(vad)
    counts = [sum(p.get_height() for p in ax.patches) for ax in fig.axes]
    assert counts == [300, 300, 300]
    pixels = _image(plots.save_png(fig, tmp_path / "vad.png"))
    assert pixels.shape == (280, 900, 3)
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        plots.vad_histograms(vad[:, :2])


def test_import_is_light_and_pyplot_free():
    code = (
        "import sys, numpy as np, emimimic, emimimic.plots as p\n"
        "assert 'matplotlib' not in sys.modules\n"
        "assert p.pearson_bars(np.ones(6) * 0.2)._repr_png_()[:4] == b'\\x89PNG'\n"
        "assert 'matplotlib' in sys.modules and 'matplotlib.pyplot' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_modality_weights_png(tmp_path):
    rng = np.random.default_rng(5)
    raw = rng.random((40, 6, 3))
    raw[:, :, 2] *= 4  # text weighs most
    w = raw / raw.sum(-1, keepdims=True)
    weights = {m: w[..., i] for i, m in enumerate(("visual", "audio", "text"))}
    fig = plots.modality_weights(weights, EMOTIONS)
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert [ax.get_title() for ax in panels] == list(EMOTIONS)
    legend = [t.get_text() for t in panels[0].get_legend().get_texts()]
    assert legend == [f"{m} {w[:, 0, i].mean():.2f}" for i, m in enumerate(weights)]
    pixels = _image(plots.save_png(fig, tmp_path / "weights.png"))
    assert pixels.shape[:2] == (520, 1080) and _ink(pixels) > 0.2
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        plots.modality_weights({"text": np.ones(5)})


def _png_pixels(png: bytes) -> np.ndarray:
    assert png[:8] == PNG_SIGNATURE
    with Image.open(io.BytesIO(png)) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"))


def test_figures_render_themselves_as_png(split, tmp_path):
    """``_repr_png_`` (what Jupyter shows) is the figure at figsize × DPI, as save_png writes it."""
    fig = plots.pearson_bars([0.5, 0.42, 0.31, 0.6, -0.05, 0.45])
    assert isinstance(fig, plots.PlotFigure)
    from matplotlib.figure import Figure

    assert isinstance(fig, Figure) and repr(fig) == "<PlotFigure size 640x400 with 1 Axes>"
    shown = _png_pixels(fig._repr_png_())
    assert shown.shape == (400, 640, 3) and _has_colour(shown, TAB_BLUE) > 2000
    np.testing.assert_array_equal(shown, _image(plots.save_png(fig, tmp_path / "bars.png")))
    scatter = _png_pixels(plots.scatter_grid(*split)._repr_png_())
    assert scatter.shape == (560, 900, 3) and _has_colour(scatter, TAB_BLUE, tol=60) > 500
    copy = pickle.loads(pickle.dumps(fig))  # the class is found as emimimic.plots.PlotFigure
    assert type(copy) is plots.PlotFigure and _png_pixels(copy._repr_png_()).shape == shown.shape
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        plots.Nothing  # noqa: B018


def test_ipython_formats_figures_as_png():
    formatters = pytest.importorskip("IPython.core.formatters")
    fig = plots.vad_histograms(np.random.default_rng(1).beta(5, 5, (300, 3)))
    png = formatters.PNGFormatter()(fig)
    assert _png_pixels(png).shape == (280, 900, 3)
    data, _ = formatters.DisplayFormatter().format(fig)
    assert data["text/plain"] == "<PlotFigure size 900x280 with 3 Axes>"
    assert _png_pixels(data["image/png"]).shape == (280, 900, 3)
