"""Challenge metric: per-target Pearson's r over a whole split, robust to constant columns."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics.regression import PearsonCorrCoef
from torchmetrics.regression.pearson import _final_aggregation

#: A column counts as constant when its variance is at most this fraction of its mean square,
#: i.e. its spread is below ~1e-5 of its magnitude (~100 float32 ulps): float32 rounding noise
#: of a constant column sits many orders of magnitude below this, real predictions far above.
CONSTANT_RELATIVE_VARIANCE: float = 1e-10


class EMIPearson(PearsonCorrCoef):
    """Per-target Pearson's r accumulated over a whole split (DDP-syncable torchmetrics states).

    Inputs are cast to float32 (fp16/bf16 predictions lose 1e-3 to 1e-2 of r otherwise).
    ``compute()`` returns a ``[K]`` tensor; a target whose prediction or label column is constant
    over the split (or that has fewer than two clips) gets ``r = 0`` and a warning naming it,
    never NaN.

    States and update are torchmetrics' own; ``compute`` is hand-written because torchmetrics
    NaNs columns whose variance is small relative to their largest deviation (a valid column with
    one outlier in thousands) and does not catch float32 rounding noise of a constant column.

    Args:
        num_targets: Number of targets ``K``.
        target_names: Names used in warnings (default: ``target <k>``).
        kwargs: Passed to :class:`torchmetrics.Metric`.
    """

    def __init__(
        self,
        num_targets: int = 6,
        target_names: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        if num_targets < 1:
            raise ValueError(f"num_targets must be >= 1, got {num_targets}")
        if target_names is not None and len(target_names) != num_targets:
            raise ValueError(
                f"target_names has {len(target_names)} names, expected num_targets={num_targets}"
            )
        super().__init__(num_outputs=num_targets, **kwargs)
        self.num_targets = num_targets
        self.target_names = (
            list(target_names)
            if target_names is not None
            else [f"target {k}" for k in range(num_targets)]
        )

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Accumulates a batch of predictions and targets ``[B, K]`` (cast to float32)."""
        preds = preds.detach().float()
        target = target.detach().float()
        if preds.ndim == 1 and self.num_targets == 1:
            preds, target = preds.unsqueeze(1), target.unsqueeze(1)
        if preds.shape != target.shape or preds.ndim != 2 or preds.shape[1] != self.num_targets:
            raise ValueError(
                f"EMIPearson expects preds and target of shape [B, {self.num_targets}], got "
                f"{tuple(preds.shape)} and {tuple(target.shape)}"
            )
        if preds.shape[0] == 0:
            return
        super().update(preds, target)

    def compute(self) -> Tensor:
        """Returns Pearson's r per target ``[K]`` over all accumulated clips (0 where undefined)."""
        if self.mean_x.ndim > 1:
            # After a DDP sync each state is stacked per process: merge them (Chan et al.).
            mean_x, mean_y, _, _, var_x, var_y, corr_xy, n = _final_aggregation(
                self.mean_x,
                self.mean_y,
                self.max_abs_dev_x,
                self.max_abs_dev_y,
                self.var_x,
                self.var_y,
                self.corr_xy,
                self.n_total,
            )
        else:
            mean_x, mean_y = self.mean_x, self.mean_y
            var_x, var_y, corr_xy, n = self.var_x, self.var_y, self.corr_xy, self.n_total
        # var_x / var_y / corr_xy are sums of (co)deviations; the 1/(n-1) factors cancel in r.
        n_safe = n.clamp_min(1.0)
        const_x = self._constant(var_x / n_safe, mean_x)
        const_y = self._constant(var_y / n_safe, mean_y)
        undefined = const_x | const_y | (n < 2)
        denom = torch.sqrt(torch.where(undefined, torch.ones_like(var_x), var_x * var_y))
        r = torch.where(undefined, torch.zeros_like(corr_xy), corr_xy / denom).clamp(-1.0, 1.0)
        for k in torch.nonzero(undefined).flatten().tolist():
            if n[k] < 2:
                why = f"only {int(n[k])} clip(s) were accumulated"
            else:
                which = " and ".join(
                    name
                    for name, flag in (("prediction", const_x[k]), ("label", const_y[k]))
                    if flag
                )
                why = f"its {which} column is constant over {int(n[k])} clips"
            warnings.warn(
                f"EMIPearson: Pearson r of {self.target_names[k]!r} is undefined ({why}); "
                "reported as 0",
                UserWarning,
                stacklevel=2,
            )
        return r

    @staticmethod
    def _constant(variance: Tensor, mean: Tensor) -> Tensor:
        """Returns True where a column's variance is negligible next to its mean square."""
        return variance <= CONSTANT_RELATIVE_VARIANCE * (mean * mean + variance)


def pearson_dict(
    r: Tensor, target_names: Sequence[str], prefix: str = "pearson"
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
