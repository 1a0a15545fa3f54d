"""Tests of the batch Pearson loss and the combined EMI loss against numpy references."""

import numpy as np
import pytest
import torch

from emimimic.contract import EMIOutput
from emimimic.training.correlation import ccc
from emimimic.training.losses import EMILoss, LossOptions, ccc_loss, pearson_loss


def _np_pearson_loss(p: np.ndarray, t: np.ndarray) -> float:
    rs = [np.corrcoef(p[:, k], t[:, k])[0, 1] for k in range(p.shape[1])]
    return 1.0 - float(np.mean(rs))


def _np_smooth_l1(a: np.ndarray, b: np.ndarray) -> float:
    d = np.abs(a - b)
    return float(np.mean(np.where(d < 1.0, 0.5 * d**2, d - 0.5)))


def test_pearson_loss_matches_numpy():
    rng = np.random.default_rng(0)
    t = rng.random((32, 6))
    p = 0.5 * t + 0.5 * rng.random((32, 6))
    loss = pearson_loss(torch.tensor(p, dtype=torch.float32), torch.tensor(t, dtype=torch.float32))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(_np_pearson_loss(p, t), abs=1e-5)


def test_pearson_loss_fp16_is_computed_in_float32():
    rng = np.random.default_rng(1)
    p = torch.tensor(rng.random((64, 3))).half()
    t = torch.tensor(rng.random((64, 3))).half()
    loss = pearson_loss(p, t)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(
        _np_pearson_loss(p.double().numpy(), t.double().numpy()), abs=1e-5
    )


def test_pearson_loss_single_row_is_zero_with_grad_path():
    p = torch.rand(1, 6, requires_grad=True)
    loss = pearson_loss(p, torch.rand(1, 6))
    assert loss.item() == 0.0
    loss.backward()
    assert p.grad is not None
    assert torch.equal(p.grad, torch.zeros(1, 6))


def test_pearson_loss_constant_columns_are_zero_and_grads_finite():
    rng = np.random.default_rng(2)
    t = rng.random((16, 3))
    p = rng.random((16, 3))
    p[:, 0] = 0.3  # constant prediction column
    t[:, 1] = 0.0  # constant target column
    pt = torch.tensor(p, dtype=torch.float32, requires_grad=True)
    loss = pearson_loss(pt, torch.tensor(t, dtype=torch.float32))
    expected = 1.0 - np.corrcoef(p[:, 2], t[:, 2])[0, 1] / 3.0
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    loss.backward()
    assert torch.isfinite(pt.grad).all()


def test_pearson_loss_gradient_matches_finite_difference():
    rng = np.random.default_rng(3)
    p = torch.tensor(rng.random((8, 2)), dtype=torch.float64, requires_grad=True)
    t = torch.tensor(rng.random((8, 2)), dtype=torch.float64)
    # float32 internally, so compare the analytic gradient with a numpy central difference.
    pearson_loss(p, t).backward()
    h = 1e-4
    num = np.zeros((8, 2))
    base = p.detach().numpy()
    for i in range(8):
        for k in range(2):
            up, down = base.copy(), base.copy()
            up[i, k] += h
            down[i, k] -= h
            num[i, k] = (_np_pearson_loss(up, t.numpy()) - _np_pearson_loss(down, t.numpy())) / (
                2 * h
            )
    np.testing.assert_allclose(p.grad.numpy(), num, atol=2e-3)


def _output(rng: np.random.Generator, b: int, k: int, modalities, vad: bool) -> EMIOutput:
    def tensor(*shape):
        return torch.tensor(rng.random(shape), dtype=torch.float32, requires_grad=True)

    return EMIOutput(
        pred=tensor(b, k),
        aux={m: tensor(b, k) for m in modalities},
        vad=tensor(b, 3) if vad else None,
        embeddings={m: tensor(b, 8) for m in modalities},
    )


