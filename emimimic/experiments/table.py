"""``emimimic table``: every config × seed trained, predicted on a labelled split and compared.

Usage::

    emimimic table configs/paper/table4/*.yaml --base configs/paper/base.yaml --seeds 5 \\
        --out runs/table4 --data.store stores/hume_vidmimic2
    emimimic table configs/paper/final.yaml \
        configs/paper/final.yaml+configs/overlays/modality_dropout.yaml ...

Each run lives in ``OUT/{row}-seed{S}/`` and is made by the ``emimimic`` CLI itself
(:mod:`emimimic.experiments.runs`)::

    python -m emimimic fit -c BASE -c CONFIG [-c OVERLAY] [OVERRIDES] --seed_everything S \\
        --trainer.default_root_dir RUN
    python -m emimimic predict ... --ckpt_path best --data.predict_split SPLIT \\
        --submission.path RUN/SPLIT_predictions.csv

so a run of the table is a run of the library, with its checkpoints and logs. A row is a config
file, or a config with overlays on top (``CONFIG+OVERLAY``, named after both). Overrides are the
options with a dot (``--data.store PATH``, ``--trainer.max_epochs=2``), anything after ``--``, or
``--overrides``; they go to every run. A re-run skips runs whose predictions exist, predicts for
runs whose fit finished, and resumes interrupted fits with ``--ckpt_path last``; it refuses a
run folder made with other settings. The options are :class:`TableOptions` (``--print_config``
writes them as a YAML file that ``-c`` reads back).

Outputs in ``OUT``: ``runs.csv`` (one row per run, with its wall time), ``table.md`` (per row:
mean ± std over seeds, the paired-bootstrap interval of the difference to the reference row, see
:mod:`emimimic.experiments.stats`, and the protocol) and ``table.png``.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from jsonargparse.typing import PositiveInt

from emimimic.commandline import check_config_file
from emimimic.errors import UserError
from emimimic.experiments import stats
from emimimic.experiments.runs import (
    RunFolder,
    check_overrides,
    expand_rows,
    held_out,
    resolve_settings,
    row_name,
    with_rows,
)
from emimimic.experiments.summary import best_of, markdown, read_predictions, summarise

#: A run's mean Pearson recomputed from its predictions may differ from the ``val/pearson`` the
#: fit logged for its best checkpoint by float32 rounding and the CSV's 6 decimals, not more.
SCORE_TOLERANCE = 2e-3


@dataclass
class TableOptions:
    """Train every config with several seeds, predict a labelled split from each run's best
    (EMA) checkpoint, and write the table: mean ± std over seeds and the paired-bootstrap CI of
    each row's difference to a reference row.

    Attributes:
        configs: the rows, also given as the first arguments: experiment YAML files, a config
            with overlays on top (CONFIG+OVERLAY, a row named after both), or the folder of an
            `emimimic ensemble` scored on the table's split (a row of one prediction set).
        base: protocol config given before each row's files (configs/quickstart.yaml on the
            demo store).
        seeds: seeds per row.
        first_seed: seeds are first_seed .. first_seed + seeds - 1.
        jobs: runs trained side by side (e.g. one per GPU, or several small CPU runs); each
            run gets an equal share of the CPU cores as its threads unless OMP_NUM_THREADS is
            set.
        out: folder of the runs and the outputs.
        split: labelled split predicted and scored.
        reference: row the others are compared with (default: the first row).
        resamples: bootstrap resamples of the clips (at least 100).
        confidence: coverage of the intervals, in (0, 1).
        bootstrap_seed: seed of the resampling.
        overrides: options given to every run; any --dotted.option on the command line and
            everything after -- land here too.
        seed_ensembles: add, below each config row, the row of its seeds' mean prediction (a
            seed ensemble, scored once).
    """

    configs: list[str] = field(default_factory=list)
    base: str = "configs/paper/base.yaml"
    seeds: PositiveInt = 3
    first_seed: int = 0
    jobs: PositiveInt = 1
    out: Path = Path("runs/table")
    split: str = "valid"
    reference: str | None = None
    resamples: int = 2000
    confidence: float = 0.95
    bootstrap_seed: int = 0
    overrides: list[str] = field(default_factory=list)
    seed_ensembles: bool = False


@dataclass
class Run(RunFolder):
    """One row × seed of the table (a :class:`~emimimic.experiments.runs.RunFolder`)."""

    row: str = ""


class Progress:
    """Prints a line per finished run with its score, best epoch and time, and what is left."""

    def __init__(self, total: int, jobs: int) -> None:
        self.total, self.jobs, self.done, self.seconds = total, jobs, 0, []
        self.start = time.perf_counter()
        self.lock = threading.Lock()

    def finished(self, label: str, run: Run, seconds: float, trained: bool) -> None:
        with self.lock:
            self.done += 1
            if not trained:
                return  # its "skipped" line said it all
            self.seconds.append(seconds)
            left = self.total - self.done
            eta = ""
            if left and self.seconds:
                minutes = np.mean(self.seconds) * left / self.jobs / 60
                eta = f"; about {minutes:.0f} min left for {left} run(s)" if minutes >= 1 else (
                    f"; under a minute left for {left} run(s)")
            epoch, score = best_of(run.checkpoints)
            say(f"{label} {run.folder.name}: done in {seconds:.0f} s, best val/pearson "
                f"{score:.4f} at epoch {epoch}{eta}")


def say(line: str) -> None:
    """Prints a line in one write, so that lines of runs finishing together never interleave."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def execute(run: Run, label: str, split: str, progress: Progress) -> None:
    """Fits (or resumes) and predicts one run as needed, printing what it does."""
    run.claim()
    if run.predictions(split).is_file():
        say(f"{label} {run.folder.name}: skipped (predictions exist)")
        progress.finished(label, run, sum(run.timing().values()), trained=False)
        return
    start = time.perf_counter()
    if not run.fitted:
        resuming = (run.checkpoints / "last.ckpt").is_file()
        how = "resumed from --ckpt_path last" if resuming else "started"
        say(f"{label} {run.folder.name}: {how} (log: {run.folder / 'fit.log'})")
        run.fit()
    else:
        say(f"{label} {run.folder.name}: predicting (fit finished earlier)")
    run.predict(split)
    progress.finished(label, run, time.perf_counter() - start, trained=True)


