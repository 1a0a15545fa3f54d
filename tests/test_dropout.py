"""Element dropout of the network: the CPU mask and the per-window Binomial draw.

Both change how dropout's randomness is drawn, not what it is: the tests compare them with the
stock per-step masks, exactly for a fixed mask and in mean and variance over many draws.
"""

import numpy as np
import pytest
import torch
from scipy import stats

from emimimic.constants import STEPS
from emimimic.contract import FeatureBatch
from emimimic.models import EMINetwork, ModalityBranch
from emimimic.models.dropout import Dropout, below, keep_counts, uniform_words
from emimimic.pooling import windows
from tests.test_models import ODD_DIMS, assert_outputs_close, compact_batch, dense_inputs


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- Dropout: the CPU mask ------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
def test_the_cpu_mask_keeps_at_its_rate_and_scales_like_nn_dropout(p):
    torch.manual_seed(0)
    drop = Dropout(p).train()
    x = torch.rand(64, 128, 32) + 0.5  # no zeros: a zero out means a dropped element
    y = drop(x)
    kept = y != 0
    n, keep = kept.numel(), 1 - p
    # the number kept lies in the binomial's central 99.99 % interval
    low, high = stats.binom.interval(0.9999, n, keep)
    assert low <= int(kept.sum()) <= high
    torch.testing.assert_close(y[kept], x[kept] / keep)
    # the stock module's mean and variance of an element: x and x^2 p / (1 - p)
    ref = torch.nn.Dropout(p).train()(x)
    for out in (y, ref):
        torch.testing.assert_close(out.mean(), x.mean(), atol=5e-3, rtol=0)
    torch.testing.assert_close(((y - x) ** 2).mean() / (x ** 2).mean(),
                               torch.tensor(p / keep), atol=0.01, rtol=0)