def test_emi_loss_terms_match_hand_computation():
    rng = np.random.default_rng(4)
    b, k = 10, 6
    mods = ("visual", "audio", "text")
    out = _output(rng, b, k, mods, vad=True)
    # Aux outputs far from targets for some rows so SmoothL1's linear part is exercised too.
    out.aux["text"].data[:3] += 2.0
    y = torch.tensor(rng.random((b, k)), dtype=torch.float32)
    present = {
        "visual": torch.tensor([True] * 6 + [False] * 4),
        "audio": torch.tensor([False, True] * 5),
        "text": torch.ones(b, dtype=torch.bool),
    }
    loss_fn = EMILoss()
    terms = loss_fn(out, y, present, epoch=100)
    p, yn = out.pred.detach().numpy(), y.numpy()
    mse = float(np.mean((p - yn) ** 2))
    pears = _np_pearson_loss(p, yn)
    weights = {"visual": 0.2, "audio": 0.35, "text": 0.45}
    aux_m = {
        m: _np_smooth_l1(out.aux[m].detach().numpy()[present[m].numpy()], yn[present[m].numpy()])
        for m in mods
    }
    aux = sum(weights[m] * aux_m[m] for m in mods)
    vad_np = out.vad.detach().numpy()[present["audio"].numpy()]
    vad_prior = float(np.mean((vad_np - 0.5) ** 2))
    assert terms["mse"].item() == pytest.approx(mse, abs=1e-6)
    assert terms["pearson"].item() == pytest.approx(pears, abs=1e-5)
    for m in mods:
        assert terms[f"aux/{m}"].item() == pytest.approx(aux_m[m], abs=1e-6)
    assert terms["aux"].item() == pytest.approx(aux, abs=1e-6)
    assert terms["vad_prior"].item() == pytest.approx(vad_prior, abs=1e-6)
    total = mse + 0.1 * pears + 0.03 * aux + 0.01 * vad_prior
    assert terms["loss"].item() == pytest.approx(total, abs=1e-6)
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in terms.values())
    terms["loss"].backward()
    # Absent clips must not receive aux gradient.
    assert torch.all(out.aux["visual"].grad[6:] == 0)
    assert torch.any(out.aux["visual"].grad[:6] != 0)


def test_corr_warmup_ramp():
    loss_fn = EMILoss(LossOptions(lambda_corr=0.1, corr_warmup_epochs=8))
    got = [loss_fn.corr_weight(e) for e in range(10)]
    expected = [0.1 * min(1.0, (e + 1) / 8) for e in range(10)]
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert EMILoss(LossOptions(corr_warmup_epochs=0)).corr_weight(0) == pytest.approx(0.1)
    rng = np.random.default_rng(5)
    out = _output(rng, 12, 6, ("text",), vad=False)
    y = torch.tensor(rng.random((12, 6)), dtype=torch.float32)
    terms = loss_fn(out, y, None, epoch=1)
    expected_loss = terms["mse"] + 0.1 * 2 / 8 * terms["pearson"] + 0.03 * 0.45 * terms["aux/text"]
    assert terms["loss"].item() == pytest.approx(expected_loss.item(), abs=1e-6)
    assert terms["vad_prior"].item() == 0.0


def test_zero_lambdas_leave_mse_only_and_absent_branch_contributes_zero():
    rng = np.random.default_rng(6)
    out = _output(rng, 5, 6, ("audio", "text"), vad=True)
    out.vad.data[:] = float("nan")  # a removed term must not leak into the loss
    y = torch.tensor(rng.random((5, 6)), dtype=torch.float32)
    present = {"audio": torch.zeros(5, dtype=torch.bool), "text": torch.ones(5, dtype=torch.bool)}
    baseline = EMILoss(LossOptions(lambda_corr=0.0, lambda_aux=0.0, lambda_vad=0.0))
    terms = baseline(out, y, present, epoch=3)
    mse = float(np.mean((out.pred.detach().numpy() - y.numpy()) ** 2))
    assert terms["loss"].item() == pytest.approx(mse, abs=1e-6)
    full = EMILoss(LossOptions(lambda_vad=0.0))(out, y, present, epoch=3)
    assert full["aux/audio"].item() == 0.0
    full["loss"].backward()
    assert torch.equal(out.aux["audio"].grad, torch.zeros(5, 6))