def _store_and_labels(settings: dict, split: str, where: str
                      ) -> tuple[Path, list[str], np.ndarray, list[str], bool]:
    """Returns the store path, the split's ids, labels, target names, and if it is synthetic."""
    from emimimic.data.store import FeatureStore

    store = (settings.get("data") or {}).get("store")
    if not store:
        raise UserError(f"{where}: no data.store in the config; pass --data.store PATH")
    fs = FeatureStore(store)
    view = fs.split(split)
    if view.labels is None:
        raise UserError(f"{store}: split {split!r} has no labels to score predictions against; "
                        "choose a labelled one with --split")
    synthetic = bool(fs.provenance.get("synthetic", False))
    return Path(store), list(view.ids), np.asarray(view.labels, dtype=np.float64), \
        list(fs.targets), synthetic


def protocol(settings: dict) -> str:
    """Returns the training protocol a resolved config describes, in a few words."""
    trainer, data, model = (settings.get(k) or {} for k in ("trainer", "data", "model"))
    optimizer = model.get("optimizer") or {}
    name = str(optimizer.get("class_path", optimizer or "AdamW")).rsplit(".", 1)[-1]
    lr = (optimizer.get("init_args") or {}).get("lr")
    return (f"{trainer.get('max_epochs')} epochs, batch {data.get('batch_size')}, "
            f"{trainer.get('precision')}, {name}" + (f" lr {lr:g}" if lr is not None else ""))


def _validated_on(settings: dict[str, dict], split: str) -> set[str]:
    """Returns the rows whose runs select their best checkpoint on ``split`` itself (their
    ``val/pearson`` is then the score of their predictions of it)."""
    return {name for name, resolved in settings.items()
            if held_out(resolved.get("data") or {}) == split}


