"""Finding a run's checkpoints, and letting a checkpoint decide the model it is evaluated with."""

from __future__ import annotations

import csv
import os
from dataclasses import fields
from typing import Any

import torch

from emimimic.errors import UserError
from emimimic.models import NetworkOptions
from emimimic.training.losses import LossOptions

#: The option groups a checkpoint's hyper-parameters fix, with the dataclass of their defaults.
CHECKPOINT_GROUPS = {"network": NetworkOptions, "loss": LossOptions}


def _load(path: str) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as err:
        raise UserError(f"{path}: cannot read it as a checkpoint ({err})") from None


def best_checkpoint(dirpath: str) -> str:
    """Returns the best checkpoint that ``{dirpath}/last.ckpt`` records.

    Lightning resolves ``ckpt_path="best"`` only inside the process that ran ``fit``; the
    ``last.ckpt`` written every epoch carries the best-checkpoint callback's state.

    Raises:
        UserError: there is no ``last.ckpt``, it names no best checkpoint, or that file is gone.
    """
    last = os.path.join(dirpath, "last.ckpt")
    if not os.path.isfile(last):
        raise UserError(f"--ckpt_path best: no {last}. Run `emimimic fit` with the same config "
                        "first, or pass --ckpt_path PATH/TO/FILE.ckpt")
    for key, value in _load(last).get("callbacks", {}).items():
        if key.startswith("ModelCheckpoint") and value.get("best_model_path"):
            best = value["best_model_path"]
            if not os.path.isfile(best):
                # The run folder may have moved since fit: look beside last.ckpt.
                moved = os.path.join(dirpath, os.path.basename(best))
                if not os.path.isfile(moved):
                    raise UserError(f"{last} names {best} as best, but it does not exist")
                best = moved
            return best
    raise UserError(f"{last} records no best checkpoint (was a metric monitored during fit?)")


def resolve_checkpoint(ckpt_path: str, dirpath: str) -> str:
    """Returns the file that ``--ckpt_path best|last|FILE`` names for a run folder.

    Raises:
        UserError: the file does not exist.
    """
    if ckpt_path == "best":
        return best_checkpoint(dirpath)
    path = os.path.join(dirpath, "last.ckpt") if ckpt_path == "last" else ckpt_path
    if not os.path.isfile(path):
        hint = ("nothing to resume or evaluate yet: run `emimimic fit` first"
                if ckpt_path == "last" else "check the path")
        raise UserError(f"--ckpt_path {ckpt_path}: {path} does not exist; {hint}")
    return path


def checkpoint_hparams(path: str) -> dict[str, Any]:
    """Returns the hyper-parameters an EMIModule checkpoint was saved with."""
    hparams = _load(path).get("hyper_parameters")
    if not isinstance(hparams, dict) or "dims" not in hparams:
        raise UserError(f"{path}: not a checkpoint of an EMIModule (no dims in its "
                        "hyper-parameters)")
    return hparams


def adopt_checkpoint_model(config: Any, hparams: dict[str, Any], path: str) -> None:
    """Sets the model's structure in a parsed CLI ``config`` from a checkpoint's hyper-parameters.

    A value the config leaves at its default takes the checkpoint's; a value set to something else
    that disagrees with the checkpoint is refused. The served modalities follow the checkpoint's
    dims unless the config names them.

    Raises:
        UserError: naming the option, its value and the checkpoint's.
    """
    for group, options in CHECKPOINT_GROUPS.items():
        defaults = options()
        saved = hparams.get(group, {})
        section = config.model[group]
        for field in fields(options):
            if field.name not in saved:
                continue
            given, theirs = section[field.name], saved[field.name]
            if given != getattr(defaults, field.name) and given != theirs:
                raise UserError(f"--model.{group}.{field.name} {given!r} conflicts with the "
                                f"checkpoint's {theirs!r} ({path}); drop the override or use "
                                "another checkpoint")
            section[field.name] = theirs
    modalities = list(hparams["dims"])
    given = config.data.modalities
    if given is not None and sorted(given) != sorted(modalities):
        raise UserError(f"--data.modalities {list(given)} conflicts with the checkpoint's "
                        f"{modalities} ({path})")
    config.data.modalities = modalities


def check_data_fits(hparams: dict[str, Any], dims: dict[str, int], targets: list[str],
                    path: str) -> None:
    """Refuses a store whose dims or targets differ from those a checkpoint was trained on."""
    if dict(hparams["dims"]) != dict(dims):
        raise UserError(f"{path} was trained on features of dims {dict(hparams['dims'])}, the "
                        f"store serves {dict(dims)}")
    if list(hparams.get("targets", targets)) != list(targets):
        raise UserError(f"{path} predicts {list(hparams['targets'])}, the store has targets "
                        f"{list(targets)}")


def metrics_rows_until(metrics_csv: str, epoch: int) -> list[dict[str, float]]:
    """Returns the rows of a Lightning ``metrics.csv`` logged up to and including ``epoch``.

    What a resumed fit logs again, so its log continues the interrupted one without repeating
    the epochs it redoes. Empty cells are left out of each row.
    """
    if not os.path.isfile(metrics_csv):
        return []
    with open(metrics_csv, newline="") as f:
        rows = [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
    return [row for row in rows if row.get("epoch", 0) <= epoch]
