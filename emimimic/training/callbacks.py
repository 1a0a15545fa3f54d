"""Lightning callbacks for EMI runs: EMA weights that every evaluation uses, a ``last.ckpt``
written every epoch, per-epoch seeds that make a resumed run repeat the uninterrupted one, and
:func:`default_callbacks`, the one list of standard callbacks that the CLI and notebooks use."""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import (
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    WeightAveraging,
)
from lightning.pytorch.trainer.states import TrainerFn

from emimimic.contract import FeatureBatch
from emimimic.data.samplers import epoch_seed, run_seed
from emimimic.training.metrics import EMIPearson


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

    def __call__(self, averaged: list[torch.Tensor], current: list[torch.Tensor],
                 num_averaged: torch.Tensor) -> None:
        """Updates ``averaged`` in place, tensors of one device and dtype in one foreach kernel.

        (``AveragedModel``'s ``multi_avg_fn``: a loop of ``avg * d + current * (1 - d)`` over the
        paper model's 61 tensors took 5.6 ms a step on two CPU cores, this 0.2 ms.)
        """
        d = self.rate(int(num_averaged))
        if averaged[0].is_floating_point():
            torch._foreach_lerp_(averaged, current, 1.0 - d)
        else:  # integer buffers (counters) are not averaged: they follow the model
            torch._foreach_copy_(averaged, current)


class EMA(WeightAveraging):
    """An exponential moving average of the weights, updated after every optimizer step.

    Built on Lightning's ``WeightAveraging``: validation (and so early stopping and checkpoint
    selection) sees the EMA weights, checkpoints store them as ``state_dict`` (the raw ones beside
    them), and the model holds them after ``fit``. Two differences from Lightning's
    ``EMAWeightAveraging``: ``validate``/``test``/``predict`` with a ``ckpt_path`` in the same
    process after ``fit`` keep the checkpoint's EMA weights (the stock callback reloads the raw
    ones and swaps in the stale average), and the decay can warm up for short runs.

    Args:
        decay: EMA decay per optimizer step (the paper: 0.999).
        warmup: ramp the decay as ``min(decay, (1 + t) / (10 + t))``; use it for runs of fewer
            than a few thousand steps, where a fixed 0.999 averages in the untrained start.
        score_raw: also score the raw (non-EMA) weights at every validation of fit and log their
            mean Pearson as ``val/pearson_raw`` (one more forward pass per validation batch). On
            short runs a 0.999 EMA lags the raw weights, and this shows by how much.
    """

    def __init__(self, decay: float = 0.999, warmup: bool = False,
                 score_raw: bool = False) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        super().__init__(use_buffers=True, multi_avg_fn=_EMADecay(decay, warmup))
        self.decay = decay
        self.warmup = warmup
        self.score_raw = score_raw
        self._raw: tuple[torch.nn.Module, EMIPearson] | None = None

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """Returns True after every optimizer step (and never at epoch ends)."""
        return step_idx is not None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            for callback in trainer.checkpoint_callbacks:
                if getattr(callback, "save_weights_only", False):
                    # Lightning skips callbacks' checkpoint hooks for weights-only files, so they
                    # would hold the raw weights while the run selects them by EMA validation.
                    raise ValueError(
                        "ModelCheckpoint(save_weights_only=True) would save the raw weights, not "
                        "the EMA weights the run validates; set --checkpoint.save_weights_only "
                        "false"
                    )
        super().setup(trainer, pl_module, stage)

    # Outside fit the module already holds the weights to use (the EMA ones, from fit or from the
    # checkpoint's state_dict): an average left from an earlier fit in this process is stale.
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return
        if self.score_raw and not trainer.sanity_checking:
            # the module still holds the raw weights: keep a copy before the EMA ones come in
            raw = copy.deepcopy(pl_module.net).eval()
            targets = list(pl_module.targets)
            self._raw = (raw, EMIPearson(len(targets), targets).to(pl_module.device))
        super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._raw is not None and isinstance(batch, FeatureBatch):
            net, metric = self._raw
            with torch.no_grad():
                metric.update(net(batch).pred.float(), batch.target.float())

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return
        if self._raw is not None:
            with warnings.catch_warnings():  # constant columns: the module's metric warns
                warnings.simplefilter("ignore", UserWarning)
                pl_module.log("val/pearson_raw", self._raw[1].compute().mean())
            self._raw = None
        super().on_validation_epoch_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)


