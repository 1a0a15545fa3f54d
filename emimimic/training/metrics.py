"""Challenge metric: per-target Pearson's r over a whole split, robust to constant columns."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from emimimic import constants
from emimimic.training.correlation import constant, correlation_from_moments


class EMIPearson(Metric):
    """Per-target Pearson's r accumulated over a whole split (DDP-syncable).

    The states are float64 sums (n, Σx, Σy, Σx², Σy², Σxy per target), which a DDP sync adds up
    exactly; in float64 the raw moments of values in [0, 1] over any realistic split lose nothing
    that matters. Inputs are cast to float32 first (fp16/bf16 predictions lose 1e-3 to 1e-2 of r).
    ``compute()`` returns a ``[K]`` tensor; a target whose prediction or label column is constant
    over the split (or that has fewer than two clips) gets ``r = 0`` and a warning naming it,
    never NaN. Written here rather than taken from torchmetrics' ``PearsonCorrCoef`` because that
    one NaNs valid sparse columns and does not catch float32 rounding noise of a constant column.

    Args:
        num_targets: Number of targets ``K``.
        target_names: Names used in warnings (default: ``target <k>``).
        kwargs: Passed to :class:`torchmetrics.Metric`.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_targets: int = 6, target_names: Sequence[str] | None = None,
                 **kwargs: Any) -> None:
        if num_targets < 1:
            raise ValueError(f"num_targets must be >= 1, got {num_targets}")
        super().__init__(**kwargs)
        self.num_targets = num_targets
        self.target_names = constants.target_names(num_targets, target_names)
        for name in ("n", "sx", "sy", "sxx", "syy", "sxy"):
            self.add_state(name, torch.zeros(num_targets, dtype=torch.float64),
                           dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Accumulates a batch of predictions and targets ``[B, K]``."""
        if preds.ndim == 1 and self.num_targets == 1:
            preds, target = preds.unsqueeze(1), target.unsqueeze(1)
        if preds.shape != target.shape or preds.ndim != 2 or preds.shape[1] != self.num_targets:
            raise ValueError(
                f"EMIPearson expects preds and target of shape [B, {self.num_targets}], got "
                f"{tuple(preds.shape)} and {tuple(target.shape)}"
            )
        x = preds.detach().float().double()
        y = target.detach().float().double()
        self.n += x.shape[0]
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.sxx += (x * x).sum(0)
        self.syy += (y * y).sum(0)
        self.sxy += (x * y).sum(0)

    def compute(self) -> Tensor:
        """Returns Pearson's r per target ``[K]`` over all accumulated clips (0 where undefined)."""
        n = self.n.clamp_min(1.0)
        mean_x, mean_y = self.sx / n, self.sy / n
        var_x = (self.sxx / n - mean_x * mean_x).clamp_min(0.0)
        var_y = (self.syy / n - mean_y * mean_y).clamp_min(0.0)
        r, undefined = correlation_from_moments(mean_x, mean_y, var_x, var_y,
                                                self.sxy / n - mean_x * mean_y)
        const_x, const_y = constant(mean_x, var_x), constant(mean_y, var_y)
        undefined = undefined | (self.n < 2)
        r = torch.where(undefined, torch.zeros_like(r), r)
        for k in torch.nonzero(undefined).flatten().tolist():
            if self.n[k] < 2:
                why = f"only {int(self.n[k])} clip(s) were accumulated"
            else:
                which = " and ".join(name for name, flag in
                                     (("prediction", const_x[k]), ("label", const_y[k])) if flag)
                why = f"its {which} column is constant over {int(self.n[k])} clips"
            warnings.warn(f"EMIPearson: Pearson r of {self.target_names[k]!r} is undefined "
                          f"({why}); reported as 0", UserWarning, stacklevel=2)
        return r.float()


def pearson_dict(r: Tensor, target_names: Sequence[str], prefix: str = "pearson"
                 ) -> dict[str, Tensor]:
    """Returns ``{prefix: mean r, f"{prefix}/{name}": r_k}`` for logging.

    Args:
        r: Per-target correlations ``[K]`` (e.g. from :meth:`EMIPearson.compute`).
        target_names: The ``K`` target names, in column order.
        prefix: Key of the mean and prefix of the per-target keys.
    """
    r = r.reshape(-1)
    if r.numel() != len(target_names):
        raise ValueError(
            f"pearson_dict: {r.numel()} correlations but {len(target_names)} target names"
        )
    out = {prefix: r.mean()}
    out.update({f"{prefix}/{name}": r[k] for k, name in enumerate(target_names)})
    return out
