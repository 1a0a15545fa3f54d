"""``emimimic fit | validate | test | predict``: LightningCLI over EMIModule and EMIDataModule."""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from emimimic.data.datamodule import EMIDataModule
from emimimic.training import EMA, EMIModule, SubmissionWriter

EVAL_SUBCOMMANDS = ("validate", "test", "predict")


class EMISaveConfig(SaveConfigCallback):
    """Saves the resolved config beside the run's logs.

    W&B runs share one ``save_dir``, so the stock callback would find the previous run's config
    there and abort (or overwrite it); each W&B run gets ``{save_dir}/configs/{run id}.yaml``.
    """

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        logger = trainer.logger
        if self.already_saved or not isinstance(logger, WandbLogger):
            super().setup(trainer, pl_module, stage)
            return
        if trainer.is_global_zero:
            config_dir = os.path.join(logger.save_dir or ".", "configs")
            os.makedirs(config_dir, exist_ok=True)
            path = os.path.join(config_dir, f"{logger.version}.yaml")
            self.parser.save(self.config, path, skip_none=False, overwrite=True)
            logger.log_hyperparams({"config": self.parser.dump(self.config, skip_none=False)})
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)


class EMICLI(LightningCLI):
    """LightningCLI with EMI's callbacks and ``--ckpt_path best`` usable in a fresh process."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("data.dims", "model.dims", apply_on="instantiate")
        parser.link_arguments("data.targets", "model.targets", apply_on="instantiate")
        parser.add_lightning_class_args(EMA, "ema")
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.add_lightning_class_args(SubmissionWriter, "submission")
        parser.set_defaults(
            {
                "early_stopping.monitor": EMIModule.monitor,
                "early_stopping.mode": EMIModule.mode,
                "early_stopping.patience": 8,
                "checkpoint.monitor": EMIModule.monitor,
                "checkpoint.mode": EMIModule.mode,
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-epoch{epoch:03d}",
                "checkpoint.auto_insert_metric_name": False,
                "lr_monitor.logging_interval": "epoch",
            }
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        root = config.trainer.default_root_dir or os.getcwd()
        if config.checkpoint.dirpath is None:
            # A fixed folder (not the logger's version_N) so a later process finds the checkpoints.
            config.checkpoint.dirpath = os.path.join(root, "checkpoints")
        if config.trainer.logger in (None, True):
            config.trainer.logger = {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": root, "name": "logs"},
            }

    def _resolve_best(self) -> None:
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") != "best":
            return
        best = best_checkpoint(self.config[self.subcommand].checkpoint.dirpath)
        rank_zero_info(f"--ckpt_path best resolved to {best}")
        config["ckpt_path"] = best

    def before_fit(self) -> None:
        dirpath = self.config[self.subcommand].checkpoint.dirpath
        if self.config_init[self.subcommand].get("ckpt_path") is None and _has_checkpoints(dirpath):
            # A second fit would add versioned files beside the first run's and leave
            # last.ckpt (and so --ckpt_path best) pointing at a mix of the two runs.
            raise FileExistsError(
                f"{dirpath} already holds checkpoints of an earlier fit. Resume it with "
                "--ckpt_path last, or start a new run with --trainer.default_root_dir NEW_DIR"
            )

    def before_validate(self) -> None:
        self._resolve_best()

    def before_test(self) -> None:
        self._resolve_best()

    def before_predict(self) -> None:
        self._resolve_best()


def _has_checkpoints(dirpath: str) -> bool:
    return os.path.isdir(dirpath) and any(f.endswith(".ckpt") for f in os.listdir(dirpath))


def best_checkpoint(dirpath: str) -> str:
    """Returns the best checkpoint recorded in ``{dirpath}/last.ckpt`` by ModelCheckpoint.

    Lightning resolves ``ckpt_path="best"`` only inside the process that ran ``fit``; the
    ``last.ckpt`` written with ``save_last`` carries the callback's state, best path included.
    """
    last = os.path.join(dirpath, "last.ckpt")
    if not os.path.isfile(last):
        raise FileNotFoundError(
            f"--ckpt_path best: no {last}. Run `emimimic fit` with the same config first, or pass "
            "--ckpt_path PATH/TO/FILE.ckpt"
        )
    state = torch.load(last, map_location="cpu", weights_only=True)
    for key, value in state.get("callbacks", {}).items():
        if key.startswith("ModelCheckpoint") and value.get("best_model_path"):
            best = value["best_model_path"]
            if not os.path.isfile(best):
                # The run folder may have moved since fit: look beside last.ckpt.
                moved = os.path.join(dirpath, os.path.basename(best))
                if not os.path.isfile(moved):
                    raise FileNotFoundError(f"{last} names {best} as best, but it does not exist")
                best = moved
            return best
    raise ValueError(f"{last} records no best checkpoint (was a metric monitored during fit?)")


def cli_main(args: list[str] | None = None, run: bool = True) -> EMICLI:
    """Runs (or, with ``run=False``, only builds) the EMI LightningCLI on ``args``."""
    return EMICLI(
        EMIModule,
        EMIDataModule,
        args=args,
        run=run,
        save_config_callback=EMISaveConfig,
        trainer_defaults={"use_distributed_sampler": False},
        parser_kwargs={"default_env": False},
    )


__all__ = ["EMICLI", "EMISaveConfig", "best_checkpoint", "cli_main"]
