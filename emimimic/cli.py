"""``emimimic fit | validate | test | predict``: LightningCLI over EMIModule and EMIDataModule."""

from __future__ import annotations

import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from jsonargparse import lazy_instance
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from emimimic.data.datamodule import EMIDataModule
from emimimic.errors import UserError
from emimimic.experiments.runs import fit_config
from emimimic.hardware import auto_precision
from emimimic.noise import quiet_dependencies
from emimimic.training.callbacks import default_callbacks, standard_callbacks
from emimimic.training.checkpoints import (
    adopt_checkpoint_model,
    best_checkpoint,
    check_data_fits,
    checkpoint_epoch,
    checkpoint_hparams,
    command_line_keys,
    metrics_rows_until,
    resolve_checkpoint,
)
from emimimic.training.module import EMIModule


class EMISaveConfig(SaveConfigCallback):
    """Saves the resolved config beside the run's logs.

    W&B runs share one ``save_dir``, so the stock callback would find the previous run's config
    there and abort (or overwrite it); each W&B run gets ``{save_dir}/configs/{run id}.yaml``.
    """

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        logger = next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
        if self.already_saved or logger is None:
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


def _lazy_callbacks() -> dict[str, tuple[type, Any]]:
    """Returns ``{name: (class, lazy default instance)}`` of the standard callbacks.

    ``jsonargparse.lazy_instance`` looks up its caller with ``inspect.stack()``, which reads the
    source of every frame above it: inside LightningCLI's parser set-up (9 callbacks, 4
    subcommands) that cost about 1 s of every command's start. The instances are made in a
    short-lived thread, whose stack is a few frames deep; they are the same objects.
    """
    made: dict[str, tuple[type, Any]] = {}
    failed: list[BaseException] = []

    def make() -> None:
        try:
            for name, (cls, kwargs) in standard_callbacks().items():
                made[name] = (cls, lazy_instance(cls, **kwargs))
        except BaseException as err:  # raised again in the caller's thread
            failed.append(err)

    thread = threading.Thread(target=make, name="emimimic-lazy-callbacks")
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return made