def test_unknown_branch_weight_is_rejected():
    rng = np.random.default_rng(7)
    out = _output(rng, 4, 6, ("text",), vad=False)
    with pytest.raises(ValueError, match="'text'"):
        EMILoss(LossOptions(aux_weights={"audio": 1.0}))(out, torch.rand(4, 6), None, epoch=0)


def test_emi_loss_single_clip_and_constant_columns_are_finite():
    rng = np.random.default_rng(8)
    for b in (1, 6):
        out = _output(rng, b, 6, ("audio", "text"), vad=True)
        out.pred.data[:, :2] = 0.5  # constant prediction columns
        y = torch.tensor(rng.random((b, 6)), dtype=torch.float32)
        y[:, 3] = 0.0  # constant target column
        terms = EMILoss()(out, y, None, epoch=0)
        assert all(torch.isfinite(v) for v in terms.values())
        terms["loss"].backward()
        assert torch.isfinite(out.pred.grad).all()
        if b == 1:
            assert terms["pearson"].item() == 0.0


@pytest.mark.parametrize("field", ["lambda_mse", "lambda_ccc", "lambda_corr", "lambda_aux",
                                   "lambda_vad", "corr_warmup_epochs"])
def test_negative_options_are_rejected(field):
    with pytest.raises(ValueError, match="must be >= 0"):
        EMILoss(LossOptions(**{field: -1}))



# --- CCC and per-clip sample weights ------------------------------------------------------------


