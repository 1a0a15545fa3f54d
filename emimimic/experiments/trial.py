"""The trial's side of a search: a callback that reports each epoch's score and stops on request.

``emimimic tune`` runs each trial as an ``emimimic fit`` process with this callback. After every
validation it appends ``{"epoch", "value"}`` to ``FOLDER/epochs.jsonl``; the search reads the
file, reports to Optuna and, when the pruner says so, writes ``FOLDER/STOP``, which ends the fit
after that epoch. The fit also ends when the search process that started it is gone. It needs
no Optuna: the search is the only process that talks to the study.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer

from emimimic.experiments.runs import EPOCHS, STOP


class TrialReporter(Callback):
    """Writes each validation's score to ``folder/epochs.jsonl``; stops when asked.

    Args:
        folder: the trial's run folder.
        monitor: the score reported (``val/pearson``).
        parent: the process id of the search; when it is gone the fit stops (0: not watched).
    """

    def __init__(self, folder: str, monitor: str = "val/pearson", parent: int = 0) -> None:
        self.folder = Path(folder)
        self.monitor = monitor
        self.parent = parent

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        stop = False
        if trainer.is_global_zero:
            value = trainer.callback_metrics.get(self.monitor)
            if value is not None:
                with open(self.folder / EPOCHS, "a") as f:
                    f.write(json.dumps({"epoch": int(trainer.current_epoch),
                                        "value": float(value)}) + "\n")
            orphaned = self.parent and os.getppid() != self.parent
            stop = (self.folder / STOP).is_file() or bool(orphaned)
        if trainer.strategy.broadcast(stop, src=0):
            trainer.should_stop = True


__all__ = ["EPOCHS", "STOP", "TrialReporter"]
