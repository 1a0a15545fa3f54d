"""The numbers and text of ``emimimic table``: each run's scores, per-config summaries, Markdown."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from emimimic.constants import ID_COLUMN
from emimimic.errors import UserError
from emimimic.experiments import stats


def read_predictions(path: Path, ids: Sequence[str], targets: Sequence[str]) -> np.ndarray:
    """Returns a run's predictions ``[N, K]`` in the order of ``ids``, matched by ``Filename``."""
    frame = pd.read_csv(path, dtype={ID_COLUMN: str})
    expected = [ID_COLUMN, *targets]
    if list(frame.columns) != expected:
        raise UserError(f"{path}: header {list(frame.columns)}, expected {expected}")
    frame = frame.set_index(ID_COLUMN)
    if frame.index.has_duplicates:
        raise UserError(f"{path}: clips {sorted(frame.index[frame.index.duplicated()])[:5]} "
                        "appear more than once")
    missing = sorted(set(ids) - set(frame.index))
    extra = sorted(set(frame.index) - set(ids))
    if missing or extra:
        raise UserError(f"{path}: predictions do not cover the split (missing {missing[:5]}, "
                        f"unknown {extra[:5]})")
    return frame.loc[list(ids), list(targets)].to_numpy(dtype=np.float64)


def best_of(checkpoints: Path) -> tuple[int, float]:
    """Returns the best checkpoint's epoch (0-based, as Lightning logs it) and its val score."""
    from emimimic.training.checkpoints import (
        best_checkpoint,
        checkpoint_callback_state,
        load_checkpoint,
    )

    state = load_checkpoint(best_checkpoint(str(checkpoints)))
    recorded = checkpoint_callback_state(state, "ModelCheckpoint") or {}
    score = recorded.get("best_model_score")
    return int(state["epoch"]), math.nan if score is None else float(score)


def _cell(mean: float, std: float) -> str:
    return f"{mean:.4f} ± {std:.4f}" if math.isfinite(std) else f"{mean:.4f}"


def markdown(summary: pd.DataFrame, targets: Sequence[str], reference: str, note: str) -> str:
    """Returns the table in the paper's layout (rows: configs; columns: mean r, CI, targets)."""
    conf = summary["confidence"].iloc[0]
    head = ["Method", "Seeds", "Mean Pearson", f"Δ vs {reference} [{conf:.0%} CI]", *targets]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1))
             + "|"]
    for name, row in summary.iterrows():
        delta = ("reference" if name == reference else
                 f"{row['difference']:+.4f} [{row['low']:+.4f}, {row['high']:+.4f}]")
        cells = [str(name), str(int(row["seeds"])), _cell(row["mean"], row["std"]), delta]
        cells += [_cell(row[f"{t} mean"], row[f"{t} std"]) for t in targets]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + note + "\n"


def summarise(runs: pd.DataFrame, targets: Sequence[str],
              intervals: dict[str, stats.Interval]) -> pd.DataFrame:
    """Returns one row per config: seeds, mean ± std of the mean and per-target r, and the CI."""
    rows = {}
    for name, group in runs.groupby("config", sort=False):
        row: dict[str, float] = {"seeds": len(group)}
        row["mean"], row["std"] = stats.mean_std(group["mean_pearson"])
        for t in targets:
            row[f"{t} mean"], row[f"{t} std"] = stats.mean_std(group[t])
        ci = intervals[str(name)]
        row.update(difference=ci.difference, low=ci.low, high=ci.high,
                   confidence=ci.confidence)
        rows[name] = row
    return pd.DataFrame.from_dict(rows, orient="index")
