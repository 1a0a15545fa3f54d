"""Whole-split Pearson, mean ± std over seeds and the paired bootstrap interval (stats.py)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from emimimic.experiments.stats import (
    bootstrap_mean_pearson,
    mean_std,
    paired_bootstrap,
    pearson,
    resample_clips,
)

N, K = 120, 6


@pytest.fixture(scope="module")
def fixed() -> tuple[np.ndarray, dict[str, list[np.ndarray]]]:
    """Returns rater-fraction labels [N, K] and three rows of seed runs of differing quality."""
    rng = np.random.default_rng(42)
    labels = rng.integers(0, 4, (N, K)) / 3.0
    rows = {}
    for name, noise, seeds in (("ref", 1.0, 3), ("better", 0.5, 3), ("worse", 2.0, 2)):
        rows[name] = [np.clip(0.3 * labels + noise * 0.3 * rng.random((N, K)), 0, 1)
                      for _ in range(seeds)]
    return labels, rows


def _mean_r(p: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean([sps.pearsonr(p[:, k], y[:, k]).statistic for k in range(y.shape[1])]))


def _row_score(runs: list[np.ndarray], y: np.ndarray, idx: np.ndarray) -> float:
    return float(np.mean([_mean_r(p[idx], y[idx]) for p in runs]))


def test_pearson_matches_scipy(fixed):
    labels, rows = fixed
    p = rows["better"][0]
    expected = [sps.pearsonr(p[:, k], labels[:, k]).statistic for k in range(K)]
    np.testing.assert_allclose(pearson(p, labels), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("which", ["preds", "labels"])
def test_constant_column_is_zero_with_warning(fixed, which):
    labels, rows = fixed
    p, y = rows["ref"][0].copy(), labels.copy()
    (p if which == "preds" else y)[:, 3] = 0.25
    with pytest.warns(UserWarning, match="'Empathic Pain' is undefined"):
        r = pearson(p, y, target_names=["A", "B", "C", "Empathic Pain", "E", "F"])
    assert r[3] == 0.0
    others = [k for k in range(K) if k != 3]
    expected = [sps.pearsonr(p[:, k], y[:, k]).statistic for k in others]
    np.testing.assert_allclose(r[others], expected, atol=1e-12)


def test_mean_std_is_sample_std():
    assert mean_std([0.4, 0.5, 0.6]) == pytest.approx((0.5, np.std([0.4, 0.5, 0.6], ddof=1)))
    mean, std = mean_std([0.47])
    assert mean == 0.47 and np.isnan(std)


def test_bootstrap_matches_a_plain_loop_with_scipy_pearsonr(fixed):
    labels, rows = fixed
    indices = resample_clips(N, 200, seed=7)
    out = paired_bootstrap(rows, labels, "ref", indices=indices, confidence=0.9)
    for name in ("better", "worse"):
        diffs = [_row_score(rows[name], labels, i) - _row_score(rows["ref"], labels, i)
                 for i in indices]
        low, high = np.percentile(diffs, [5, 95])
        observed = _row_score(rows[name], labels, np.arange(N)) - _row_score(
            rows["ref"], labels, np.arange(N))
        got = out[name]
        assert (got.low, got.high) == pytest.approx((low, high), abs=1e-10)
        assert got.difference == pytest.approx(observed, abs=1e-12)
        assert got.resamples == 200 and got.confidence == 0.9
    assert (out["ref"].difference, out["ref"].low, out["ref"].high) == (0.0, 0.0, 0.0)
    # the planted quality order comes out, with intervals that exclude 0
    assert out["better"].low > 0 > out["worse"].high


def test_bootstrap_matches_scipy_bootstrap_paired_percentile(fixed):
    labels, rows = fixed
    resamples, seed = 150, 3

    def statistic(idx: np.ndarray) -> float:
        return _row_score(rows["worse"], labels, idx) - _row_score(rows["ref"], labels, idx)

    res = sps.bootstrap((np.arange(N),), statistic, paired=True, vectorized=False,
                        n_resamples=resamples, method="percentile", confidence_level=0.95,
                        rng=np.random.default_rng(seed))
    got = paired_bootstrap(rows, labels, "ref", resamples=resamples, seed=seed)["worse"]
    assert (got.low, got.high) == pytest.approx(
        (res.confidence_interval.low, res.confidence_interval.high), abs=1e-10)


def test_statistic_averages_seed_runs_not_their_predictions(fixed):
    labels, rows = fixed
    indices = resample_clips(N, 5, seed=0)
    boot = bootstrap_mean_pearson({"better": rows["better"]}, labels, indices)["better"]
    per_seed = [_row_score(rows["better"], labels, i) for i in indices]
    ensemble = [_mean_r(np.mean(rows["better"], axis=0)[i], labels[i]) for i in indices]
    np.testing.assert_allclose(boot, per_seed, atol=1e-12)
    assert not np.allclose(boot, ensemble, atol=1e-3)


def test_bootstrap_is_seeded(fixed):
    labels, rows = fixed
    a = paired_bootstrap(rows, labels, "ref", resamples=300, seed=1)
    b = paired_bootstrap(rows, labels, "ref", resamples=300, seed=1)
    c = paired_bootstrap(rows, labels, "ref", resamples=300, seed=2)
    assert a == b
    assert a["better"].low != c["better"].low
    # identical rows differ by exactly zero on every resample
    same = paired_bootstrap({"ref": rows["ref"], "copy": list(rows["ref"])}, labels, "ref",
                            resamples=50)
    assert (same["copy"].low, same["copy"].high) == (0.0, 0.0)


def test_constant_column_on_a_resample_counts_as_zero_with_one_warning():
    y = np.zeros((40, 1))
    y[0, 0] = 1.0  # one non-zero label: resamples without clip 0 have a constant column
    p = np.linspace(0, 1, 40)[:, None]
    indices = resample_clips(40, 100, seed=0)
    without = ~(indices == 0).any(axis=1)
    assert 0 < without.sum() < 100
    with pytest.warns(UserWarning, match=f"'B' is undefined .* on {without.sum()} of 100 res"):
        boot = bootstrap_mean_pearson({"row": [p]}, y, indices, target_names=["B"])["row"]
    assert np.all(boot[without] == 0.0)
    expected = [sps.pearsonr(p[i, 0], y[i, 0]).statistic for i in indices[~without]]
    np.testing.assert_allclose(boot[~without], expected, atol=1e-12)


def test_shapes_are_checked(fixed):
    labels, rows = fixed
    with pytest.raises(ValueError, match="differ in shape"):
        pearson(rows["ref"][0][:10], labels)
    with pytest.raises(ValueError, match="reference row"):
        paired_bootstrap(rows, labels, "nope", resamples=10)
    with pytest.raises(ValueError, match="NaN"):
        pearson(np.full((N, K), np.nan), labels)
