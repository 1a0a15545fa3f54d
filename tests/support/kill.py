"""A callback that kills its own process with SIGKILL at a chosen point of a fit."""

from __future__ import annotations

import os
import signal

from lightning.pytorch import Callback


class KillAt(Callback):
    """SIGKILLs the process at ``hook`` of epoch ``epoch`` (after ``batch`` for batch hooks).

    Args:
        hook: ``"train_batch_end"`` (mid-epoch) or ``"validation_end"`` (after validation,
            before the epoch's checkpoints are written).
        epoch: the epoch to die in.
        batch: the training batch after which to die (``train_batch_end`` only).
    """

    def __init__(self, hook: str, epoch: int, batch: int = 0) -> None:
        self.hook, self.epoch, self.batch = hook, epoch, batch

    def _die(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.hook == "train_batch_end" and trainer.current_epoch == self.epoch \
                and batch_idx == self.batch:
            self._die()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.hook == "validation_end" and trainer.current_epoch == self.epoch \
                and not trainer.sanity_checking:
            self._die()
