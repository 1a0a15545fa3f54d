"""Pearson's r and Lin's concordance, defined once: from moments, with one rule for constants.

Every correlation in emimimic comes from :func:`correlation_from_moments`: the batch loss
(:func:`pearson`, differentiable, optionally weighted), the whole-split challenge metric
(:class:`~emimimic.training.metrics.EMIPearson`, from float64 running sums) and the bootstrap
of ``emimimic table`` (:mod:`emimimic.experiments.stats`, from resampled clip counts). Only how
the moments are accumulated differs.

The rule for a constant column: a column counts as constant when its variance is at most
:data:`CONSTANT_RELATIVE_VARIANCE` times the second moment the variance was computed from (its
spread is below ~1e-5 of its magnitude, ~100 float32 ulps): the rounding noise of a constant
column's variance is proportional to that moment and sits many orders below the bound, real
predictions far above. For sums around 0 or around the column's own mean that moment is
``mean^2 + var``; sums around another point pass theirs (``scale``). Pearson's r of a constant
column is undefined; it counts as 0 (and as no gradient), never NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Relative variance below which a column counts as constant (see the module docstring).
CONSTANT_RELATIVE_VARIANCE: float = 1e-10


def constant(mean: Tensor, var: Tensor, scale: Tensor | None = None) -> Tensor:
    """Returns where a column of mean ``mean`` and (population) variance ``var`` is constant.

    ``scale`` is the second moment the variance was computed from (default ``mean^2 + var``,
    that of sums around 0 or around the mean; see the module docstring).
    """
    return var <= CONSTANT_RELATIVE_VARIANCE * (mean * mean + var if scale is None else scale)


def correlation_from_moments(mean_x: Tensor, mean_y: Tensor, var_x: Tensor, var_y: Tensor,
                             cov: Tensor, scale_x: Tensor | None = None,
                             scale_y: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Returns Pearson's r and where it is undefined (a constant column), from moments.

    All arguments are population moments of matching shape (any), e.g. per target; ``scale_*``
    as in :func:`constant`. ``r`` is 0 where undefined, clamped to [-1, 1] elsewhere, and
    differentiable in the moments.
    """
    var_x, var_y = var_x.clamp_min(0.0), var_y.clamp_min(0.0)
    undefined = constant(mean_x, var_x, scale_x) | constant(mean_y, var_y, scale_y)
    denom = torch.sqrt(torch.where(undefined, torch.ones_like(var_x), var_x * var_y))
    r = torch.where(undefined, torch.zeros_like(cov), cov / denom)
    return r.clamp(-1.0, 1.0), undefined


def weighted_moments(x: Tensor, y: Tensor, weight: Tensor | None = None
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns the per-column means, variances and covariance of ``x``, ``y`` ``[N, K]``.

    Population moments (divided by the total weight), centred in two passes; ``weight`` ``[N]``
    are non-negative frequency weights (None: all 1). Computed in float32 at least.
    """
    x, y = x.float(), y.float()
    if weight is None:
        mean_x, mean_y = x.mean(0), y.mean(0)
        xc, yc = x - mean_x, y - mean_y
        return mean_x, mean_y, (xc * xc).mean(0), (yc * yc).mean(0), (xc * yc).mean(0)
    w = weight.to(x.dtype)[:, None] / weight.to(x.dtype).sum()
    mean_x, mean_y = (w * x).sum(0), (w * y).sum(0)
    xc, yc = x - mean_x, y - mean_y
    return (mean_x, mean_y, (w * xc * xc).sum(0), (w * yc * yc).sum(0), (w * xc * yc).sum(0))


def _columns(x: Tensor, y: Tensor, what: str) -> tuple[Tensor, Tensor]:
    """Returns ``x``, ``y`` as ``[N, K]`` columns (a ``[N]`` vector is one column)."""
    if x.shape != y.shape:
        raise ValueError(f"{what}: shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    return (x[:, None], y[:, None]) if x.ndim == 1 else (x, y)


def pearson(x: Tensor, y: Tensor, weight: Tensor | None = None) -> Tensor:
    """Returns Pearson's r per column of ``x``, ``y`` ``[N, K]`` (0 for a constant column).

    Differentiable; ``weight`` ``[N]`` weighs the rows (integer weights equal repeated rows).
    Fewer than two rows have no correlation: r = 0, connected to ``x`` (a zero gradient).
    """
    x, y = _columns(x, y, "pearson")
    if x.shape[0] < 2:
        return x.float().sum(0) * 0.0
    return correlation_from_moments(*weighted_moments(x, y, weight))[0]


def ccc(x: Tensor, y: Tensor, weight: Tensor | None = None) -> Tensor:
    """Returns Lin's concordance correlation per column of ``x``, ``y`` ``[N, K]``.

    ``2 cov / (var_x + var_y + (mean_x - mean_y)^2)``: Pearson's r scaled down by any difference
    in mean or spread. Two constant columns have no concordance: 0 (and no gradient).
    Differentiable; ``weight`` as in :func:`pearson`.
    """
    x, y = _columns(x, y, "ccc")
    if x.shape[0] < 2:
        return x.float().sum(0) * 0.0
    mean_x, mean_y, var_x, var_y, cov = weighted_moments(x, y, weight)
    denom = var_x + var_y + (mean_x - mean_y) ** 2
    undefined = constant(mean_x, var_x) & constant(mean_y, var_y)
    safe = torch.where(undefined, torch.ones_like(denom), denom)
    return torch.where(undefined, torch.zeros_like(cov), 2.0 * cov / safe)


__all__ = ["CONSTANT_RELATIVE_VARIANCE", "ccc", "constant", "correlation_from_moments",
           "pearson", "weighted_moments"]
