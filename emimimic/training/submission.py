"""Writing predictions as an ABAW challenge submission."""

from __future__ import annotations

import csv
import io
import os
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from emimimic.constants import ID_COLUMN
from emimimic.errors import UserError
from emimimic.files import write_atomic
from emimimic.training.module import StepPredictions


class SubmissionWriter(BasePredictionWriter):
    """Writes predictions as an ABAW submission CSV: the label files' header, one row per clip.

    Rows are sorted by clip id; values are the module's predictions in [0, 1]. Under DDP every
    rank sends its rows to rank 0, which writes the file once and refuses duplicated or missing
    clips. An existing file is never overwritten unless ``overwrite`` is set.

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
            raise UserError(
                f"{path} already exists; move it away or pass --submission.overwrite true"
            )
        self._ids, self._preds = [], []

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: StepPredictions,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._ids.extend(prediction.ids)
        self._preds.append(prediction.pred.detach().float().cpu())

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        targets = list(getattr(pl_module, "targets", None) or trainer.datamodule.targets)
        preds = torch.cat(self._preds) if self._preds else torch.empty(0, len(targets))
        rows = list(zip(self._ids, preds.tolist(), strict=True))  # clamped by predict_step
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
        write_submission(path, targets, rows)
        print(f"wrote {len(rows)} predictions to {path}")


def write_submission(path: str | os.PathLike[str], targets: list[str],
                     rows: list[tuple[str, list[float]]]) -> None:
    """Writes an ABAW submission CSV atomically: the label files' header, rows sorted by id."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([ID_COLUMN, *targets])
    for clip, values in sorted(rows):
        writer.writerow([clip, *(f"{v:.6f}" for v in values)])
    write_atomic(path, buf.getvalue())


def _expected_ids(trainer: Trainer) -> list[str] | None:
    """Returns the ids of the predict split when the data module can tell them."""
    datamodule = getattr(trainer, "datamodule", None)
    ids = getattr(datamodule, "predict_ids", None)
    return list(ids) if ids is not None else None
