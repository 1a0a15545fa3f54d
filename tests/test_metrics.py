"""Tests of the whole-split Pearson metric against scipy."""

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr
from torchmetrics.regression import PearsonCorrCoef

from emimimic.constants import EMOTIONS
from emimimic.training.metrics import EMIPearson, pearson_dict


def _random_split(
    seed: int, sizes: list[int], k: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    rng = np.random.default_rng(seed)
    preds, targets = [], []
    for b in sizes:
        y = rng.random((b, k))
        # Correlated predictions so r is far from 0 and an error would show.
        p = 0.6 * y + 0.4 * rng.random((b, k))
        preds.append(torch.tensor(p, dtype=torch.float32))
        targets.append(torch.tensor(y, dtype=torch.float32))
    return preds, targets


def test_matches_scipy_over_batches_of_different_sizes():
    k = len(EMOTIONS)
    preds, targets = _random_split(0, [7, 32, 1, 19, 2, 64], k)
    metric = EMIPearson(k, EMOTIONS)
    for p, t in zip(preds, targets, strict=True):
        metric.update(p, t)
    r = metric.compute()
    p_all = torch.cat(preds).double().numpy()
    t_all = torch.cat(targets).double().numpy()
    expected = np.array([pearsonr(p_all[:, j], t_all[:, j])[0] for j in range(k)])
    assert r.shape == (k,)
    assert r.dtype == torch.float32
    np.testing.assert_allclose(r.numpy(), expected, atol=1e-5)
    summary = pearson_dict(r, EMOTIONS)
    assert summary["pearson"].item() == pytest.approx(expected.mean(), abs=1e-5)
    for j, name in enumerate(EMOTIONS):
        assert summary[f"pearson/{name}"].item() == pytest.approx(expected[j], abs=1e-5)


def test_fp16_inputs_are_accumulated_in_float32():
    preds, targets = _random_split(1, [300, 211, 489], 2)
    metric = EMIPearson(2)
    for p, t in zip(preds, targets, strict=True):
        metric.update(p.half(), t.half())
    # Reference on the same fp16-rounded values, in float64: only accumulation error remains.
    p_all = torch.cat(preds).half().double().numpy()
    t_all = torch.cat(targets).half().double().numpy()
    expected = np.array([pearsonr(p_all[:, j], t_all[:, j])[0] for j in range(2)])
    np.testing.assert_allclose(metric.compute().numpy(), expected, atol=1e-5)


def test_bf16_inputs_are_accepted():
    preds, targets = _random_split(2, [50, 50], 1)
    metric = EMIPearson(1)
    for p, t in zip(preds, targets, strict=True):
        metric.update(p.bfloat16(), t.bfloat16())
    p_all = torch.cat(preds).bfloat16().double().numpy()[:, 0]
    t_all = torch.cat(targets).bfloat16().double().numpy()[:, 0]
    assert metric.compute().item() == pytest.approx(pearsonr(p_all, t_all)[0], abs=1e-5)


def test_constant_prediction_column_is_zero_and_warns():
    preds, targets = _random_split(3, [40, 25], 3)
    for p in preds:
        p[:, 1] = 0.3
    metric = EMIPearson(3, ["a", "b", "c"])
    for p, t in zip(preds, targets, strict=True):
        metric.update(p, t)
    with pytest.warns(UserWarning, match="'b'.*prediction"):
        r = metric.compute()
    assert r[1].item() == 0.0
    p_all, t_all = torch.cat(preds).double().numpy(), torch.cat(targets).double().numpy()
    assert r[0].item() == pytest.approx(pearsonr(p_all[:, 0], t_all[:, 0])[0], abs=1e-5)


def test_constant_label_column_is_zero_and_warns():
    preds, targets = _random_split(4, [30, 30], 2)
    for t in targets:
        t[:, 0] = 0.0
    metric = EMIPearson(2, ["x", "y"])
    for p, t in zip(preds, targets, strict=True):
        metric.update(p, t)
    with pytest.warns(UserWarning, match="'x'.*label"):
        r = metric.compute()
    assert r[0].item() == 0.0
    assert torch.isfinite(r).all()


def test_rounding_noise_column_counts_as_constant():
    rng = np.random.default_rng(5)
    metric = EMIPearson(2, ["noise", "real"])
    for b in (33, 17, 50):
        y = torch.tensor(rng.random((b, 2)), dtype=torch.float32)
        p = torch.empty(b, 2)
        # 0.3 plus noise at the 1e-9 level: in float32 only rounding of a constant remains.
        p[:, 0] = torch.tensor(0.3 + 1e-9 * rng.standard_normal(b), dtype=torch.float32)
        p[:, 1] = y[:, 1] + 0.1 * torch.tensor(rng.random(b), dtype=torch.float32)
        metric.update(p, y)
    with pytest.warns(UserWarning, match="'noise'"):
        r = metric.compute()
    assert r[0].item() == 0.0
    assert 0.5 < r[1].item() <= 1.0


def test_ulp_level_noise_column_counts_as_constant():
    rng = np.random.default_rng(6)
    metric = EMIPearson(1)
    base = np.float32(0.3)
    for b in (64, 64, 9):
        y = torch.tensor(rng.random((b, 1)), dtype=torch.float32)
        # Values one float32 ulp around 0.3, correlated with y: r would be large if not caught.
        ulps = np.where(y.numpy()[:, 0] > 0.5, 1, -1)
        p = np.nextafter(base, np.float32(np.inf) * ulps).astype(np.float32)[:, None]
        metric.update(torch.from_numpy(p), y)
    with pytest.warns(UserWarning, match="target 0"):
        r = metric.compute()
    assert r.item() == 0.0


def test_sparse_but_valid_column_is_not_zeroed():
    # One deviating clip among thousands: r is well defined (torchmetrics' own bound NaNs it).
    n = 5000
    p = torch.full((n, 1), 0.2)
    y = torch.zeros(n, 1)
    p[7, 0], y[7, 0] = 0.9, 1.0
    y[100:200, 0] = 0.5
    metric = EMIPearson(1)
    metric.update(p, y)
    expected = pearsonr(p.double().numpy()[:, 0], y.double().numpy()[:, 0])[0]
    assert metric.compute().item() == pytest.approx(expected, abs=1e-5)


def test_single_clip_gives_zero_not_nan():
    metric = EMIPearson(2)
    metric.update(torch.rand(1, 2), torch.rand(1, 2))
    with pytest.warns(UserWarning, match="only 1 clip"):
        r = metric.compute()
    assert torch.equal(r, torch.zeros(2))


def test_shape_mismatch_is_rejected():
    metric = EMIPearson(6)
    with pytest.raises(ValueError, match=r"\[B, 6\]"):
        metric.update(torch.rand(4, 5), torch.rand(4, 5))


def test_rank_states_merged_with_merge_state_give_the_whole_split():
    # what a DDP sync does: rank 0 adds rank 1's float64 sums to its own
    k = 3
    preds, targets = _random_split(7, [23, 41, 5, 30], k)
    ranks = [EMIPearson(k), EMIPearson(k)]
    for i, (p, t) in enumerate(zip(preds, targets, strict=True)):
        ranks[i % 2].update(p, t)
    assert all(getattr(ranks[0], name).dtype == torch.float64
               for name in ("n", "sx", "sy", "sxx", "syy", "sxy"))
    ranks[0].merge_state(ranks[1])
    p_all, t_all = torch.cat(preds).double().numpy(), torch.cat(targets).double().numpy()
    expected = np.array([pearsonr(p_all[:, j], t_all[:, j])[0] for j in range(k)])
    np.testing.assert_allclose(ranks[0].compute().numpy(), expected, atol=1e-6)
    assert int(ranks[0].n[0]) == 99


def test_matches_torchmetrics_pearson_on_ordinary_data():
    k = 4
    preds, targets = _random_split(8, [16, 16, 9, 40], k)
    ours, theirs = EMIPearson(k), PearsonCorrCoef(num_outputs=k)
    for p, t in zip(preds, targets, strict=True):
        ours.update(p, t)
        theirs.update(p, t)
    torch.testing.assert_close(ours.compute(), theirs.compute().float(), atol=1e-5, rtol=0)
