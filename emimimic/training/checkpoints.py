"""Opening checkpoints, finding a run's checkpoints, and letting a checkpoint decide the model.

Every checkpoint emimimic opens goes through :func:`load_checkpoint`, which turns every way a
file can be wrong (a folder, missing, empty, truncated, not a checkpoint of ``emimimic fit``,
pickled code references that ``weights_only`` loading refuses) into one
:class:`~emimimic.errors.UserError` line naming the file.
"""

from __future__ import annotations

import csv
import inspect
import os
import pickle
import re
import zipfile
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from emimimic.errors import UserError
from emimimic.models import EMINetwork
from emimimic.models.spec import class_path, import_class
from emimimic.training.losses import LossOptions

#: The option groups of a checkpoint's hyper-parameters that are dataclasses, with their class.
CHECKPOINT_GROUPS = {"loss": LossOptions}
#: The network class of a config that names none.
DEFAULT_NETWORK = class_path(EMINetwork)


def _refused_global(err: Exception) -> str:
    """Returns the code reference that ``weights_only`` loading refused, as torch names it."""
    found = re.search(r"GLOBAL ([\w.]+)", str(err)) or re.search(r"global[s]? ([\w.]+)", str(err))
    return found.group(1) if found else "a Python object"


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Returns a checkpoint's contents, loaded with ``weights_only`` (no code runs).

    Raises:
        UserError: one line naming the file and what is wrong with it.
    """
    file = Path(path)
    if file.is_dir():
        raise UserError(f"{file}: a folder, not a checkpoint file; pass a .ckpt file, or "
                        "--ckpt_path best|last with --trainer.default_root_dir of its run")
    if not file.is_file():
        raise UserError(f"{file}: no such checkpoint file")
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(4)
    if size == 0:
        raise UserError(f"{file}: empty file, not a checkpoint")
    if not zipfile.is_zipfile(file):
        if head == b"PK\x03\x04":
            raise UserError(f"{file}: truncated checkpoint ({size} bytes, the end of its zip "
                            "archive is missing); was it copied or written completely?")
        raise UserError(f"{file}: not a checkpoint of `emimimic fit` (not a torch zip archive)")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not re.search(r"global", str(err), re.IGNORECASE):  # a damaged pickle stream
            first = str(err).strip().splitlines()[0] if str(err).strip() else "unpickling error"
            raise UserError(f"{file}: damaged checkpoint, torch cannot read it ({first})") from None
        raise UserError(f"{file}: refused, it holds a code reference ({_refused_global(err)}) "
                        "that loading would import and run; checkpoints of `emimimic fit` hold "
                        "only tensors and plain data, so this file was not written by it or was "
                        "altered") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{file}: damaged checkpoint, torch cannot read it ({first})") from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise UserError(f"{file}: not a checkpoint of `emimimic fit` (no state_dict in it)")
    return state


def checkpoint_hparams(path: str | os.PathLike[str],
                       state: dict[str, Any] | None = None) -> dict[str, Any]:
    """Returns the hyper-parameters an EMIModule checkpoint was saved with (network as a spec).

    Raises:
        UserError: the file is not a checkpoint of an EMIModule.
    """
    state = load_checkpoint(path) if state is None else state
    hparams = state.get("hyper_parameters")
    if not isinstance(hparams, dict) or not isinstance(hparams.get("dims"), dict):
        raise UserError(f"{path}: not a checkpoint of an EMIModule (no dims in its "
                        "hyper-parameters)")
    network = hparams.get("network")
    if isinstance(network, dict) and "class_path" not in network:
        # checkpoints of emimimic 0.1 stored EMINetwork's options alone
        hparams = {**hparams, "network": {"class_path": DEFAULT_NETWORK, "init_args": network}}
    return hparams


def checkpoint_epoch(path: str | os.PathLike[str]) -> int:
    """Returns the epoch a checkpoint was saved in (0-based, as Lightning counts)."""
    state = load_checkpoint(path)
    if not isinstance(state.get("epoch"), int):
        raise UserError(f"{path}: not a checkpoint of `emimimic fit` (no epoch in it)")
    return int(state["epoch"])


def checkpoint_callback_state(state: dict[str, Any], prefix: str) -> dict[str, Any] | None:
    """Returns the saved state of the first callback whose key starts with ``prefix``."""
    for key, value in (state.get("callbacks") or {}).items():
        if key.startswith(prefix) and isinstance(value, dict):
            return value
    return None


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
    recorded = checkpoint_callback_state(load_checkpoint(last), "ModelCheckpoint")
    best = (recorded or {}).get("best_model_path")
    if not best:
        raise UserError(f"{last} records no best checkpoint: a refit (data.refit) validates "
                        "nothing, its model is --ckpt_path last; otherwise, was a metric "
                        "monitored during fit?")
    if not os.path.isfile(best):
        # The run folder may have moved since fit: look beside last.ckpt.
        moved = os.path.join(dirpath, os.path.basename(best))
        if not os.path.isfile(moved):
            raise UserError(f"{last} names {best} as best, but it does not exist")
        best = moved
    return best


def resolve_checkpoint(ckpt_path: str, dirpath: str) -> str:
    """Returns the file that ``--ckpt_path best|last|FILE`` names for a run folder.

    Raises:
        UserError: the file does not exist.
    """
    if ckpt_path == "best":
        return best_checkpoint(dirpath)
    path = os.path.join(dirpath, "last.ckpt") if ckpt_path == "last" else ckpt_path
    if os.path.isdir(path):
        load_checkpoint(path)  # the one message for a folder
    if not os.path.isfile(path):
        hint = ("nothing to resume or evaluate yet: run `emimimic fit` first"
                if ckpt_path == "last" else "check the path")
        raise UserError(f"--ckpt_path {ckpt_path}: {path} does not exist; {hint}")
    return path


def _plain(value: Any) -> Any:
    """Returns a parsed config value as plain data (jsonargparse Namespaces as dicts)."""
    if hasattr(value, "as_dict"):
        return value.as_dict()
    if isinstance(value, tuple):
        return list(value)
    return value


def _network_conflicts(given: Any, saved: dict[str, Any], path: str,
                       explicit: frozenset[str] = frozenset()) -> None:
    """Refuses a network option that is set (on the command line, or away from its default)
    and differs from the checkpoint's.

    Raises:
        UserError: naming the option, its value and the checkpoint's.
    """
    given = _plain(given)
    if not isinstance(given, dict):  # a class given in code rather than parsed
        return
    given_class = class_path(import_class(given.get("class_path", DEFAULT_NETWORK)))
    given_args = dict(given.get("init_args") or {})
    theirs = saved["class_path"]
    if given_class not in (DEFAULT_NETWORK, theirs):
        raise UserError(f"--model.network {given_class} conflicts with the checkpoint's "
                        f"{theirs} ({path}); drop the override or use another checkpoint")
    defaults = {n: p.default for n, p in
                inspect.signature(import_class(given_class)).parameters.items()
                if p.default is not inspect.Parameter.empty}
    for name, value in given_args.items():
        if name not in defaults or (_plain(value) == _plain(defaults[name])
                                    and f"model.network.{name}" not in explicit):
            continue
        if given_class != theirs:
            raise UserError(f"--model.network.init_args.{name} {value!r} is an option of "
                            f"{given_class}, but the checkpoint's network is {theirs} ({path})")
        if _plain(value) != saved["init_args"].get(name):
            raise UserError(f"--model.network.init_args.{name} {value!r} conflicts with the "
                            f"checkpoint's {saved['init_args'].get(name)!r} ({path}); drop the "
                            "override or use another checkpoint")


def command_line_keys(argv: list[str]) -> frozenset[str]:
    """Returns the dotted option names given on a command line (``--a.b 1``, ``--a.b=1``).

    ``init_args`` is dropped from the names, so ``--model.network.init_args.fusion`` and
    ``--model.network.fusion`` are the same option.
    """
    keys = set()
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2:
            keys.add(arg[2:].split("=", 1)[0].replace(".init_args.", "."))
    return frozenset(keys)


def adopt_checkpoint_model(config: Any, hparams: dict[str, Any], path: str,
                           explicit: frozenset[str] = frozenset()) -> None:
    """Checks a parsed CLI ``config`` against a checkpoint's hyper-parameters, and adopts them.

    A value that differs from the checkpoint's is refused when it is given on the command line
    (``explicit``, see :func:`command_line_keys`) or set away from its default in a config
    file; otherwise (a config file's value, or a default) it gives way to the checkpoint's. The
    network (class and options), the loss options, the per-part learning rates and the served
    modalities follow the checkpoint.

    Raises:
        UserError: naming the option, its value and the checkpoint's.
    """
    _network_conflicts(config.model.network, hparams["network"], path, explicit)
    for group, options in CHECKPOINT_GROUPS.items():
        defaults = options()
        saved = hparams.get(group, {})
        section = config.model[group]
        for field in fields(options):
            if field.name not in saved:
                continue
            given, theirs = section[field.name], saved[field.name]
            is_set = (f"model.{group}.{field.name}" in explicit
                      or _plain(given) != _plain(getattr(defaults, field.name)))
            if is_set and _plain(given) != theirs:
                raise UserError(f"--model.{group}.{field.name} {given!r} conflicts with the "
                                f"checkpoint's {theirs!r} ({path}); drop the override or use "
                                "another checkpoint")
            section[field.name] = theirs
    given = _plain(config.model.get("lr_multipliers")) or {}
    saved_rates = hparams.get("lr_multipliers") or {}
    if given and given != saved_rates:
        raise UserError(f"--model.lr_multipliers {given} conflicts with the checkpoint's "
                        f"{saved_rates} ({path})")
    config.model.lr_multipliers = saved_rates or None
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
