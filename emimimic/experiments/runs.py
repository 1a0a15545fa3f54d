"""Runs of the ``emimimic`` CLI in their own folders: the unit that tables, searches and
ensembles are made of.

A run folder holds what ``emimimic fit --trainer.default_root_dir FOLDER`` writes (checkpoints,
logs) plus ``run.json`` (what identifies its settings), ``fit.done`` (the fit returned),
``timing.json`` (seconds spent) and the predictions of the splits asked for. Re-running a step
skips what is done and resumes an interrupted fit from ``last.ckpt``.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from emimimic.commandline import check_config_file
from emimimic.errors import UserError
from emimimic.files import write_atomic
from emimimic.hardware import side_by_side_env

#: Marker written once a run's fit has returned successfully.
FIT_DONE = "fit.done"
#: Files of a search trial's folder: its epochs' scores, and the request to stop
#: (:mod:`emimimic.experiments.trial`).
EPOCHS, STOP = "epochs.jsonl", "STOP"
#: Options a run's folder fixes itself; a caller's overrides must not set them.
RUN_OPTIONS = ("--seed_everything", "--trainer.default_root_dir", "--ckpt_path",
               "--data.predict_split", "--submission.path", "--print_config")


def cli(*args: str) -> list[str]:
    """Returns the command line of ``emimimic ARGS`` in this Python."""
    return [sys.executable, "-m", "emimimic", *args]


def config_args(configs: Sequence[str | Path], overrides: Sequence[str]) -> list[str]:
    """Returns ``-c C1 -c C2 ... OVERRIDES``."""
    return [a for c in configs for a in ("-c", str(c))] + list(overrides)


def resolve_settings(configs: Sequence[str | Path], overrides: Sequence[str],
                     where: str) -> dict:
    """Returns the config the CLI resolves from ``configs`` and the overrides, as a dict.

    Asking the CLI itself (``fit --print_config``, in this process) checks every option before
    any training starts, and tells which store the runs read.

    Raises:
        UserError: the CLI refuses the combination (its error is quoted).
    """
    import argparse

    from emimimic.cli import cli_main

    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
            cli_main(["fit", *config_args(configs, overrides), "--print_config"])
    except SystemExit as done:
        if done.code not in (0, None):
            raise UserError(f"{where}: the CLI refuses it ({' + '.join(map(str, configs))}, "
                            f"overrides {' '.join(overrides) or 'none'}): exit {done.code}"
                            ) from None
    except (UserError, argparse.ArgumentError) as err:
        raise UserError(f"{where}: the CLI refuses it ({' + '.join(map(str, configs))}, "
                        f"overrides {' '.join(overrides) or 'none'}): "
                        f"{' '.join(str(err).split())}") from None
    return yaml.safe_load(printed.getvalue()) or {}


def fit_config(checkpoint: str | Path) -> dict | None:
    """Returns the resolved config of the fit that wrote a checkpoint, as ``emimimic fit`` saved
    it (``logs/fit/config.yaml`` beside the ``checkpoints`` folder); None where there is none or
    it cannot be read."""
    file = Path(checkpoint).parent.parent / "logs" / "fit" / "config.yaml"
    if not file.is_file():
        return None
    try:
        saved = yaml.safe_load(file.read_text())
    except yaml.YAMLError:
        return None
    return saved if isinstance(saved, dict) else None


def held_out(data: dict) -> str | None:
    """Returns the clips a run with these ``data`` settings validated on: its validation split,
    ``fold k of K`` of a cross-validated run, None for a refit (it validated on nothing)."""
    if data.get("refit"):
        return None
    if data.get("folds"):
        return f"fold {data.get('fold')} of {data.get('folds')}"
    return data.get("val_split", "valid")


def run_logged(cmd: list[str], log: Path, what: str, folder: Path,
               env: dict[str, str] | None = None) -> None:
    """Runs ``cmd`` (in ``env``, None: this process's) with its output appended to ``log``.

    Raises:
        UserError: the command failed (its last line and the log are named).
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        raise UserError(f"{folder.name}: `emimimic {what}` failed (exit {rc}): "
                        f"{lines[-1] if lines else ''} (full output in {log}); fix it and re-run "
                        "the same command to resume")


@dataclass
class RunFolder:
    """One training run of the CLI: its configs, overrides, seed and folder.

    Attributes:
        configs: the YAML files, in order (``-c`` each).
        seed: ``--seed_everything``.
        folder: ``--trainer.default_root_dir``.
        overrides: further options of every command of the run.
        record: extra entries of ``run.json`` that identify the run's settings.
        side_by_side: runs started at the same time as this one (it included); each gets an
            equal share of the CPU cores as its threads (not part of the run's identity).
    """

    configs: list[Path]
    seed: int
    folder: Path
    overrides: list[str] = field(default_factory=list)
    record: dict = field(default_factory=dict)
    side_by_side: int = 1

    def env(self) -> dict[str, str] | None:
        """Returns the environment of the run's commands (None: this process's)."""
        return side_by_side_env(self.side_by_side)

    @property
    def checkpoints(self) -> Path:
        return self.folder / "checkpoints"

    def predictions(self, split: str) -> Path:
        """Returns where the run's predictions of ``split`` are written."""
        return self.folder / f"{split}_predictions.csv"

    def common_args(self) -> list[str]:
        return [*config_args(self.configs, self.overrides), "--seed_everything", str(self.seed),
                "--trainer.default_root_dir", str(self.folder)]

    def identity(self) -> dict:
        """Returns what identifies the run's settings: its inputs, not the CLI's resolved
        config, so that a library update adding an option does not orphan finished runs."""
        import hashlib

        digest = hashlib.sha256(b"\0".join(Path(c).read_bytes() for c in self.configs))
        return {"configs": [str(c) for c in self.configs], "seed": self.seed,
                "overrides": list(self.overrides), "configs_sha256": digest.hexdigest(),
                **self.record}

    def check(self) -> bool:
        """Returns whether the folder already holds this run (False: it is new).

        Raises:
            UserError: the folder holds another tool's files or a run of other settings.
        """
        file = self.folder / "run.json"
        if file.is_file():
            old, wanted = json.loads(file.read_text()), self.identity()
            if old != wanted:
                changed = [k for k in wanted if old.get(k) != wanted[k]] or ["the record"]
                raise UserError(f"{self.folder} was run with other settings "
                                f"({', '.join(changed)} changed); remove it or choose another "
                                "output folder")
            return True
        if self.folder.exists() and any(self.folder.iterdir()):
            raise UserError(f"{self.folder} exists but was not made by emimimic (no run.json); "
                            "move it away or choose another output folder")
        return False

    def claim(self) -> None:
        """Creates the folder with ``run.json``, or checks an existing one has the same settings.

        Raises:
            UserError: the folder holds another tool's files or a run of other settings.
        """
        if not self.check():
            self.folder.mkdir(parents=True, exist_ok=True)
            write_atomic(self.folder / "run.json", json.dumps(self.identity(), indent=1) + "\n")

    def _resume_from(self) -> str | None:
        if not self.checkpoints.is_dir():
            return None
        if (self.checkpoints / "last.ckpt").is_file():
            return "last"
        ckpts = sorted(self.checkpoints.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
        return str(ckpts[-1]) if ckpts else None

    @property
    def fitted(self) -> bool:
        return (self.folder / FIT_DONE).is_file()

    def fit(self, extra: Sequence[str] = ()) -> str:
        """Fits the run, or resumes an interrupted fit; returns ``started`` or ``resumed``."""
        resume = self._resume_from()
        start = time.perf_counter()
        run_logged(cli("fit", *self.common_args(), *extra,
                       *(["--ckpt_path", resume] if resume else [])),
                   self.folder / "fit.log", "fit", self.folder, self.env())
        self.add_seconds("fit", time.perf_counter() - start)
        write_atomic(self.folder / FIT_DONE, time.strftime("%Y-%m-%dT%H:%M:%S\n"))
        return "started" if resume is None else "resumed"

    def predict(self, split: str, ckpt: str = "best", extra: Sequence[str] = ()) -> Path:
        """Writes the predictions of ``split`` from checkpoint ``ckpt``; returns their path."""
        out = self.predictions(split)
        if out.is_file():
            return out
        start = time.perf_counter()
        run_logged(cli("predict", *self.common_args(), *extra, "--ckpt_path", ckpt,
                       "--data.predict_split", split, "--submission.path", str(out)),
                   self.folder / "predict.log", "predict", self.folder, self.env())
        self.add_seconds(f"predict {split}", time.perf_counter() - start)
        return out

    def add_seconds(self, step: str, seconds: float) -> None:
        """Adds wall seconds spent on ``step`` to ``timing.json``."""
        timing = self.timing()
        timing[step] = timing.get(step, 0.0) + seconds
        write_atomic(self.folder / "timing.json", json.dumps(timing, indent=1) + "\n")

    def timing(self) -> dict[str, float]:
        """Returns the seconds spent per step so far (empty for runs made before timings)."""
        file = self.folder / "timing.json"
        return json.loads(file.read_text()) if file.is_file() else {}


def split_argv(argv: Sequence[str], reserved: Sequence[str] = RUN_OPTIONS, command: str = "table"
               ) -> tuple[list[str], list[str], list[str]]:
    """Returns (leading positional arguments, the command's own options, the run overrides).

    Overrides are the options whose name holds a dot, with their value (``--a.b V`` or
    ``--a.b=V``), and every argument after ``--``; they go to every run.

    Raises:
        UserError: an override sets an option the command sets for each run itself.
    """
    args = list(argv)
    positional = []
    while args and not args[0].startswith("-"):
        positional.append(args.pop(0))
    own, passed = [], []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            passed += args[i + 1:]
            break
        name = arg.split("=", 1)[0]
        if arg.startswith("--") and "." in name:
            passed.append(arg)
            if "=" not in arg and i + 1 < len(args) and not args[i + 1].startswith("--"):
                passed.append(args[i + 1])
                i += 1
        else:
            own.append(arg)
        i += 1
    check_overrides(passed, reserved, command)
    return positional, own, passed


def check_overrides(overrides: Sequence[str], reserved: Sequence[str] = RUN_OPTIONS,
                    command: str = "table") -> None:
    """Refuses overrides that set an option the command sets for each run itself.

    Raises:
        UserError: naming the option.
    """
    for arg in overrides:
        if arg.split("=", 1)[0] in reserved:
            raise UserError(f"{arg.split('=', 1)[0]} is set by `emimimic {command}` for each "
                            "run; use its own options instead (see --help)")


def with_rows(argv: Sequence[str], command: str, key: str = "configs") -> list[str]:
    """Returns ``argv`` with its leading arguments and its run overrides as options.

    ``table A.yaml B.yaml --seeds 3 --data.store S`` becomes ``--seeds 3 --configs [A.yaml,
    B.yaml] --overrides+ [--data.store, S]``, so ``--print_config`` writes them too.
    """
    rows, own, overrides = split_argv(argv, command=command)
    extra = [f"--{key}", json.dumps(rows)] if rows else []
    if overrides:
        extra += ["--overrides+", json.dumps(overrides)]
    return [*own, *extra]


def row_name(row: str) -> str:
    """Returns a row's name: its files' stems joined by ``+``."""
    return "+".join(Path(part).stem for part in str(row).split("+"))


def expand_rows(rows: Sequence[str]) -> dict[str, list[Path]]:
    """Returns row name -> its config files, for rows ``CONFIG`` or ``CONFIG+OVERLAY[+...]``.

    A row is named after its files' stems joined by ``+``.

    Raises:
        UserError: a file that does not exist, or two rows with one name.
    """
    out: dict[str, list[Path]] = {}
    for row in rows:
        files = [Path(part) for part in str(row).split("+")]
        for file in files:
            if not file.is_file():
                raise UserError(f"{file}: no such config file (row {row!r})")
            check_config_file(file)
        name = row_name(row)
        if name in out:
            raise UserError(f"{' + '.join(map(str, out[name]))} and {row} both name the row "
                            f"{name!r}; rename one (rows and run folders are named by the file "
                            "stems)")
        out[name] = files
    return out


__all__ = ["FIT_DONE", "RUN_OPTIONS", "RunFolder", "check_overrides", "cli", "config_args",
           "expand_rows", "fit_config", "held_out", "row_name", "with_rows",
           "resolve_settings", "run_logged", "split_argv"]