def test_the_cpu_mask_masks_the_gradient_and_is_identity_in_eval():
    torch.manual_seed(1)
    drop = Dropout(0.2).train()
    x = torch.randn(8, 16, 4, requires_grad=True)
    y = drop(x)
    y.sum().backward()
    expected = (y.detach() != 0).float() / 0.8  # d y / d x: the scaled mask
    torch.testing.assert_close(x.grad, expected)
    drop.eval()
    assert drop(x) is x or torch.equal(drop(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)


def test_the_cpu_mask_follows_torchs_seed():
    drop = Dropout(0.3).train()
    x = torch.ones(4, 128, 8)
    torch.manual_seed(5)
    a = drop(x)
    torch.manual_seed(5)
    b = drop(x)
    c = drop(x)
    assert torch.equal(a, b) and not torch.equal(b, c)


def test_uniform_words_have_32_fair_bits_in_both_halves_of_a_draw():
    torch.manual_seed(0)
    words = uniform_words((40_001,))  # odd: the last 64-bit draw's second word is not used
    assert words.dtype == torch.int32 and words.shape == (40_001,)
    # the low and the high half of each 64-bit draw: every bit, sign bits included, is fair
    # (int64 random_() without a range would leave the high halves' sign bit at 0)
    for half in (words[0::2], words[1::2]):
        ones = ((half[:, None] >> torch.arange(32)) & 1).sum(0)
        low, high = stats.binom.interval(0.99999, half.numel(), 0.5)
        assert bool(((ones >= low) & (ones <= high)).all()), ones.tolist()


@pytest.mark.parametrize("q", [1e-3, 0.2, 0.5, 0.8, 0.999])
def test_a_word_is_below_its_threshold_with_the_threshold_probability(q):
    torch.manual_seed(3)
    n = 200_000
    hits = int((uniform_words((n,)) < below(q)).sum())
    low, high = stats.binom.interval(0.9999, n, q)
    assert low <= hits <= high
    # the threshold itself: q of the 2**32 words lie below it
    assert abs((below(q) + 2**31) / 2**32 - q) <= 2**-33
    assert below(0.0) == -(2**31) and below(1.0) == 2**31 - 1


# --- keep_counts: one Binomial draw per window and element -----------------------------------


@pytest.mark.parametrize("keep", [0.8, 0.5, 0.9])
def test_keep_counts_are_binomial_in_distribution(keep):
    torch.manual_seed(2)
    steps = torch.tensor([0, 1, 2, 3, 4, 7, 128, 2, 1])
    draws = 40_000
    counts = keep_counts(steps, keep, draws)  # row w: draws of Binomial(steps[w], keep)
    assert counts.shape == (len(steps), draws) and counts.dtype == torch.float32
    for row, n in zip(counts.numpy(), steps.tolist(), strict=True):
        assert row.min() >= 0 and row.max() <= n and np.all(row == np.round(row))
        if n == 0:
            assert not row.any()
            continue
        observed = np.bincount(row.astype(np.int64), minlength=n + 1)
        expected = stats.binom.pmf(np.arange(n + 1), n, keep) * draws
        # pool the sparse tail into its neighbours so every cell expects at least 5
        cells, obs, exp = [], 0.0, 0.0
        for o, e in zip(observed, expected, strict=True):
            obs, exp = obs + o, exp + e
            if exp >= 5:
                cells.append((obs, exp))
                obs, exp = 0.0, 0.0
        if exp and cells:
            cells[-1] = (cells[-1][0] + obs, cells[-1][1] + exp)
        if len(cells) > 1:
            o, e = np.array(cells).T
            assert stats.chisquare(o, e * o.sum() / e.sum()).pvalue > 1e-4, (n, keep)


def test_keep_counts_match_the_sums_of_per_step_masks_in_mean_and_variance():
    # a batch's real windows: what the per-step masks of those steps would sum to
    torch.manual_seed(3)
    lengths = torch.tensor([1, 2, 5, 35, 64, 100, 127, 128])
    win = windows(lengths)
    uses, keep, draws = win.uses(), 0.8, 4000
    mask = Dropout(0.2).train()(torch.ones(draws, len(lengths), STEPS)) * keep  # 0/1 per step
    per_step = torch.zeros(draws, len(uses)).index_add_(1, win.step.reshape(-1),
                                                        mask.reshape(draws, -1))
    binomial = keep_counts(uses, keep, draws).T  # [draws, W]
    n = uses.float()
    for sample in (per_step, binomial):
        se_mean = (n * keep * (1 - keep) / draws).sqrt()
        assert ((sample.mean(0) - n * keep).abs() <= 5 * se_mean + 1e-6).all()
        var = n * keep * (1 - keep)
        # the sample variance's standard error is about var * sqrt(2 / draws)
        assert ((sample.var(0) - var).abs() <= 5 * var * (2 / draws) ** 0.5 + 1e-6).all()
    assert torch.equal(keep_counts(uses, 1.0, 3), uses.float()[:, None].expand(-1, 3))


# --- the branch's per-window dropout ---------------------------------------------------------


def _fixed_masks(net: EMINetwork, batch, monkeypatch) -> None:
    """Gives the text and visual projectors' dropout a fixed per-step mask in both paths.

    The dense path multiplies the steps by the mask; the compact path's per-window counts are
    the mask's sums over the steps of each window. Every other dropout is off.
    """
    keep = 0.8
    g = torch.Generator().manual_seed(4)
    for module in net.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for m in ("visual", "text"):
        branch = net.branches[m]
        branch.projector[3].p = 1 - keep
        hidden = branch.projector[1].out_features
        mask = (torch.rand(len(batch), STEPS, hidden, generator=g) < keep).float()
        win = batch.window(m)

        def counts(win_, keep_, width, mask=mask, win=win):
            assert keep_ == keep and width == mask.shape[2]
            flat = mask.reshape(-1, width)
            return torch.zeros(win.first.shape[0], width).index_add_(0, win.step.reshape(-1),
                                                                      flat)

        def dense_drop(x, mask=mask):
            return x * mask / keep

        monkeypatch.setattr(branch, "keep_counts", counts)
        monkeypatch.setattr(branch.projector[3], "forward", dense_drop)


@pytest.mark.parametrize("fusion", ["concat", "gated"])
def test_per_window_dropout_with_fixed_masks_equals_the_dense_path(fusion, monkeypatch):
    batch = compact_batch(ODD_DIMS, seed=5)
    torch.manual_seed(6)
    net = EMINetwork(ODD_DIMS, fusion=fusion, vad=True, hidden=16).train()
    _fixed_masks(net, batch, monkeypatch)
    # text and visual take the per-window path; the VAD audio branch needs its steps
    assert [m for m, b in net.branches.items() if b._drops_by_window(batch.rows[m], False)] \
        == ["visual", "text"]
    compact = net(batch)
    weights = [net.branches[m].projector[1].weight for m in ("visual", "text")]
    got = torch.autograd.grad(compact.pred.square().mean(), weights)
    dense = net.forward_dense(*dense_inputs(batch))
    assert_outputs_close(compact, dense)
    expected = torch.autograd.grad(dense.pred.square().mean(), weights)
    for g, e in zip(got, expected, strict=True):
        assert e.abs().sum() > 0
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_per_window_dropout_gives_the_pooled_values_of_per_step_masks_in_distribution(
        monkeypatch):
    # the pooled value of a branch, drawn many times each way, has the same mean and variance
    torch.manual_seed(7)
    lengths = torch.tensor([1, 2, 3, 5, 17, 35, 64, 100, 127, 128, 0])
    batch = FeatureBatch(rows={"text": torch.randn(int(lengths.sum()), 5).half()},
                         lengths={"text": lengths}, target=torch.rand(len(lengths), 6),
                         ids=[str(i) for i in range(len(lengths))])
    torch.manual_seed(8)
    branch = ModalityBranch(5, 6, hidden=4, dropout=0.3).train()
    for module in branch.aux_head:
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    win = batch.window("text")
    present = batch.present("text")
    pooled = []
    monkeypatch.setattr(branch, "_finish", lambda p, *a, **k: pooled.append(p.detach()))
    draws = 3000
    samples = {}
    for by_window in (True, False):
        monkeypatch.setattr(ModalityBranch, "window_dropout", by_window)
        pooled.clear()
        with torch.no_grad():
            for _ in range(draws):
                branch(batch.rows["text"], win, present)
        samples[by_window] = torch.stack(pooled)[:, present]  # [draws, clips, H]
    a, b = samples[True], samples[False]
    # a difference of two means of `draws` samples: standard error sqrt(2 var / draws)
    se = ((a.var(0) + b.var(0)) / draws).sqrt()
    assert ((a.mean(0) - b.mean(0)).abs() <= 5 * se + 1e-7).all()
    # variances: relative standard error about sqrt(2 / draws) each
    ratio = a.var(0) / b.var(0).clamp(min=1e-12)
    spread = b.var(0) > 1e-10
    assert ((ratio[spread] - 1).abs() <= 5 * (4 / draws) ** 0.5).all()
    assert (a.var(0)[spread] > 0).all()


def test_per_window_dropout_is_used_only_where_the_steps_are_mean_pooled_directly():
    batch = compact_batch(ODD_DIMS, seed=9)
    net = EMINetwork(ODD_DIMS, vad=True, hidden=16)
    rows = batch.rows
    assert net.branches["text"]._drops_by_window(rows["text"], keep_steps=False)
    assert not net.branches["text"]._drops_by_window(rows["text"], keep_steps=True)
    assert not net.branches["audio"]._drops_by_window(rows["audio"], False)  # VAD pathway
    for options in ({"pooling": "attention"}, {"pooling": "lstm"}, {"temporal": True},
                    {"dropout": 0.0}):
        other = EMINetwork(ODD_DIMS, vad=False, hidden=16, **options)
        assert not other.branches["visual"]._drops_by_window(rows["visual"], False), options
    plain = EMINetwork(ODD_DIMS, vad=False, hidden=16)
    assert plain.branches["audio"]._drops_by_window(rows["audio"], False)