def _np_ccc(p: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Lin's concordance per column, written out with numpy's population moments."""
    mp, mt = p.mean(0), t.mean(0)
    cov = ((p - mp) * (t - mt)).mean(0)
    return 2 * cov / (p.var(0) + t.var(0) + (mp - mt) ** 2)


def test_ccc_matches_numpy_and_penalises_shift_and_scale():
    rng = np.random.default_rng(10)
    t = rng.random((40, 6))
    p = 0.6 * t + 0.3 * rng.random((40, 6)) + 0.1
    got = ccc(torch.tensor(p, dtype=torch.float32), torch.tensor(t, dtype=torch.float32))
    np.testing.assert_allclose(got.numpy(), _np_ccc(p, t), atol=1e-5)
    assert ccc_loss(torch.tensor(p), torch.tensor(t)).item() == pytest.approx(
        1 - _np_ccc(p, t).mean(), abs=1e-5)
    # unlike Pearson's r, a shifted or scaled copy of the target is not in full agreement
    tt = torch.tensor(t)
    assert ccc(tt, tt).numpy() == pytest.approx(np.ones(6), abs=1e-6)
    assert (ccc(tt + 0.2, tt) < 0.9).all() and (ccc(2 * tt, tt) < 0.95).all()
    # constant columns: no concordance, no NaN
    const = ccc(torch.full((5, 2), 0.3), torch.full((5, 2), 0.3))
    assert torch.equal(const, torch.zeros(2))


def test_ccc_term_and_mse_weight_enter_the_loss():
    rng = np.random.default_rng(11)
    out = _output(rng, 16, 6, ("text",), vad=False)
    y = torch.tensor(rng.random((16, 6)), dtype=torch.float32)
    options = LossOptions(lambda_mse=0.3, lambda_ccc=0.7, lambda_corr=0.0, lambda_aux=0.0,
                          lambda_vad=0.0)
    terms = EMILoss(options)(out, y)
    p, yn = out.pred.detach().numpy(), y.numpy()
    expected = 0.3 * np.mean((p - yn) ** 2) + 0.7 * (1 - _np_ccc(p, yn).mean())
    assert terms["ccc"].item() == pytest.approx(1 - _np_ccc(p, yn).mean(), abs=1e-5)
    assert terms["loss"].item() == pytest.approx(expected, abs=1e-5)


def _weighted_np(p, y, aux, vad, present, w):
    """Every loss term as a weighted mean over clips, written out with numpy."""
    def mean(values, rows):
        return float(np.sum(w[rows] * values[rows]) / np.sum(w[rows]))

    def moments(a, b):
        wn = w[:, None] / w.sum()
        ma, mb = (wn * a).sum(0), (wn * b).sum(0)
        va, vb = (wn * (a - ma) ** 2).sum(0), (wn * (b - mb) ** 2).sum(0)
        return ma, mb, va, vb, (wn * (a - ma) * (b - mb)).sum(0)

    all_rows = np.ones(len(w), dtype=bool)
    ma, mb, va, vb, cov = moments(p, y)
    d = np.abs(aux - y)
    smooth = np.where(d < 1.0, 0.5 * d ** 2, d - 0.5).mean(1)
    return {
        "mse": mean(((p - y) ** 2).mean(1), all_rows),
        "pearson": 1 - float(np.mean(cov / np.sqrt(va * vb))),
        "ccc": 1 - float(np.mean(2 * cov / (va + vb + (ma - mb) ** 2))),
        "aux/audio": mean(smooth, present),
        "vad_prior": mean(((vad - 0.5) ** 2).mean(1), present),
    }


def test_sample_weights_make_every_term_a_weighted_mean():
    rng = np.random.default_rng(12)
    b = 12
    out = _output(rng, b, 6, ("audio",), vad=True)
    y = torch.tensor(rng.random((b, 6)), dtype=torch.float32)
    present = {"audio": torch.tensor([True, False] * 6)}
    w = rng.random(b) * 3
    options = LossOptions(lambda_ccc=0.5, aux_weights={"audio": 1.0})
    terms = EMILoss(options)(out, y, present, epoch=100, weight=torch.tensor(w))
    expected = _weighted_np(out.pred.detach().numpy(), y.numpy(), out.aux["audio"].detach().numpy(),
                            out.vad.detach().numpy(), present["audio"].numpy(), w)
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, abs=1e-5), name
    unweighted = EMILoss(options)(out, y, present, epoch=100)
    assert abs(unweighted["mse"].item() - terms["mse"].item()) > 1e-4  # the weights matter
    ones = EMILoss(options)(out, y, present, epoch=100, weight=torch.ones(b))
    for name in expected:  # weights of 1 change nothing
        assert ones[name].item() == pytest.approx(unweighted[name].item(), abs=1e-6), name


def test_integer_sample_weights_equal_repeated_clips():
    rng = np.random.default_rng(13)
    b = 9
    out = _output(rng, b, 6, ("audio", "text"), vad=True)
    y = torch.tensor(rng.random((b, 6)), dtype=torch.float32)
    present = {"audio": torch.tensor([True, True, False] * 3), "text": torch.ones(b, dtype=bool)}
    counts = torch.tensor([1, 3, 2, 1, 1, 4, 2, 1, 3])
    options = LossOptions(lambda_ccc=0.4)
    weighted = EMILoss(options)(out, y, present, epoch=100, weight=counts.float())
    rows = torch.repeat_interleave(torch.arange(b), counts)
    repeated = EMIOutput(pred=out.pred[rows], aux={m: a[rows] for m, a in out.aux.items()},
                         vad=out.vad[rows])
    plain = EMILoss(options)(repeated, y[rows], {m: p[rows] for m, p in present.items()},
                             epoch=100)
    for name, value in plain.items():
        assert weighted[name].item() == pytest.approx(value.item(), abs=1e-5), name


def test_the_networks_presence_masks_take_precedence():
    """A modality dropped in training has no auxiliary loss, like an absent one."""
    rng = np.random.default_rng(14)
    out = _output(rng, 6, 6, ("audio",), vad=True)
    y = torch.tensor(rng.random((6, 6)), dtype=torch.float32)
    batch_present = {"audio": torch.ones(6, dtype=torch.bool)}
    used = torch.tensor([True, False, True, False, True, True])
    out.present = {"audio": used}
    terms = EMILoss()(out, y, batch_present)
    reference = EMILoss()(out, y, {"audio": used})
    out.present = None
    assert terms["aux/audio"].item() == pytest.approx(
        EMILoss()(out, y, {"audio": used})["aux/audio"].item())
    assert terms["aux/audio"].item() == pytest.approx(reference["aux/audio"].item())
    assert terms["aux/audio"].item() != pytest.approx(
        EMILoss()(out, y, batch_present)["aux/audio"].item())