class EMICLI(LightningCLI):
    """LightningCLI with EMI's callbacks, checkpoints that decide the model, and exact resume.

    * ``--ckpt_path best|last|FILE`` works in a fresh process; ``validate``, ``test`` and
      ``predict`` refuse to run without one unless ``--allow_untrained true``;
    * with a checkpoint, the model's structure (network and loss options, served modalities)
      comes from its hyper-parameters; a conflicting explicit option is refused;
    * ``last.ckpt`` is written every epoch and ``fit --ckpt_path last`` continues the same
      metrics log (``{root}/logs/fit/metrics.csv``) without repeating the epochs it redoes.
    """

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("data.dims", "model.dims", apply_on="instantiate")
        parser.link_arguments("data.targets", "model.targets", apply_on="instantiate")
        # the standard callbacks, one section each (``--ema.decay 0.99``, ``--dashboard null``)
        for name, (cls, default) in _lazy_callbacks().items():
            parser.add_argument(f"--{name}", type=Optional[cls],  # noqa: UP045 (jsonargparse)
                                default=default,
                                help=f"standard callback {cls.__name__} (null: leave it out; "
                                     "see emimimic.training.default_callbacks)")
        parser.add_argument("--allow_untrained", type=bool, default=False,
                            help="validate/test/predict without a checkpoint, on freshly "
                                 "initialised weights (their scores mean nothing)")

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parses, then lets ``--ckpt_path best|last|FILE`` decide the model (one rule for all).

        Here, before Lightning merges a checkpoint file's hyper-parameters into the config (which
        would drop a conflicting explicit option silently), the checkpoint is resolved, opened
        through the one checked loader, and its model compared with the options given.
        """
        super().parse_arguments(parser, args)
        self._checkpoint_hparams = None
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else None
        if config is None or config.get("ckpt_path") is None:
            return
        if subcommand == "fit" and config.ckpt_path == "last" and _began_without_an_epoch(config):
            print(f"--ckpt_path last: the fit that began in "
                  f"{config.trainer.default_root_dir or os.getcwd()} ended before its first "
                  "epoch did (no last.ckpt); starting it over", flush=True)
            config.ckpt_path = None
            return
        config.ckpt_path = resolve_checkpoint(config.ckpt_path, _checkpoint_dir(config))
        rank_zero_info(f"--ckpt_path: {config.ckpt_path}")
        self._checkpoint_hparams = checkpoint_hparams(config.ckpt_path)
        argv = (sys.argv[1:] if args is None
                else [str(a) for a in args] if isinstance(args, (list, tuple)) else [])
        adopt_checkpoint_model(config, self._checkpoint_hparams, config.ckpt_path,
                               command_line_keys(argv))

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        root = config.trainer.default_root_dir or os.getcwd()
        if config.trainer.precision is None and config.get("ckpt_path"):
            config.trainer.precision = _trained_precision(config.ckpt_path)
            if config.trainer.precision is not None:
                rank_zero_info(f"precision {config.trainer.precision} (trainer.precision null: "
                               "the precision the checkpoint's run was trained in)")
        if config.trainer.precision is None:
            config.trainer.precision, why = auto_precision(str(config.trainer.accelerator))
            rank_zero_info(f"precision {config.trainer.precision} (trainer.precision null: "
                           f"{why})")
        if config.data.refit and self.subcommand == "fit":
            # no validation clips: nothing to select a best epoch or to stop early on; the
            # model is last.ckpt after the fixed number of epochs
            config.early_stopping = config.checkpoint = None
            config.trainer.limit_val_batches = 0
            config.trainer.num_sanity_val_steps = 0
            rank_zero_info(f"refit on {config.data.train_split}+{config.data.val_split} for "
                           f"{config.trainer.max_epochs} epochs, no validation; the model is "
                           "last.ckpt")
        config.trainer.logger = _with_csv_logger(config.trainer.logger, root, self.subcommand)
        _name_wandb_runs(config)
        if (self.subcommand not in (None, "fit") and config.get("ckpt_path") is None
                and not config.allow_untrained):
            raise UserError(
                f"`emimimic {self.subcommand}` needs the weights to evaluate: pass --ckpt_path "
                "best|last|FILE (a checkpoint of `emimimic fit`), or --allow_untrained true "
                "to run freshly initialised weights on purpose"
            )

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        if self._checkpoint_hparams is not None and self.subcommand is not None:
            check_data_fits(self._checkpoint_hparams, self.datamodule.dims,
                            self.datamodule.targets, self.config[self.subcommand].ckpt_path)
        root = config["trainer"].get("default_root_dir") or os.getcwd()
        given = config["trainer"].get("callbacks") or []
        standard = default_callbacks(root, **{name: config[name]
                                              for name in standard_callbacks()})
        return super().instantiate_trainer(
            **kwargs, callbacks=[*(given if isinstance(given, list) else [given]), *standard])

    def before_fit(self) -> None:
        config = self.config[self.subcommand]
        if config.ckpt_path is None:
            folder = _checkpoint_dir(config)
            if _has_checkpoints(folder):
                # A second fit would add versioned files beside the first run's and leave
                # last.ckpt (and so --ckpt_path best) pointing at a mix of the two runs.
                raise UserError(
                    f"{folder} already holds checkpoints of an earlier fit. "
                    "Resume it with --ckpt_path last, or start a new run with "
                    "--trainer.default_root_dir NEW_DIR"
                )
            return
        csv_logger = next((lg for lg in self.trainer.loggers if isinstance(lg, CSVLogger)), None)
        if csv_logger is not None and self.trainer.is_global_zero:
            epoch = checkpoint_epoch(config.ckpt_path)
            old = os.path.join(csv_logger.log_dir, "metrics.csv")
            for row in metrics_rows_until(old, epoch):
                step = int(row.pop("step"))
                csv_logger.log_metrics(row, step)

    def _one_table(self) -> None:
        # the report callback prints the per-target table; Lightning's would repeat it
        self.config_init[self.subcommand]["verbose"] = False

    before_validate = before_test = _one_table


def _trained_precision(ckpt_path: str) -> str | None:
    """Returns the precision the run of a checkpoint was trained in, as its saved fit config
    gives it; None where unknown."""
    precision = ((fit_config(ckpt_path) or {}).get("trainer") or {}).get("precision")
    return str(precision) if precision is not None else None


def _with_csv_logger(logger: Any, root: str, subcommand: str) -> Any:
    """Returns the logger config with a CSV logger in ``{root}/logs/{subcommand}`` first."""
    csv_logger = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                  "init_args": {"save_dir": root, "name": "logs", "version": subcommand}}
    if logger in (None, True):
        return csv_logger
    if logger is False:
        return False
    loggers = list(logger) if isinstance(logger, list) else [logger]
    if any("CSVLogger" in str(getattr(lg, "class_path", lg)) for lg in loggers):
        return loggers
    return [csv_logger, *loggers]


def _name_wandb_runs(config: Any) -> None:
    """Names W&B runs after the experiment config and the seed, and groups a sweep's runs.

    The experiment is the last ``-c`` file outside a ``logger`` folder; the group is
    ``$EMIMIMIC_WANDB_GROUP`` (``emimimic table`` sets it) or the experiment. Values the config
    sets itself are kept.
    """
    loggers = config.trainer.logger if isinstance(config.trainer.logger, list) else []
    files = [str(c) for c in (config.get("config") or [])]
    experiments = [Path(f).stem for f in files if "logger" not in Path(f).parts]
    experiment = experiments[-1] if experiments else "emimimic"
    seed = config.seed_everything
    for logger in loggers:
        if "WandbLogger" not in str(getattr(logger, "class_path", "")):
            continue
        args = logger.init_args
        if args.get("name") is None:
            args.name = f"{experiment}-seed{seed}"
        if args.get("group") is None:
            args.group = os.environ.get("EMIMIMIC_WANDB_GROUP", experiment)
        if args.get("tags") is None:
            args.tags = [experiment, f"seed{seed}"]


def _checkpoint_dir(config: Any) -> str:
    """Returns the run's checkpoint folder: the best checkpoint's, else ROOT/checkpoints."""
    section = config.get("checkpoint")
    dirpath = getattr(getattr(section, "init_args", None), "dirpath", None)
    root = config.trainer.default_root_dir or os.getcwd()
    return dirpath or os.path.join(root, "checkpoints")


def _began_without_an_epoch(config: Any) -> bool:
    """Returns whether a fit began in the run folder (its config was saved) but left no
    checkpoint: it was stopped in its first epoch, and a resume can only start over."""
    root = config.trainer.default_root_dir or os.getcwd()
    began = os.path.isfile(os.path.join(root, "logs", "fit", "config.yaml"))
    return began and not _has_checkpoints(_checkpoint_dir(config))


def _has_checkpoints(dirpath: str) -> bool:
    return os.path.isdir(dirpath) and any(f.endswith(".ckpt") for f in os.listdir(dirpath))


def cli_main(args: list[str] | None = None, run: bool = True) -> EMICLI:
    """Runs (or, with ``run=False``, only builds) the EMI LightningCLI on ``args``."""
    quiet_dependencies()
    try:
        with warnings.catch_warnings():
            # `emimimic` passes the console's own arguments on, which LightningCLI warns about
            warnings.filterwarnings("ignore", "LightningCLI's args parameter")
            return EMICLI(
                EMIModule,
                EMIDataModule,
                args=args,
                run=run,
                save_config_callback=EMISaveConfig,
                # the run's own file: a resumed fit, or a later validate, records its config anew
                save_config_kwargs={"overwrite": True},
                trainer_defaults={"use_distributed_sampler": False},
                # one way to set the optimizer and scheduler: the module's own arguments
                auto_configure_optimizers=False,
                # a refused value raises (the entry point prints it as one line), not exits;
                # an abbreviated option is an unknown option, not a guess
                parser_kwargs={"default_env": False, "exit_on_error": False,
                               "allow_abbrev": False},
            )
    finally:
        if run and torch.distributed.is_available() and torch.distributed.is_initialized():
            # left to interpreter exit, gloo's threads sometimes abort the process there
            torch.distributed.destroy_process_group()


__all__ = ["EMICLI", "EMISaveConfig", "best_checkpoint", "cli_main"]
