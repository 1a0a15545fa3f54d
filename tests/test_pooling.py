"""The pooling bins: reference pooling, expansion to 128 steps, distinct windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support.reference import torch_pool

from emimimic.constants import STEPS
from emimimic.pooling import BINS, expand_rows, pool_reference, windows

ALL_LENGTHS = list(range(STEPS + 1))  # every stored length, 0 (absent) included


def f16_rows(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Float16 rows over a wide range of magnitudes and signs, without -0.0 (as stored)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 10.0 ** rng.uniform(-4, 3, size=shape)
    return torch.from_numpy((x.astype(np.float16).astype(np.float32) + 0.0).astype(np.float16))


def batch_of(lengths: list[int], dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rows [sum(lengths), dim] float16, lengths [B] int64) of random clips."""
    clips = [f16_rows(seed + k, (n, dim)) for k, n in enumerate(lengths)]
    return torch.cat(clips), torch.tensor(lengths, dtype=torch.int64)


@pytest.mark.parametrize("length", [1, 5, 127, 128, 129, 300, 1000])
def test_pool_reference_is_adaptive_avg_pool(length: int) -> None:
    raw = f16_rows(length, (length, 6)).float().numpy()
    got = pool_reference(raw)
    assert got.dtype == np.float16 and got.shape == (STEPS, 6)
    np.testing.assert_array_equal(got.view(np.uint16), torch_pool(raw).view(np.uint16))


def test_bins_are_the_rows_adaptive_pooling_averages() -> None:
    # pooling the identity shows which raw rows each step averages
    for length in range(1, STEPS + 1):
        weights = F.adaptive_avg_pool1d(torch.eye(length)[None], STEPS)[0].T  # [128, L]
        used = weights > 0
        first = used.float().argmax(1)
        last = length - 1 - used.flip(1).float().argmax(1)
        assert torch.equal(BINS[0][length], first), length
        assert torch.equal(BINS[1][length], last), length
        assert int((last - first).max()) <= 1  # one or two rows per step when L <= 128


def test_expand_matches_adaptive_pool_for_every_length() -> None:
    lengths = list(range(1, STEPS + 1))
    rows, counts = batch_of(lengths, 12, seed=0)
    out = expand_rows(rows, counts)
    assert out.dtype == torch.float16 and out.shape == (STEPS, STEPS, 12)
    start = 0
    for k, n in enumerate(lengths):
        np.testing.assert_array_equal(out[k].numpy().view(np.uint16),
                                      torch_pool(rows[start:start + n]).view(np.uint16),
                                      err_msg=f"L={n}")
        start += n


def test_expand_puts_zeros_for_absent_clips_anywhere() -> None:
    lengths = [0, 5, 0, 128, 1, 0]
    rows, counts = batch_of(lengths, 3, seed=10)
    out = expand_rows(rows, counts)
    start = 0
    for k, n in enumerate(lengths):
        expected = np.zeros((STEPS, 3), np.float16) if n == 0 else torch_pool(rows[start:start + n])
        np.testing.assert_array_equal(out[k].numpy().view(np.uint16), expected.view(np.uint16))
        start += n
    none = expand_rows(torch.zeros(0, 3, dtype=torch.float16), torch.tensor([0, 0]))
    assert none.shape == (2, STEPS, 3) and not none.any()


@pytest.mark.parametrize(("rows", "lengths", "message"), [
    (7, [3, 3], "must sum to the 7 rows"),
    (130, [130], "each at most 128"),
])
def test_expand_refuses_lengths_that_do_not_fit_the_rows(rows: int, lengths: list[int],
                                                         message: str) -> None:
    with pytest.raises(ValueError, match=message):
        expand_rows(torch.zeros(rows, 2, dtype=torch.float16), torch.tensor(lengths))


def mixed_lengths(seed: int) -> list[int]:
    """Every stored length 0..128 once, shuffled, with extra absent clips first and last."""
    order = np.random.default_rng(seed).permutation(ALL_LENGTHS).tolist()
    return [0, *order, 0]


@pytest.mark.parametrize("lengths", [
    ALL_LENGTHS,
    mixed_lengths(1),
    mixed_lengths(2),
    [0, 0, 0],
    [128, 0, 1],
], ids=["every-length", "shuffled-1", "shuffled-2", "all-absent", "short"])
def test_gathered_windows_are_the_expanded_steps_exactly(lengths: list[int]) -> None:
    rows, counts = batch_of(lengths, 5, seed=len(lengths))
    w = windows(counts)
    inputs = w.gather(rows)
    assert inputs.dtype == torch.float32 and inputs.shape == (w.first.shape[0], 5)
    assert w.step.shape == (len(lengths), STEPS)
    got = inputs[w.step]
    expected = expand_rows(rows, counts).float()
    for k, n in enumerate(lengths):
        assert torch.equal(got[k], expected[k]), f"clip {k}, L={n}"


def test_windows_per_clip_are_few_distinct_and_weighted_by_their_steps() -> None:
    lengths = mixed_lengths(3)
    rows, counts = batch_of(lengths, 4, seed=3)
    w = windows(counts)
    for k, n in enumerate(lengths):
        mine = torch.nonzero(w.clip == k).squeeze(1)
        if n == 0:
            assert mine.numel() == 1 and bool(w.absent[mine].all())
        else:
            assert 1 <= mine.numel() <= min(STEPS, 2 * n - 1), f"L={n}: {mine.numel()} windows"
            assert not w.absent[mine].any()
            pairs = set(zip(w.first[mine].tolist(), w.last[mine].tolist(), strict=True))
            assert len(pairs) == mine.numel(), f"L={n}: repeated windows"
        # each clip's steps use only its own windows, every one of them
        assert set(w.step[k].tolist()) == set(mine.tolist())
        uses = torch.bincount(w.step[k], minlength=w.clip.shape[0])[mine].float() / STEPS
        assert torch.equal(w.weight[mine], uses)
    assert w.first.shape[0] < counts.shape[0] * STEPS  # fewer windows than steps overall


def test_windows_mean_is_the_mean_over_steps() -> None:
    lengths = mixed_lengths(4)
    counts = torch.tensor(lengths)
    w = windows(counts)
    values = torch.randn(w.first.shape[0], 7, generator=torch.Generator().manual_seed(0),
                         dtype=torch.float64)
    got = w.mean(values)
    assert got.shape == (len(lengths), 7)
    torch.testing.assert_close(got, values[w.step].mean(dim=1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("lengths", [[STEPS] * 4, mixed_lengths(5), [STEPS, 0, STEPS]],
                         ids=["all-128", "mixed", "absent"])
def test_expand_gives_each_steps_window_and_sums_gradients_into_it(lengths: list[int]) -> None:
    w = windows(torch.tensor(lengths))
    assert w.rows_only == all(n == STEPS for n in lengths)
    values = torch.randn(w.first.shape[0], 3, dtype=torch.float64, requires_grad=True)
    got = w.expand(values)
    assert got.shape == (len(lengths), STEPS, 3)
    for k in range(len(lengths)):
        for i in range(STEPS):
            assert torch.equal(got[k, i], values[w.step[k, i]]), f"clip {k}, step {i}"
    # the gradient of a window is the sum over the steps that use it (independent count)
    upstream = torch.randn(len(lengths), STEPS, 3, dtype=torch.float64)
    got.backward(upstream)
    expected = torch.zeros_like(values)
    for k in range(len(lengths)):
        for i in range(STEPS):
            expected[w.step[k, i]] += upstream[k, i]
    torch.testing.assert_close(values.grad, expected, rtol=1e-12, atol=1e-12)
