"""``emimimic tune``: a hyper-parameter search with Optuna, each trial a run of the library.

Usage::

    emimimic tune configs/quickstart.yaml configs/paper/final.yaml --space space.yaml \\
        --trials 20 --workers 2 --out runs/tune --data.store demo/store

The search space is a YAML file: an option (any ``model.*``, ``data.*`` or ``trainer.*`` of
``emimimic fit``) -> how to draw it::

    model.optimizer.init_args.lr: {type: log_float, low: 1.0e-4, high: 3.0e-3}
    model.network.init_args.pooling: {type: categorical, choices: [mean, attention, lstm]}
    model.network.init_args.modality_dropout: {type: float, low: 0.0, high: 0.3}
    data.batch_size: {type: int, low: 16, high: 64, step: 16}

Each trial is ``emimimic fit -c CONFIG ... --OPTION=VALUE ...`` in ``OUT/trial-NNNN/`` (its
checkpoints and logs as any run's), scored by its best ``val/pearson``; a seeded TPE sampler
draws the settings and a median pruner stops a trial whose epoch is weaker than the earlier
trials' at that epoch (the trial's fit reports every epoch and stops when told,
:mod:`emimimic.experiments.trial`).

The study lives in a journal file ``OUT/study.journal`` by default, so that several ``tune``
processes on one machine (or ``--workers N`` in one) share it: the total number of finished
trials is ``--trials``, whoever runs them. Any Optuna storage URL (``postgresql://...``) lets the
nodes of a cluster share one study. An interrupted study resumes when rerun: a trial whose
process died (kill -9 included) is marked failed and run again with the same settings,
resuming its fit from ``last.ckpt``; it never counts twice.

Outputs in ``OUT``: ``trials.csv``, ``best.yaml`` (the best trial's resolved config: ``emimimic
fit -c best.yaml`` and ``emimimic table best.yaml`` take it as it is), ``refit.yaml`` (an
overlay: train + valid for the best trial's number of epochs), ``history.png`` and
``importance.png``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from jsonargparse.typing import PositiveInt

from emimimic.errors import ConfigError, UserError
from emimimic.experiments.runs import (
    EPOCHS,
    STOP,
    RunFolder,
    check_overrides,
    cli,
    resolve_settings,
    with_rows,
)
from emimimic.files import write_atomic

#: Prefixes of the options a search space may draw.
SPACE_PREFIXES = ("model.", "data.", "trainer.")
#: Kinds of draws in a search space, and the keys each needs.
DRAWS = {"float": ("low", "high"), "log_float": ("low", "high"), "int": ("low", "high"),
         "categorical": ("choices",)}
#: Seconds after which another machine's running trial without a heartbeat counts as dead.
STALE_AFTER = 600.0
#: Seconds between looks at a running trial's reports.
POLL = 0.2


@dataclass
class TuneOptions:
    """Search the settings of a config with Optuna: every trial an `emimimic fit` run in its own
    folder, weak trials pruned on val/pearson per epoch; writes the best trial's config as a
    YAML that fit and table take as it is, and the search's plots.

    Attributes:
        configs: the configs every trial layers, in order (also the first arguments), e.g.
            configs/quickstart.yaml configs/paper/final.yaml.
        space: YAML file of the search space: option -> {type: float | log_float | int |
            categorical, low, high, step, choices} (see the module docstring).
        trials: finished (complete or pruned) trials the study should have, over every worker,
            process and node.
        workers: trials this process runs side by side (each with an equal share of the CPU
            cores as its threads, unless OMP_NUM_THREADS is set).
        out: folder of the study: its journal, the trial folders, best.yaml and the plots.
        storage: Optuna storage URL that processes on many nodes share (postgresql://...,
            mysql://..., sqlite:///...); default a journal file in out.
        study: the study's name in the storage (default: the out folder's name).
        sampler_seed: seed of the TPE sampler (worker i of this process uses seed + i).
        seed: --seed_everything of every trial, the same for all (trials differ by their
            settings only).
        pruner: median (stop a trial whose val/pearson at an epoch is below the median of the
            earlier trials' at that epoch) or none.
        pruner_warmup: epochs every trial runs before it can be pruned.
        pruner_startup: trials that finish before any is pruned.
        overrides: options given to every trial; any --dotted.option on the command line and
            everything after -- land here too.
    """

    configs: list[str] = field(default_factory=list)
    space: Path | None = None
    trials: PositiveInt = 20
    workers: PositiveInt = 1
    out: Path = Path("runs/tune")
    storage: str | None = None
    study: str | None = None
    sampler_seed: int = 0
    seed: int = 0
    pruner: Literal["median", "none"] = "median"
    pruner_warmup: int = 2
    pruner_startup: int = 3
    overrides: list[str] = field(default_factory=list)


def require_optuna() -> Any:
    """Returns the optuna module.

    Raises:
        UserError: it is not installed (naming the extra).
    """
    try:
        import optuna
    except ImportError:
        raise UserError('emimimic tune needs the \'tune\' extra (optuna); install it with pip '
                        'install -e ".[tune]"') from None
    return optuna


def read_space(path: Path) -> dict[str, dict[str, Any]]:
    """Returns a search space file's draws, checked.

    Raises:
        ConfigError: naming the file, the option and what is wrong.
    """
    try:
        space = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the search space ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{path}: expected option -> {{type, ...}} entries, got {space!r}")
    for key, draw in space.items():
        where = f"{path}, {key}"
        if not str(key).startswith(SPACE_PREFIXES):
            raise ConfigError(f"{where}: only options of {', '.join(SPACE_PREFIXES)} can be "
                              "searched")
        if not isinstance(draw, dict) or draw.get("type") not in DRAWS:
            raise ConfigError(f"{where}: expected {{type: {' | '.join(DRAWS)}, ...}}, got "
                              f"{draw!r}")
        lacking = [k for k in DRAWS[draw["type"]] if k not in draw]
        if lacking:
            raise ConfigError(f"{where}: type {draw['type']} needs {lacking}")
        if draw["type"] == "categorical":
            if not isinstance(draw["choices"], list) or not draw["choices"]:
                raise ConfigError(f"{where}: choices must be a non-empty list")
        elif not draw["low"] < draw["high"] or (draw["type"] == "log_float" and draw["low"] <= 0):
            raise ConfigError(f"{where}: expected low < high (and low > 0 for log_float), got "
                              f"{draw['low']} and {draw['high']}")
    return space


def _encode(value: Any) -> Any:
    """Returns a categorical choice as Optuna stores it: primitives as they are, else JSON."""
    return value if value is None or isinstance(value, str | int | float | bool) \
        else json.dumps(value)


def suggest(trial: Any, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Returns the trial's settings, option -> value, drawn from ``space``."""
    params: dict[str, Any] = {}
    for key, draw in space.items():
        kind = draw["type"]
        if kind == "categorical":
            encoded = [_encode(c) for c in draw["choices"]]
            picked = trial.suggest_categorical(key, encoded)
            params[key] = draw["choices"][encoded.index(picked)]
        elif kind == "int":
            params[key] = trial.suggest_int(key, int(draw["low"]), int(draw["high"]),
                                            step=int(draw.get("step", 1)),
                                            log=bool(draw.get("log", False)))
        else:
            params[key] = trial.suggest_float(key, float(draw["low"]), float(draw["high"]),
                                              log=kind == "log_float", step=draw.get("step"))
    return params


def as_overrides(params: dict[str, Any]) -> list[str]:
    """Returns a trial's settings as command-line options of ``emimimic fit``."""
    return [f"--{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in params.items()]


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Holds an exclusive lock on ``path`` (processes on one machine) while the block runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _die_with_parent() -> None:
    """Makes a trial's fit end when the search that started it dies (Linux); else it notices
    at its next epoch (:class:`~emimimic.experiments.trial.TrialReporter` watches its parent)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Search:
    """One process's part of a study: its workers ask for trials, run and report them."""

    def __init__(self, opts: TuneOptions, optuna: Any) -> None:
        self.opts = opts
        self.optuna = optuna
        self.space = read_space(opts.space) if opts.space is not None else None
        if self.space is None:
            raise UserError("emimimic tune needs --space FILE.yaml (what to search)")
        self.out = opts.out
        self.name = opts.study or opts.out.resolve().name
        self.lock = self.out / "study.lock"
        self.threads = threading.Lock()
        self.host = socket.gethostname()
        self.start = time.perf_counter()

    # -- the study --------------------------------------------------------------------------

    def storage(self) -> Any:
        if self.opts.storage:
            return self.opts.storage
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(str(self.out / "study.journal")))

    def study(self, worker: int = 0) -> Any:
        """Returns the study (created if new) with this worker's sampler and the pruner."""
        optuna = self.optuna
        sampler = optuna.samplers.TPESampler(seed=self.opts.sampler_seed + worker,
                                             constant_liar=True)
        pruner = (optuna.pruners.NopPruner() if self.opts.pruner == "none" else
                  optuna.pruners.MedianPruner(n_startup_trials=self.opts.pruner_startup,
                                              n_warmup_steps=self.opts.pruner_warmup))
        return optuna.create_study(study_name=self.name, storage=self.storage(),
                                   sampler=sampler, pruner=pruner, direction="maximize",
                                   load_if_exists=True)

    def recover(self, study: Any) -> None:
        """Fails the running trials whose process is gone, and enqueues them to run again.

        On this machine a trial is dead when its search process is; elsewhere when its
        heartbeat is older than :data:`STALE_AFTER`.
        """
        states = self.optuna.trial.TrialState
        for t in study.get_trials(deepcopy=False, states=(states.RUNNING,)):
            attrs = t.user_attrs
            if "pid" not in attrs:
                continue  # being set up right now by its worker
            mine = attrs.get("host") == self.host
            dead = (not _alive(int(attrs["pid"]))) if mine else (
                time.time() - float(attrs.get("heartbeat", 0)) > STALE_AFTER)
            if not dead:
                continue
            study.tell(t.number, state=states.FAIL)
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number,
                                                      "run": attrs.get("run", t.number)})
            print(f"[trial {t.number}] its process is gone: marked failed, enqueued again "
                  "(its fit resumes from last.ckpt)", flush=True)

    def counted(self, study: Any) -> int:
        """Returns the trials that count towards ``--trials``: finished, pruned, running."""
        states = self.optuna.trial.TrialState
        return len(study.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED,
                                                            states.RUNNING)))

    # -- trials ------------------------------------------------------------------------------

    def next_trial(self, study: Any) -> Any | None:
        """Returns a new running trial, or None when the study has all its trials."""
        with self.threads, file_lock(self.lock):
            self.recover(study)
            if self.counted(study) >= self.opts.trials:
                return None
            trial = study.ask()
            trial.set_user_attr("host", self.host)
            trial.set_user_attr("pid", os.getpid())
            trial.set_user_attr("heartbeat", time.time())
            trial.set_user_attr("run", int(trial.user_attrs.get("run", trial.number)))
            return trial

    def run_folder(self, trial: Any, params: dict[str, Any]) -> RunFolder:
        configs = [Path(c) for c in self.opts.configs]
        folder = self.out / f"trial-{int(trial.user_attrs['run']):04d}"
        return RunFolder(configs, self.opts.seed, folder,
                         [*self.opts.overrides, *as_overrides(params)],
                         {"study": self.name, "params": params},
                         side_by_side=self.opts.workers)

    def run(self, trial: Any) -> tuple[str, float | None, Path]:
        """Runs one trial's fit, reporting its epochs; returns (state, value, folder)."""
        params = suggest(trial, self.space)  # type: ignore[arg-type]
        run = self.run_folder(trial, params)
        run.claim()
        trial.set_user_attr("folder", str(run.folder))
        reporter = json.dumps({"class_path": "emimimic.experiments.trial.TrialReporter",
                               "init_args": {"folder": str(run.folder), "parent": os.getpid()}})
        resume = "last" if (run.checkpoints / "last.ckpt").is_file() else None
        (run.folder / STOP).unlink(missing_ok=True)
        epochs = run.folder / EPOCHS
        if not resume:  # a resumed fit keeps its epochs' reports (this trial reports them too)
            epochs.unlink(missing_ok=True)
        reported: dict[int, float] = {}
        cmd = cli("fit", *run.common_args(), f"--trainer.callbacks+={reporter}",
                  *(["--ckpt_path", resume] if resume else []))
        start = time.perf_counter()
        with open(run.folder / "fit.log", "a") as log:
            log.write(f"\n$ {' '.join(cmd)}\n")
            log.flush()
            child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                     preexec_fn=_die_with_parent, env=run.env())
            pruned, beat, running = False, time.time(), True
            while running:
                running = child.poll() is None  # then one more look at the last reports
                for epoch, value in sorted(_read_epochs(epochs).items()):
                    if epoch in reported:
                        continue
                    reported[epoch] = value
                    trial.report(value, epoch)
                    if not pruned and trial.should_prune():
                        pruned = True
                        write_atomic(run.folder / STOP, f"pruned after epoch {epoch}\n")
                if time.time() - beat > 30:
                    beat = time.time()
                    trial.set_user_attr("heartbeat", beat)
                if running:
                    time.sleep(POLL)
        run.add_seconds("fit", time.perf_counter() - start)
        if child.returncode != 0:
            lines = [ln for ln in (run.folder / "fit.log").read_text().splitlines() if ln.strip()]
            raise UserError(f"{run.folder.name}: `emimimic fit` failed (exit "
                            f"{child.returncode}): {lines[-1] if lines else ''} (full output in "
                            f"{run.folder / 'fit.log'})")
        if pruned:
            return "pruned", max(reported.values()) if reported else None, run.folder
        return "complete", max(reported.values()) if reported else math.nan, run.folder

    def worker(self, index: int) -> None:
        """Runs trials until the study has all of them."""
        study = self.study(index)
        while (trial := self.next_trial(study)) is not None:
            trial_start = time.perf_counter()
            try:
                state, value, folder = self.run(trial)
            except BaseException:
                with contextlib.suppress(Exception):
                    study.tell(trial, state=self.optuna.trial.TrialState.FAIL)
                raise
            if state == "pruned":
                study.tell(trial, state=self.optuna.trial.TrialState.PRUNED)
            else:
                study.tell(trial, value)
            self.progress(study, trial.number, state, value, folder,
                          time.perf_counter() - trial_start)

    def progress(self, study: Any, number: int, state: str, value: float | None, folder: Path,
                 seconds: float) -> None:
        states = self.optuna.trial.TrialState
        finished = len(study.get_trials(deepcopy=False, states=(states.COMPLETE,
                                                                states.PRUNED)))
        epochs = len(_read_epochs(folder / EPOCHS))
        try:
            best = study.best_trial
            lead = f"; best so far {best.value:.4f} (trial {best.number})"
        except ValueError:
            lead = ""
        score = "" if value is None else f" val/pearson {value:.4f}"
        print(f"[trial {number}] {state}{score} after {epochs} epoch(s) in {seconds:.0f} s"
              f"{lead}; {finished} of {self.opts.trials} finished", flush=True)


