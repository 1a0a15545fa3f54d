"""Per-target Pearson logging and the run's story on the console."""

from __future__ import annotations

import warnings
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.trainer.states import TrainerFn

from emimimic.training.metrics import EMIPearson, pearson_dict
from emimimic.training.module import StepPredictions


class TargetPearson(Callback):
    """Logs each target's whole-split Pearson r and tells the run's story on the console.

    * logs ``{stage}/pearson/<target>`` for validation and test (the module logs the mean,
      ``val/pearson``, which early stopping and checkpointing follow);
    * keeps every fit epoch's scores (:attr:`history`, in checkpoints too, so a resumed run
      remembers them);
    * at the end of fit prints the best epoch, its mean and per-target Pearson and the best
      checkpoint, and one line when early stopping ended the run; ``validate`` and ``test``
      print the same table.
    """

    def __init__(self) -> None:
        self.history: dict[int, dict[str, float]] = {}
        self._metric: EMIPearson | None = None

    def _start(self, pl_module: LightningModule) -> None:
        targets = list(pl_module.targets)
        self._metric = EMIPearson(len(targets), targets).to(pl_module.device)

    def _update(self, outputs: Any) -> None:
        if self._metric is None or not isinstance(outputs, StepPredictions):
            return
        self._metric.update(outputs.pred, outputs.target)

    def _finish(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> dict[str, float]:
        with warnings.catch_warnings():  # the module's own metric has warned already
            warnings.simplefilter("ignore", UserWarning)
            r = self._metric.compute()
        values = pearson_dict(r, pl_module.targets, prefix=f"{stage}/pearson")
        pl_module.log_dict({k: v for k, v in values.items() if k != f"{stage}/pearson"})
        return {k: float(v) for k, v in values.items()}

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(pl_module)

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(pl_module)

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update(outputs)

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                          batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update(outputs)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        values = self._finish(trainer, pl_module, "val")
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self.history[int(trainer.current_epoch)] = values
        elif trainer.state.fn == TrainerFn.VALIDATING:
            self._print(trainer, "validation", values)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._print(trainer, "test", self._finish(trainer, pl_module, "test"))

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        for callback in trainer.callbacks:
            if isinstance(callback, EarlyStopping) and callback.stopped_epoch > 0:
                print(f"early stopping at epoch {callback.stopped_epoch}: {callback.monitor} did "
                      f"not improve for {callback.patience} epochs "
                      f"(best {float(callback.best_score):.4f})")
        if not self.history:
            return
        best = max(self.history, key=lambda e: self.history[e]["val/pearson"])
        where = getattr(trainer.checkpoint_callback, "best_model_path", "") or "not saved"
        self._print(trainer, f"best epoch {best} of {len(self.history)}", self.history[best])
        print(f"best checkpoint: {where}")

    @staticmethod
    def _print(trainer: Trainer, title: str, values: dict[str, float]) -> None:
        if not trainer.is_global_zero:
            return
        mean_key = next(k for k in values if k.count("/") == 1)
        width = max(len(k.split("/")[-1]) for k in values)
        lines = [f"{title}: {mean_key} {values[mean_key]:.4f}"]
        lines += [f"  {k.split('/')[-1]:<{width}}  {v:.4f}" for k, v in values.items()
                  if k != mean_key]
        print("\n".join(lines))

    def state_dict(self) -> dict[str, Any]:
        return {"history": {str(e): v for e, v in self.history.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {int(e): v for e, v in state_dict.get("history", {}).items()}
