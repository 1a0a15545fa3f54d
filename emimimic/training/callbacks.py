"""Lightning callbacks configured for EMI: EMA weights that every evaluation uses, and the
writer of challenge submissions."""

from __future__ import annotations

import csv
import os
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, EMAWeightAveraging
from lightning.pytorch.trainer.states import TrainerFn


class _EMADecay:
    """EMA update ``avg <- d * avg + (1 - d) * current`` with an optional warm-up of ``d``.

    With warm-up, ``d_t = min(decay, (1 + t) / (10 + t))`` where ``t`` counts the updates so far,
    so a short run is not dominated by its random initial weights.
    """

    def __init__(self, decay: float, warmup: bool) -> None:
        self.decay = decay
        self.warmup = warmup

    def rate(self, num_averaged: int) -> float:
        """Returns the decay used for the update after ``num_averaged`` earlier updates."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + num_averaged) / (10.0 + num_averaged))

    def __call__(
        self, averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor
    ) -> torch.Tensor:
        d = self.rate(int(num_averaged))
        return averaged * d + current * (1.0 - d)


class EMA(EMAWeightAveraging):
    """Lightning's EMA weight averaging, updated after every optimizer step from the first one.

    Validation (and so early stopping and checkpoint selection) sees the EMA weights, checkpoints
    store them as ``state_dict``, and the model holds them after ``fit``. Two fixes over the stock
    callback: ``validate``/``test``/``predict`` with a ``ckpt_path`` in the same process after
    ``fit`` keep the checkpoint's EMA weights (the stock callback reloads the raw ones and swaps
    in the stale average), and the decay can warm up for short runs.

    Args:
        decay: EMA decay per optimizer step (the paper: 0.999).
        warmup: ramp the decay as ``min(decay, (1 + t) / (10 + t))``; use it for runs of fewer
            than a few thousand steps, where a fixed 0.999 averages in the untrained start.
    """

    def __init__(self, decay: float = 0.999, warmup: bool = False) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        super().__init__(decay=decay)
        self.decay = decay
        self.warmup = warmup
        self.avg_fn = _EMADecay(decay, warmup)
        self._kwargs["avg_fn"] = self.avg_fn

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            # Outside fit the module already holds the weights to use (EMA ones from fit or from
            # the checkpoint's state_dict); an average left over from an earlier fit is stale.
            self._average_model = None
            return
        for callback in trainer.checkpoint_callbacks:
            if getattr(callback, "save_weights_only", False):
                # Lightning skips callbacks' checkpoint hooks for weights-only files, so they
                # would hold the raw weights while the run selects them by EMA validation.
                raise ValueError(
                    "ModelCheckpoint(save_weights_only=True) would save the raw weights, not the "
                    "EMA weights the run validates; set --checkpoint.save_weights_only false"
                )
        super().setup(trainer, pl_module, stage)

    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return  # state_dict holds the EMA weights, which is what evaluation must use
        super().on_load_checkpoint(trainer, pl_module, checkpoint)


class SubmissionWriter(BasePredictionWriter):
    """Writes predictions as an ABAW submission CSV: the label files' header, one row per clip.

    Rows are sorted by clip id and values clipped to [0, 1]. Under DDP every rank sends its rows
    to rank 0, which writes the file once and refuses duplicated or missing clips. An existing
    file is never overwritten unless ``overwrite`` is set.

    Args:
        path: output CSV; default ``{trainer.default_root_dir}/submission.csv``.
        overwrite: replace an existing file at ``path``.
    """

    def __init__(self, path: str | None = None, overwrite: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.path = path
        self.overwrite = overwrite
        self._ids: list[str] = []
        self._preds: list[torch.Tensor] = []

    def resolved_path(self, trainer: Trainer) -> str:
        """Returns the CSV path this writer uses for ``trainer``."""
        return self.path or os.path.join(trainer.default_root_dir, "submission.csv")

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        path = self.resolved_path(trainer)
        if os.path.exists(path) and not self.overwrite:
            raise FileExistsError(
                f"{path} already exists; move it away or pass --submission.overwrite true"
            )
        self._ids, self._preds = [], []

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: dict[str, Any],
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._ids.extend(prediction["ids"])
        self._preds.append(prediction["pred"].detach().float().cpu())

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        targets = list(getattr(pl_module, "targets", None) or trainer.datamodule.targets)
        preds = torch.cat(self._preds) if self._preds else torch.empty(0, len(targets))
        rows = list(zip(self._ids, preds.clamp(0.0, 1.0).tolist(), strict=True))
        if trainer.world_size > 1:
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
        if trainer.is_global_zero:
            self._write(self.resolved_path(trainer), targets, rows, trainer)
        self._ids, self._preds = [], []

    def _write(
        self, path: str, targets: list[str], rows: list[tuple[str, list[float]]], trainer: Trainer
    ) -> None:
        ids = [clip for clip, _ in rows]
        if len(set(ids)) != len(ids):
            dupes = sorted({c for c in ids if ids.count(c) > 1})[:5]
            raise RuntimeError(
                f"predictions for clips {dupes} arrived more than once; not writing {path}"
            )
        expected = _expected_ids(trainer)
        if expected is not None and set(expected) != set(ids):
            missing = sorted(set(expected) - set(ids))[:5]
            raise RuntimeError(f"no prediction for clips {missing}; not writing {path}")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.partial"
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["Filename", *targets])
            for clip, values in sorted(rows):
                writer.writerow([clip, *(f"{v:.6f}" for v in values)])
        os.replace(tmp, path)
        print(f"wrote {len(rows)} predictions to {path}")


def _expected_ids(trainer: Trainer) -> list[str] | None:
    """Returns the ids of the predict split when the data module can tell them."""
    datamodule = getattr(trainer, "datamodule", None)
    ids = getattr(datamodule, "predict_ids", None)
    return list(ids) if ids is not None else None