def _read_epochs(path: Path) -> dict[int, float]:
    """Returns epoch -> score of a trial's reports (the last report of an epoch wins)."""
    if not path.is_file():
        return {}
    out: dict[int, float] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written
        out[int(row["epoch"])] = float(row["value"])
    return out


def write_results(search: Search, study: Any) -> None:
    """Writes trials.csv, best.yaml, refit.yaml and the plots of a study."""
    import pandas as pd

    states = search.optuna.trial.TrialState
    rows = []
    for t in study.get_trials(deepcopy=False):
        folder = Path(t.user_attrs.get("folder", ""))
        reports = _read_epochs(folder / EPOCHS) if t.user_attrs.get("folder") else {}
        rows.append({"trial": t.number, "state": t.state.name.lower(), "value": t.value,
                     "best_epoch": max(reports, key=reports.get) if reports else None,
                     "epochs": len(reports), "retry_of": t.user_attrs.get("retry_of"),
                     "folder": t.user_attrs.get("folder"),
                     **{f"param {k}": v for k, v in t.params.items()}})
    pd.DataFrame(rows).to_csv(search.out / "trials.csv", index=False)
    complete = study.get_trials(deepcopy=False, states=(states.COMPLETE,))
    if not complete:
        print("no trial completed: no best.yaml", flush=True)
        return
    best = study.best_trial
    folder = Path(best.user_attrs["folder"])
    reports = _read_epochs(folder / EPOCHS)
    epoch = max(reports, key=reports.get)
    config = yaml.safe_load(next(folder.glob("logs/fit/config.yaml")).read_text())
    config.pop("ckpt_path", None)
    trainer = config.setdefault("trainer", {})
    trainer.pop("logger", None)
    trainer["callbacks"] = [c for c in trainer.get("callbacks") or []
                            if "TrialReporter" not in str(c.get("class_path", ""))] or None
    trainer["default_root_dir"] = str(search.out / "best")
    header = (f"# emimimic tune: the best of {len(complete)} complete trials of study "
              f"{search.name!r}: trial {best.number}, best val/pearson {best.value:.6f} at "
              f"epoch {epoch}\n# settings: {json.dumps(best.params)}\n"
              f"# run it: emimimic fit -c {search.out / 'best.yaml'} (same seed, same score)\n"
              f"# refit on train+valid: add -c {search.out / 'refit.yaml'}\n")
    write_atomic(search.out / "best.yaml", header + yaml.safe_dump(config, sort_keys=False))
    write_atomic(search.out / "refit.yaml",
                 f"# the best trial's {epoch + 1} epochs on train + valid, no validation\n"
                 + yaml.safe_dump({"data": {"refit": True},
                                   "trainer": {"max_epochs": epoch + 1,
                                               "default_root_dir": str(search.out / "refit")}},
                                  sort_keys=False))
    _plots(search, study)
    print(f"best: trial {best.number}, val/pearson {best.value:.4f} at epoch {epoch} with "
          f"{best.params}; wrote {search.out / 'best.yaml'}, {search.out / 'refit.yaml'}, "
          f"{search.out / 'trials.csv'}", flush=True)


