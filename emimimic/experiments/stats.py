"""Statistics over whole splits and over seeds: Pearson, mean ± std, paired bootstrap intervals.

Everything here is plain numpy on ``[N, K]`` arrays (N clips, K targets) of one split, rows in the
same clip order for predictions and labels (the caller matches them by ``Filename``).

The bootstrap compares table rows (configs), each trained with several seeds. Its statistic is
built from **per-seed runs**, not from seed-averaged predictions: for one resample of the clips,
each run's mean Pearson is computed on those clips, averaged over the row's seeds, and the
reference row's average (on the very same clips) is subtracted. That is the quantity the table's
mean column reports — the expected score of *one* training run of the config. Averaging the
seeds' predictions first would score a seed ensemble instead, which beats every single run and
flatters most the configs whose seeds disagree most, so the interval would describe a model
nobody trained. Seeds need not be paired across rows (the difference of two means over seeds is
the same whichever seed is matched with which); rows may have different seed counts.

The interval covers the sampling of clips for the trained runs at hand; the seed-to-seed spread
enters only through the average over the row's seeds and is reported beside it (± std).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from emimimic import constants

#: Resamples turned into count matrices at once; bounds memory to ~CHUNK × N × 8 bytes.
CHUNK = 256


@dataclass(frozen=True)
class Interval:
    """A paired-bootstrap estimate of ``row − reference`` in mean Pearson.

    Attributes:
        difference: the observed difference on the whole split (seed-averaged mean Pearson).
        low: lower end of the percentile interval.
        high: upper end of the percentile interval.
        confidence: the interval's coverage, e.g. 0.95.
        resamples: the number of bootstrap resamples.
    """

    difference: float
    low: float
    high: float
    confidence: float
    resamples: int


def _as_matrix(values: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2:
        raise ValueError(f"{name} must be [N, K], got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} holds NaN or Inf")
    return array


def _check_pair(preds: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, y = _as_matrix(preds, "preds"), _as_matrix(labels, "labels")
    if p.shape != y.shape:
        raise ValueError(f"preds {p.shape} and labels {y.shape} differ in shape")
    if p.shape[0] < 2:
        raise ValueError(f"Pearson needs at least 2 clips, got {p.shape[0]}")
    return p, y


def _weighted_pearson(counts: np.ndarray, preds: np.ndarray, labels: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Returns Pearson's r ``[B, M, K]`` of M prediction sets, one per row of clip ``counts``.

    ``counts`` is ``[B, N]`` (how often each clip is drawn; rows sum to N), ``preds`` ``[M, N, K]``
    and ``labels`` ``[N, K]``. Also returns the ``[B, M, K]`` mask of undefined (constant) cases,
    set to r = 0. Columns are centred on their whole-split means first (r is shift-invariant), so
    the one-pass moments below lose no precision.
    """
    m, n, k = preds.shape
    p_mean, y_mean = preds.mean(axis=1, keepdims=True), labels.mean(axis=0, keepdims=True)
    pc, yc = preds - p_mean, labels - y_mean
    columns = np.concatenate(
        [
            pc.transpose(1, 0, 2).reshape(n, m * k),
            (pc * pc).transpose(1, 0, 2).reshape(n, m * k),
            (pc * yc).transpose(1, 0, 2).reshape(n, m * k),
            yc,
            yc * yc,
        ],
        axis=1,
    )
    moments = (counts @ columns) / n
    mk = m * k
    sx = moments[:, :mk].reshape(-1, m, k)
    sxx = moments[:, mk:2 * mk].reshape(-1, m, k)
    sxy = moments[:, 2 * mk:3 * mk].reshape(-1, m, k)
    sy = moments[:, None, 3 * mk:3 * mk + k]
    syy = moments[:, None, 3 * mk + k:]
    mean_x = sx + p_mean.reshape(1, m, k)
    mean_y = sy + y_mean.reshape(1, 1, k)
    import torch

    from emimimic.training.correlation import correlation_from_moments

    # sums around the whole-split means: their second moments bound the rounding noise of
    # sxx - sx², which a column that is exactly constant on a resample leaves
    shape = mean_x.shape

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(np.broadcast_to(a, shape)))

    r, undefined = correlation_from_moments(
        t(mean_x), t(mean_y), t(sxx - sx * sx), t(syy - sy * sy), t(sxy - sx * sy),
        scale_x=t(mean_x * mean_x + sxx), scale_y=t(mean_y * mean_y + syy))
    return r.numpy(), undefined.numpy()


def pearson(preds: np.ndarray, labels: np.ndarray,
            target_names: Sequence[str] | None = None) -> np.ndarray:
    """Returns Pearson's r per target ``[K]`` over the whole split (the challenge metric).

    A target whose prediction or label column is constant over the split has no r: it is
    reported as 0 with a warning naming it, the rule of
    :class:`emimimic.training.metrics.EMIPearson`.

    Args:
        preds: predictions ``[N, K]`` (or ``[N]`` for one target).
        labels: labels ``[N, K]``, rows in the same clip order.
        target_names: names used in warnings (default ``target <k>``).
    """
    p, y = _check_pair(preds, labels)
    names = constants.target_names(p.shape[1], target_names)
    r, undefined = _weighted_pearson(np.ones((1, p.shape[0])), p[None], y)
    for k in np.flatnonzero(undefined[0, 0]):
        warnings.warn(f"Pearson r of {names[k]!r} is undefined (a constant column over "
                      f"{p.shape[0]} clips); reported as 0", UserWarning, stacklevel=2)
    return r[0, 0]