def _score(runs: Sequence[Run], names: Sequence[str], ids: Sequence[str], labels: np.ndarray,
           targets: Sequence[str], reference: str, opts: TableOptions,
           fixed: dict[str, Path], seed_means: dict[str, str], validated: set[str]
           ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Returns the per-run table and the per-row summary with the bootstrap intervals.

    ``fixed`` rows are prediction files (ensembles) scored as they are, one "run" each;
    ``seed_means`` rows are the mean prediction of a config row's seeds; a run of a
    ``validated`` row whose score differs from its best checkpoint's ``val/pearson`` gets a note
    (on any other split the two measure different clips).
    """
    rows, preds = [], {name: [] for name in names}

    def add(row: str, p: np.ndarray, where: str, **extra: object) -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            r = stats.pearson(p, labels, targets)
        for w in caught:
            print(f"note: {where}: {w.message}", flush=True)
        preds[row].append(p)
        rows.append({"config": row, **extra, "mean_pearson": float(r.mean()),
                     **dict(zip(targets, r, strict=True))})

    for name in names:
        if name in fixed:
            add(name, read_predictions(fixed[name], ids, targets), name, seed=math.nan,
                run=str(fixed[name].parent), best_epoch=math.nan, fit_val_pearson=math.nan,
                wall_s=math.nan)
            continue
        if name in seed_means:  # its config row comes first, so its predictions are there
            add(name, np.mean(preds[seed_means[name]], axis=0), name, seed=math.nan, run="",
                best_epoch=math.nan, fit_val_pearson=math.nan, wall_s=math.nan)
            continue
        for run in (run for run in runs if run.row == name):
            p = read_predictions(run.predictions(opts.split), ids, targets)
            epoch, fit_score = best_of(run.checkpoints)
            add(name, p, run.folder.name, seed=run.seed, run=str(run.folder), best_epoch=epoch,
                fit_val_pearson=fit_score, wall_s=sum(run.timing().values()) or math.nan)
            scored = rows[-1]["mean_pearson"]
            if (name in validated and math.isfinite(fit_score)
                    and abs(fit_score - scored) > SCORE_TOLERANCE):
                print(f"note: {run.folder.name}: mean Pearson of its predictions {scored:.4f} "
                      f"differs from the val/pearson {fit_score:.4f} of its best checkpoint",
                      flush=True)
    table = pd.DataFrame(rows)
    intervals = stats.paired_bootstrap(preds, labels, reference, resamples=opts.resamples,
                                       confidence=opts.confidence, seed=opts.bootstrap_seed,
                                       target_names=targets)
    return table, summarise(table, targets, intervals)


def _ensemble_row(folder: Path, split: str, store: Path | None) -> Path:
    """Returns the predictions of ``split`` an ensemble folder holds, after checking them.

    Raises:
        UserError: not an ensemble of this store, or not scored on the table's split.
    """
    record = json.loads((folder / "ensemble.json").read_text())
    if store is not None and Path(record["store"]).resolve() != store.resolve():
        raise UserError(f"{folder}: an ensemble of store {record['store']}, the table scores "
                        f"{store}")
    file = folder / f"{split}_predictions.csv"
    if not file.is_file():
        raise UserError(f"{folder}: no predictions of split {split!r}; run `emimimic ensemble "
                        f"... --score_split {split} --out {folder}`")
    return file


def run_table(opts: TableOptions) -> pd.DataFrame:
    """Runs the table; returns the per-row summary (and writes the files, see the module)."""
    if not opts.configs:
        raise UserError("emimimic table needs at least one row: give config files first")
    if opts.resamples < 100:
        raise UserError(f"--resamples must be >= 100 for a percentile interval, got "
                        f"{opts.resamples}")
    if not 0.0 < opts.confidence < 1.0:
        raise UserError(f"--confidence must be in (0, 1), got {opts.confidence}")
    check_config_file(opts.base)
    ensembles = {Path(r).name: Path(r) for r in opts.configs
                 if (Path(r) / "ensemble.json").is_file()}
    rows = expand_rows([r for r in opts.configs if Path(r).name not in ensembles
                        or not Path(r).is_dir()])
    if not rows:
        raise UserError("emimimic table needs at least one config row (ensembles are scored "
                        "beside config rows)")
    names, seed_means = [], {}
    for given in opts.configs:
        name = Path(given).name if Path(given).name in ensembles else row_name(given)
        names.append(name)
        if opts.seed_ensembles and name in rows:
            seed_means[f"{name} ({opts.seeds}-seed mean)"] = name
            names.append(f"{name} ({opts.seeds}-seed mean)")
    reference = opts.reference or names[0]
    if reference not in names:
        raise UserError(f"--reference {reference!r} is not a row; rows are {names}")
    overrides = list(opts.overrides)
    check_overrides(overrides)
    settings = {n: resolve_settings([opts.base, *files], overrides, n)
                for n, files in rows.items()}
    first = next(iter(rows))
    store, ids, labels, targets, synthetic = _store_and_labels(settings[first], opts.split,
                                                               first)
    fixed = {name: _ensemble_row(folder, opts.split, store) for name, folder in ensembles.items()}
    for name in list(rows)[1:]:
        other = (settings[name].get("data") or {}).get("store")
        if other is None or Path(other) != store:
            raise UserError(f"row {name} reads store {other}, row {first} reads {store}: "
                            "rows of one table must be scored on the same clips")
    seeds = list(range(opts.first_seed, opts.first_seed + opts.seeds))
    runs = [Run([Path(opts.base), *rows[name]], seed, opts.out / f"{name}-seed{seed}",
                overrides, {"split": opts.split}, side_by_side=opts.jobs, row=name)
            for name in rows for seed in seeds]
    for run in runs:  # every conflict before any training
        run.check()
    progress = Progress(len(runs), opts.jobs)
    with ThreadPoolExecutor(max_workers=opts.jobs) as pool:
        list(pool.map(lambda item: execute(item[1], f"[{item[0]}/{len(runs)}]", opts.split,
                                           progress), enumerate(runs, 1)))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        table, summary = _score(runs, names, ids, labels, targets, reference, opts, fixed,
                                seed_means, _validated_on(settings, opts.split))
    for message in dict.fromkeys(str(w.message) for w in caught):
        print(f"note: bootstrap: {message}", flush=True)

    opts.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(opts.out / "runs.csv", index=False, float_format="%.6f")
    kind = "**SYNTHETIC demo store — not Hume-Vidmimic2 results.** " if synthetic else ""
    protocols = sorted({protocol(s) for s in settings.values()})
    note = (f"{kind}Split `{opts.split}` of `{store}` ({len(ids)} clips; targets "
            f"{', '.join(targets)}); seeds {seeds[0]}–{seeds[-1]}. Protocol `{opts.base}`: "
            f"{'; '.join(protocols)}; overrides: "
            f"{' '.join(f'`{o}`' for o in overrides) or 'none'}. Mean ± sample std over seeds of "
            f"each run's whole-split Pearson. Δ: seed-averaged mean Pearson minus the reference "
            f"row's, with the {opts.confidence:.0%} percentile interval of a paired bootstrap "
            f"over clips ({opts.resamples} resamples, seed {opts.bootstrap_seed}; the same "
            "resampled clips for every run of every row, each run scored on its own).")
    (opts.out / "table.md").write_text(markdown(summary, targets, reference, note))
    from emimimic import plots

    fig = plots.interval_rows(
        names, [table.loc[table.config == n, "mean_pearson"].tolist() for n in names],
        summary["difference"].tolist(), summary["low"].tolist(), summary["high"].tolist(),
        reference, opts.confidence)
    fig.suptitle(f"{'SYNTHETIC (not real data) ' if synthetic else ''}store {store}, split "
                 f"{opts.split} ({len(ids)} clips), mean Pearson over {', '.join(targets)}\n"
                 f"protocol {Path(opts.base).name}: {'; '.join(protocols)}"
                 + (f"; overrides {' '.join(overrides)}" if overrides else ""), fontsize=7)
    plots.save_png(fig, opts.out / "table.png")
    print(f"wrote {opts.out / 'runs.csv'}, {opts.out / 'table.md'}, {opts.out / 'table.png'}",
          flush=True)
    return summary


def main(argv: Sequence[str]) -> None:
    """Runs ``emimimic table`` on ``argv`` (the arguments after ``table``)."""
    from emimimic.commandline import parse_command

    run_table(TableOptions(**parse_command(TableOptions, with_rows(argv, "table"),
                                           "emimimic table")))


__all__ = ["TableOptions", "main", "run_table"]

if __name__ == "__main__":
    main(sys.argv[1:])
