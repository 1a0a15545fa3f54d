"""Dropout of elements (:class:`Dropout`) and of whole modalities (:func:`drop_modalities`).

Modality dropout: in training, clips lose whole modalities, as if the data were absent.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from emimimic.constants import STEPS


def uniform_words(shape: tuple[int, ...], device: torch.device | str = "cpu") -> Tensor:
    """Returns int32 ``shape`` of independent uniform 32-bit words from torch's generator.

    Two words per 64-bit draw (``random_`` over the full int64 range): on the CPU that costs
    half of what ``torch.rand`` does per element (5.2 against 9.2 ms for a million, 2 cores).
    ``word < below(q)`` holds with probability ``q`` to 2**-33, finer than a float32 uniform's
    2**-24.
    """
    count = math.prod(shape)
    draws = torch.empty((count + 1) // 2, dtype=torch.int64, device=device)
    return draws.random_(-(2**63), None).view(torch.int32)[:count].view(shape)


def below(q: float | Tensor) -> int | Tensor:
    """Returns the int32 threshold ``t`` with ``P(word < t) = q`` (to 2**-33) for uniform words.

    One rule for a probability (an ``int``) and a tensor of them (int32, computed in float64).
    """
    if isinstance(q, Tensor):
        return ((q.double() * 2**32).round_().clamp_(max=2**32 - 1) - 2**31).to(torch.int32)
    return min(round(q * 2**32), 2**32 - 1) - 2**31


class Dropout(nn.Dropout):
    """``nn.Dropout`` with a mask that costs a third as much on the CPU.

    The CPU kernel of ``nn.Dropout`` draws its mask with ``bernoulli_``: 7.8 ms for one
    ``[32, 128, 256]`` step tensor on two cores, and a training step of the paper's model has
    four of them. ``uniform_words(shape) < below(1 - p)`` draws the same mask (each element kept
    independently with probability ``1 - p``, to 2**-33, from torch's generator, so seeding and
    resuming work as before) in half the time of ``torch.rand(shape) < 1 - p``. Kept elements
    are scaled by ``1 / (1 - p)`` as in ``nn.Dropout``. Other devices use the stock fused kernel;
    evaluation, ``p = 0`` and ``p = 1`` are the stock module's.
    """

    def forward(self, x: Tensor) -> Tensor:
        keep = 1.0 - self.p
        if not self.training or x.device.type != "cpu" or self.inplace or keep in (0.0, 1.0):
            return super().forward(x)
        mask = uniform_words(x.shape, x.device) < below(keep)
        return x * mask.to(x.dtype).mul_(1.0 / keep)


def drop_modalities(present: Mapping[str, Tensor], rates: Mapping[str, float],
                    generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Returns the presence masks after dropping each present modality of each clip at its rate.

    A dropped modality takes the same path as a truly absent one (the branch's learned
    missing-modality embedding, the fusion's missing token, no auxiliary loss). A clip never
    loses all of its modalities: when every modality it has was drawn for dropping, one of them,
    chosen uniformly, is kept. With one rate p for all M modalities of a clip, a modality is
    therefore dropped with probability ``p - p**M / M`` (0.0997 for p = 0.1, M = 3).

    Args:
        present: modality -> bool ``[B]``, the clips that have the modality.
        rates: modality -> drop probability in [0, 1) (missing modalities: 0).
        generator: random generator (default: torch's global one).
    """
    names = list(present)
    mask = torch.stack([present[m].to(torch.bool) for m in names], dim=1)  # [B, M]
    p = torch.tensor([float(rates.get(m, 0.0)) for m in names], device=mask.device)
    draw = torch.rand(mask.shape, generator=generator, device=mask.device)
    drop = (draw < p) & mask
    lost = mask.any(dim=1) & ~(mask & ~drop).any(dim=1)
    # the modality a clip that lost everything keeps, uniformly among those it has (drawn for
    # every clip, so the random stream does not depend on the draw above)
    score = torch.rand(mask.shape, generator=generator, device=mask.device)
    keep = torch.nn.functional.one_hot(score.masked_fill(~mask, -1.0).argmax(dim=1),
                                       len(names)).to(torch.bool)
    kept = mask & (~drop | (keep & lost[:, None]))
    return {m: kept[:, i] for i, m in enumerate(names)}


@functools.lru_cache(maxsize=8)
def _binomial_cdf(keep: float) -> Tensor:
    """Returns int32 ``[129, 128]``: ``below(P(Binomial(n, keep) <= k))`` at ``[n, k]``, n <= 128.

    A uniform word at or above entry ``[n, k]`` (probability ``P(count > k)``, to 2**-33) means
    a count above ``k``. Entries with ``k >= n`` are never compared. Computed in float64 from
    the log-probabilities, once per ``keep``: a window is used by at most the 128 steps of a clip.
    """
    table = torch.ones((STEPS + 1, STEPS), dtype=torch.float64)
    for n in range(1, STEPS + 1):
        k = torch.arange(n, dtype=torch.float64)
        log_pmf = (math.lgamma(n + 1.0) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)
                   + k * math.log(keep) + (n - k) * math.log1p(-keep))
        table[n, :n] = torch.cumsum(log_pmf.exp(), 0).clamp(max=1.0)
    return below(table)


def keep_counts(steps: Tensor, keep: float, width: int) -> Tensor:
    """Returns float32 ``[W, width]`` draws of ``Binomial(steps[w], keep)``, one per element.

    When ``n`` steps of a clip use the same window ``w`` (:mod:`emimimic.pooling`) and each
    step's element is kept by its own dropout mask with probability ``keep``, the number of
    those steps that keep it is ``Binomial(n, keep)``. With mean pooling right after the dropout,
    that count is all the pooled value depends on, so one draw per window and element replaces
    the ``n`` per-step masks. Drawn by inverting the distribution function with one uniform
    32-bit word each (:func:`uniform_words`, like the masks), from torch's generator;
    ``steps = 0`` gives 0.

    Args:
        steps: int64 ``[W]``, the number of steps that use each window (0 to 128).
        keep: the probability that one step keeps an element, ``1 - p``.
        width: the number of elements per window.
    """
    count = steps.shape[0]
    if keep == 1.0 or count == 0:
        return steps.to(torch.float32)[:, None].expand(count, width).contiguous()
    order = torch.argsort(steps, descending=True, stable=True)
    ranked = steps.index_select(0, order)
    most = int(ranked[0])
    if most == 0 or keep == 0.0:
        return torch.zeros(count, width, device=steps.device)
    cdf = _binomial_cdf(keep)[:, :most].to(steps.device)
    thresholds = cdf.index_select(0, ranked)  # [W, most], windows with most steps first
    # rows with more than k steps: a prefix of the ranked windows, for each k
    longer = torch.bincount(ranked, minlength=most + 1).flip(0).cumsum(0).flip(0)[1:].tolist()
    words = uniform_words((count, width), steps.device)
    # counted in uint8 (at most 128): a sixth of the time of float32 sums
    counts = torch.zeros(count, width, dtype=torch.uint8, device=steps.device)
    for k, rows in enumerate(longer):
        counts[:rows] += words[:rows] >= thresholds[:rows, k:k + 1]
    out = torch.empty(count, width, device=steps.device)
    return out.index_copy_(0, order, counts.to(torch.float32))