def _plots(search: Search, study: Any) -> None:
    """Writes Optuna's history and parameter-importance plots (its matplotlib backend)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as optuna_plots
    except ImportError:
        print("note: no matplotlib (the plots extra): no plots written", flush=True)
        return
    from emimimic import plots

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", search.optuna.exceptions.ExperimentalWarning)
        figures = {"history.png": optuna_plots.plot_optimization_history}
        if len(study.best_trial.params) and len(study.get_trials(deepcopy=False)) > 1:
            figures["importance.png"] = optuna_plots.plot_param_importances
        for name, draw in figures.items():
            try:
                ax = draw(study)
            except (ValueError, RuntimeError) as err:
                print(f"note: {name} not drawn ({err})", flush=True)
                continue
            fig = ax.figure
            fig.suptitle(f"study {search.name!r}", fontsize=9)
            plots.save_png(fig, search.out / name)
            plt.close(fig)


def run_tune(opts: TuneOptions) -> None:
    """Runs (or resumes) the study and writes its results (see the module docstring)."""
    optuna = require_optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if not opts.configs:
        raise UserError("emimimic tune needs the configs to tune: give them first")
    for config in opts.configs:
        if not Path(config).is_file():
            raise UserError(f"{config}: no such config file")
    check_overrides(opts.overrides, command="tune")
    search = Search(opts, optuna)
    # the settings and every space option are checked by the CLI before any trial runs
    probe = {k: (d["choices"][0] if d["type"] == "categorical" else d["low"])
             for k, d in search.space.items()}  # type: ignore[union-attr]
    resolve_settings(opts.configs, [*opts.overrides, *as_overrides(probe)], "tune")
    search.out.mkdir(parents=True, exist_ok=True)
    study = search.study()
    print(f"study {search.name!r} in {opts.storage or search.out / 'study.journal'}: "
          f"{search.counted(study)} of {opts.trials} trials done or running", flush=True)
    errors: list[BaseException] = []

    def guarded(index: int) -> None:
        try:
            search.worker(index)
        except BaseException as err:  # reported below, after the other workers
            errors.append(err)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(opts.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    write_results(search, study)


def main(argv: Sequence[str]) -> None:
    """Runs ``emimimic tune`` on ``argv`` (the arguments after ``tune``)."""
    from emimimic.commandline import parse_command

    run_tune(TuneOptions(**parse_command(TuneOptions, with_rows(argv, "tune"),
                                         "emimimic tune")))


__all__ = ["TuneOptions", "as_overrides", "main", "read_space", "run_tune", "suggest"]

if __name__ == "__main__":
    main(sys.argv[1:])