class LastCheckpoint(ModelCheckpoint):
    """Writes ``{dirpath}/last.ckpt`` at the end of every epoch, whatever the monitored metric did.

    ``ModelCheckpoint(save_last=True)`` rewrites ``last.ckpt`` only when it also saves a top-k
    checkpoint, so a run that stopped improving would resume epochs it already did. Put it after
    the best-checkpoint callback, so its file records that callback's latest state.

    Args:
        dirpath: the run's checkpoint folder.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        super().__init__(dirpath=dirpath, filename=self.CHECKPOINT_NAME_LAST, monitor=None,
                         save_top_k=1, every_n_epochs=1, enable_version_counter=False)


class EpochSeed(Callback):
    """Seeds torch's global generator at the start of every training epoch from (seed, epoch).

    Lightning does not checkpoint random states, so without this a run resumed from
    ``last.ckpt`` would draw other dropout masks than the uninterrupted run; with it, each
    epoch's randomness depends on the run's seed and the epoch alone (the training loader
    shuffles the same way, :class:`~emimimic.data.samplers.EpochShuffle`).
    """

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        torch.manual_seed(epoch_seed(run_seed(), trainer.current_epoch, offset=1))


def standard_callbacks() -> dict[str, tuple[type[Callback], dict[str, Any]]]:
    """Returns the standard callbacks of a run: name -> (class, default arguments), in order.

    The names are the CLI's sections (``--ema.decay``, ``--early_stopping.patience``,
    ``--report null`` ...). The order matters: the per-target report and the epoch seeds come
    before the EMA, and the checkpoints (which Lightning runs last anyway) after everything
    whose state they save.
    """
    from emimimic.training.dashboard import WandbDashboard
    from emimimic.training.module import EMIModule
    from emimimic.training.report import TargetPearson
    from emimimic.training.submission import SubmissionWriter

    watch = {"monitor": EMIModule.monitor, "mode": EMIModule.mode}
    return {
        "report": (TargetPearson, {}),
        "epoch_seed": (EpochSeed, {}),
        "dashboard": (WandbDashboard, {}),
        "ema": (EMA, {"decay": 0.999}),
        "early_stopping": (EarlyStopping, {**watch, "patience": 8}),
        "lr_monitor": (LearningRateMonitor, {"logging_interval": "epoch"}),
        "submission": (SubmissionWriter, {}),
        "checkpoint": (ModelCheckpoint, {**watch, "filename": "best-epoch{epoch:03d}",
                                         "auto_insert_metric_name": False}),
        "last_checkpoint": (LastCheckpoint, {}),
    }


def default_callbacks(root_dir: str | os.PathLike[str] | None = None,
                      **given: Callback | None) -> list[Callback]:
    """Returns emimimic's standard callbacks, as ``emimimic fit`` runs them.

    They are, in order: ``report`` (:class:`~emimimic.training.report.TargetPearson`: each
    target's Pearson, the end-of-fit summary), ``epoch_seed`` (:class:`EpochSeed`: exact
    resume), ``dashboard`` (W&B figures when a WandbLogger is used), ``ema`` (:class:`EMA`,
    decay 0.999), ``early_stopping`` (``val/pearson``, patience 8), ``lr_monitor``,
    ``submission`` (the challenge CSV of ``predict``), ``checkpoint`` (the best by
    ``val/pearson``) and ``last_checkpoint`` (``last.ckpt`` every epoch). Use it with a plain
    Trainer so that a notebook's run has what a CLI run has::

        trainer = Trainer(callbacks=default_callbacks("runs/nb", ema=EMA(0.999, warmup=True)))

    Args:
        root_dir: the run's folder: both checkpoint callbacks write to ``root_dir/checkpoints``
            unless they were given a ``dirpath`` (default: the working directory).
        given: a callback by name (above) to use instead of the default one, or None to leave
            it out.

    Raises:
        TypeError: a name that is not a standard callback.
    """
    from emimimic.noise import quiet_dependencies

    quiet_dependencies()  # a notebook's Trainer gets the CLI's quiet console too
    table = standard_callbacks()
    unknown = sorted(set(given) - set(table))
    if unknown:
        raise TypeError(f"default_callbacks: unknown callbacks {unknown}; the standard ones are "
                        f"{list(table)}")
    folder = os.path.join(os.fspath(root_dir) if root_dir is not None else os.getcwd(),
                          "checkpoints")
    out: list[Callback] = []
    for name, (cls, kwargs) in table.items():
        callback = given[name] if name in given else cls(**kwargs)
        if callback is None:
            continue
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
            # a fixed folder (not the logger's version_N), so a later process finds them
            callback.dirpath = os.path.realpath(folder)
        out.append(callback)
    best = [c for c in out if type(c) is ModelCheckpoint]
    for last in (c for c in out if isinstance(c, LastCheckpoint)):
        if best and last.dirpath != best[0].dirpath:
            last.dirpath = best[0].dirpath  # --ckpt_path best reads it from last.ckpt's folder
    return out