def mean_std(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Returns the mean and the sample standard deviation (ddof=1; NaN for one value)."""
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise ValueError("mean_std of no values")
    std = float(array.std(ddof=1)) if array.size > 1 else float("nan")
    return float(array.mean()), std


def resample_clips(n_clips: int, resamples: int, seed: int) -> np.ndarray:
    """Returns bootstrap resamples of clip indices ``[resamples, n_clips]`` (int64), seeded.

    The draw is ``np.random.default_rng(seed).integers(0, n_clips, (resamples, n_clips))``, the
    one ``scipy.stats.bootstrap`` makes for a paired sample with ``rng=default_rng(seed)``.
    """
    if n_clips < 2 or resamples < 1:
        raise ValueError(f"need >= 2 clips and >= 1 resample, got {n_clips} and {resamples}")
    return np.random.default_rng(seed).integers(0, n_clips, (resamples, n_clips))


def bootstrap_mean_pearson(rows: Mapping[str, Sequence[np.ndarray]], labels: np.ndarray,
                           indices: np.ndarray,
                           target_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Returns, per row, the seed-averaged mean Pearson on every resample ``[B]``.

    Every run of every row is scored on the same resamples. A resample on which a column is
    constant scores r = 0 for that target (one warning per target says how many resamples).

    Args:
        rows: row name -> its runs' predictions, each ``[N, K]`` in the clip order of ``labels``.
        labels: labels ``[N, K]``.
        indices: resampled clip indices ``[B, N]`` (e.g. from :func:`resample_clips`).
        target_names: names used in warnings.
    """
    y = _as_matrix(labels, "labels")
    n, k = y.shape
    names = constants.target_names(k, target_names)
    idx = np.asarray(indices)
    if idx.ndim != 2 or idx.shape[1] != n or idx.min() < 0 or idx.max() >= n:
        raise ValueError(f"indices must be [B, {n}] clip indices in [0, {n}), got {idx.shape}")
    runs, owner = [], []
    for name, preds in rows.items():
        if len(preds) == 0:
            raise ValueError(f"row {name!r} has no runs")
        for p in preds:
            runs.append(_check_pair(p, y)[0])
            owner.append(name)
    stacked = np.stack(runs)
    scores = np.empty((idx.shape[0], len(runs)))
    undefined_count = np.zeros(k, dtype=np.int64)
    offsets = np.arange(min(CHUNK, idx.shape[0]))[:, None] * n
    for start in range(0, idx.shape[0], CHUNK):
        block = idx[start:start + CHUNK]
        b = block.shape[0]
        counts = np.bincount((block + offsets[:b]).ravel(), minlength=b * n).reshape(b, n)
        r, undefined = _weighted_pearson(counts.astype(np.float64), stacked, y)
        scores[start:start + b] = r.mean(axis=2)
        undefined_count += undefined.any(axis=1).sum(axis=0)
    for k_ in np.flatnonzero(undefined_count):
        warnings.warn(f"Pearson r of {names[k_]!r} is undefined (a constant column) on "
                      f"{undefined_count[k_]} of {idx.shape[0]} resamples; counted as 0",
                      UserWarning, stacklevel=2)
    owners = np.asarray(owner)
    return {name: scores[:, owners == name].mean(axis=1) for name in rows}


def paired_bootstrap(rows: Mapping[str, Sequence[np.ndarray]], labels: np.ndarray,
                     reference: str, *, resamples: int = 2000, confidence: float = 0.95,
                     seed: int = 0, indices: np.ndarray | None = None,
                     target_names: Sequence[str] | None = None) -> dict[str, Interval]:
    """Returns each row's paired-bootstrap percentile interval of its difference to ``reference``.

    The statistic is (seed-averaged mean Pearson of the row) − (that of the reference row), both
    on the same resampled clips (see the module docstring for why per-seed runs are averaged
    rather than their predictions). The reference row gets a zero-width interval at 0.

    Args:
        rows: row name -> its runs' predictions, each ``[N, K]`` in the clip order of ``labels``.
        labels: labels ``[N, K]``.
        reference: the row the others are compared with.
        resamples: number of bootstrap resamples (ignored when ``indices`` is given).
        confidence: coverage of the interval, in (0, 1).
        seed: seed of the resampling (same seed, same intervals).
        indices: explicit resamples ``[B, N]`` (default :func:`resample_clips`).
        target_names: names used in warnings.
    """
    if reference not in rows:
        raise ValueError(f"reference row {reference!r} not among {list(rows)}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    y = _as_matrix(labels, "labels")
    if indices is None:
        indices = resample_clips(y.shape[0], resamples, seed)
    boot = bootstrap_mean_pearson(rows, y, indices, target_names)
    with warnings.catch_warnings():
        # the whole-split scores: constant columns were already reported by the caller's table
        warnings.simplefilter("ignore", UserWarning)
        observed = {name: float(np.mean([pearson(p, y).mean() for p in preds]))
                    for name, preds in rows.items()}
    alpha = (1.0 - confidence) / 2.0
    out = {}
    for name in rows:
        diffs = boot[name] - boot[reference]
        low, high = np.quantile(diffs, [alpha, 1.0 - alpha])
        out[name] = Interval(observed[name] - observed[reference], float(low), float(high),
                             confidence, int(diffs.shape[0]))
    return out


__all__ = ["Interval", "bootstrap_mean_pearson", "mean_std", "paired_bootstrap", "pearson",
           "resample_clips"]
