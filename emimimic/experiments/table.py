"""``emimimic table``: every config × seed trained, predicted on a labelled split and compared.

Usage::

    emimimic table configs/paper/table4/*.yaml --base configs/paper/base.yaml --seeds 5 \\
        --out runs/table4 --data.store stores/hume_vidmimic2

Each run lives in ``OUT/{config}-seed{S}/`` and is made by the ``emimimic`` CLI itself::

    python -m emimimic fit -c BASE -c CONFIG [OVERRIDES] --seed_everything S \\
        --trainer.default_root_dir RUN
    python -m emimimic predict -c BASE -c CONFIG [OVERRIDES] --seed_everything S \\
        --trainer.default_root_dir RUN --ckpt_path best --data.predict_split SPLIT \\
        --submission.path RUN/SPLIT_predictions.csv

so a run of the table is a run of the library, with its checkpoints and logs. Overrides are the
options with a dot (``--data.store PATH``, ``--trainer.max_epochs=2``) and anything after ``--``;
they go to every run. A re-run skips runs whose predictions exist, predicts for runs whose fit
finished, and resumes interrupted fits with ``--ckpt_path last``; it refuses a run folder made
with other settings (``run.json`` records the overrides and a hash of the two config files).

Outputs in ``OUT``: ``runs.csv`` (one row per run), ``table.md`` (per config: mean ± std over
seeds, and the paired-bootstrap interval of the difference to the reference row; see
:mod:`emimimic.experiments.stats`) and ``table.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from emimimic.errors import UserError
from emimimic.experiments import stats
from emimimic.experiments.summary import best_of, markdown, read_predictions, summarise

#: Options this command sets on every run; users choose them through the table's own options.
OWN_OPTIONS = ("--seed_everything", "--trainer.default_root_dir", "--ckpt_path",
               "--data.predict_split", "--submission.path", "--print_config")
#: Marker written once a run's fit has returned successfully.
FIT_DONE = "fit.done"
#: A run's mean Pearson recomputed from its predictions may differ from the ``val/pearson`` the
#: fit logged for its best checkpoint by float32 rounding and the CSV's 6 decimals, not more.
SCORE_TOLERANCE = 2e-3


@dataclass
class Run:
    """One config × seed of the table.

    Attributes:
        config: the row name (the config's file stem).
        path: the config file.
        seed: the value of ``--seed_everything``.
        folder: the run's ``--trainer.default_root_dir``, ``OUT/{config}-seed{seed}``.
        split: the labelled split predicted and scored.
    """

    config: str
    path: Path
    seed: int
    folder: Path
    split: str

    @property
    def predictions(self) -> Path:
        return self.folder / f"{self.split}_predictions.csv"

    @property
    def checkpoints(self) -> Path:
        return self.folder / "checkpoints"


def build_parser() -> argparse.ArgumentParser:
    """Returns the parser of ``emimimic table`` (dotted options are passed through, see main)."""
    parser = argparse.ArgumentParser(
        prog="emimimic table", allow_abbrev=False,
        description="Train every config with several seeds, predict a labelled split from each "
                    "run's best (EMA) checkpoint, and write the table: mean ± std over seeds and "
                    "the paired-bootstrap CI of each row's difference to a reference row.",
        epilog="Any option with a dot (--data.store PATH, --trainer.max_epochs 2, "
               "--trainer.accelerator cpu) and everything after `--` goes to every "
               "`emimimic fit`/`predict` call. Re-running skips finished runs and resumes "
               "interrupted ones.")
    parser.add_argument("configs", nargs="+", metavar="CONFIG",
                        help="experiment YAML files, one table row each (named by file stem)")
    parser.add_argument("--base", default="configs/paper/base.yaml",
                        help="protocol config given before each CONFIG (default: %(default)s; "
                             "configs/quickstart.yaml on the demo store)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per config (default: 3)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs trained side by side (default 1; e.g. one per GPU, or "
                             "several small CPU runs with OMP_NUM_THREADS=1)")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="seeds are FIRST..FIRST+SEEDS-1 (default: 0)")
    parser.add_argument("--out", default="runs/table",
                        help="folder of the runs and the outputs (default: %(default)s)")
    parser.add_argument("--split", default="valid",
                        help="labelled split predicted and scored (default: %(default)s)")
    parser.add_argument("--reference",
                        help="row the others are compared with (default: the first CONFIG)")
    parser.add_argument("--resamples", type=int, default=2000,
                        help="bootstrap resamples of the clips (default: %(default)s)")
    parser.add_argument("--confidence", type=float, default=0.95,
                        help="coverage of the intervals (default: %(default)s)")
    parser.add_argument("--bootstrap-seed", type=int, default=0,
                        help="seed of the resampling (default: %(default)s)")
    return parser


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Returns (the table's own arguments, the overrides passed through to every run).

    Overrides are the options whose name holds a dot, with their value (``--a.b V`` or
    ``--a.b=V``), and every argument after ``--``.
    """
    own, passed = [], []
    args = list(argv)
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
    for arg in passed:
        if arg.split("=", 1)[0] in OWN_OPTIONS:
            raise UserError(f"{arg.split('=', 1)[0]} is set by `emimimic table` for each run; "
                            "use --seeds/--first-seed, --out and --split instead")
    return own, passed


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "emimimic", *args]


def resolve_settings(base: str, config: str, overrides: Sequence[str]) -> str:
    """Returns the config the CLI resolves from ``base``, ``config`` and the overrides (YAML).

    Asking the CLI itself (``fit --print_config``) checks every option before any training
    starts, and tells which store the runs read.
    """
    done = subprocess.run(_cli("fit", "-c", base, "-c", config, *overrides, "--print_config"),
                          capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit status {done.returncode}"
        raise UserError(f"{config}: the CLI refuses it (with --base {base} and the overrides "
                        f"{' '.join(overrides) or 'none'}): {last}")
    return done.stdout


def _store_and_labels(settings: str, split: str, where: str
                      ) -> tuple[Path, list[str], np.ndarray, list[str], bool]:
    """Returns the store path, the split's ids, labels, target names, and if it is synthetic."""
    from emimimic.data.store import FeatureStore, StoreError

    data = (yaml.safe_load(settings) or {}).get("data") or {}
    store = data.get("store")
    if not store:
        raise UserError(f"{where}: no data.store in the config; pass --data.store PATH")
    try:
        fs = FeatureStore(store)
        view = fs.split(split)
    except StoreError as err:
        raise UserError(str(err)) from None
    if view.labels is None:
        raise UserError(f"{store}: split {split!r} has no labels to score predictions against; "
                        "choose a labelled one with --split")
    synthetic = bool(fs.provenance.get("synthetic", False))
    return Path(store), list(view.ids), np.asarray(view.labels, dtype=np.float64), \
        list(fs.targets), synthetic


def row_names(configs: Sequence[str]) -> dict[str, str]:
    """Returns row name (the file stem) -> config; refuses a config given twice or two stems."""
    names: dict[str, str] = {}
    for config in configs:
        name = Path(config).stem
        if name in names:
            raise UserError(f"{names[name]} and {config} both name the row {name!r}; rename one "
                            "(rows and run folders are named by the file stem)")
        names[name] = config
    return names


def plan_runs(names: dict[str, str], seeds: Sequence[int], out: Path, split: str) -> list[Run]:
    """Returns the runs, config-major, each in ``OUT/{config}-seed{S}``."""
    return [Run(name, Path(config), seed, out / f"{name}-seed{seed}", split)
            for name, config in names.items() for seed in seeds]


def _record(run: Run, base: str, overrides: Sequence[str]) -> dict[str, object]:
    """Returns what identifies a run's settings: its inputs, not the CLI's resolved config, so
    that a library update adding an option does not orphan the finished runs of a sweep."""
    digest = hashlib.sha256(Path(base).read_bytes() + b"\0" + run.path.read_bytes())
    return {"config": str(run.path), "base": base, "seed": run.seed,
            "overrides": list(overrides), "configs_sha256": digest.hexdigest()}


def _check_record(run: Run, record: dict[str, object]) -> None:
    file = run.folder / "run.json"
    if not file.is_file():
        if run.folder.exists() and any(run.folder.iterdir()):
            raise UserError(f"{run.folder} exists but was not made by `emimimic table` (no "
                            "run.json); move it away or choose another --out")
        return
    old = json.loads(file.read_text())
    if old != record:
        changed = [key for key in record if old.get(key) != record[key]]
        raise UserError(f"{run.folder} was run with other settings ({', '.join(changed)} "
                        "changed); remove it or choose another --out")


def _run_logged(cmd: list[str], log: Path, what: str, run: Run) -> None:
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        raise UserError(f"{run.folder.name}: `emimimic {what}` failed (exit {rc}): "
                        f"{lines[-1] if lines else ''} (full output in {log}); fix it and re-run "
                        "the same command to resume")


def _resume_from(run: Run) -> str | None:
    """Returns the --ckpt_path to resume an interrupted fit from, or None for a fresh fit."""
    if not run.checkpoints.is_dir():
        return None
    if (run.checkpoints / "last.ckpt").is_file():
        return "last"
    ckpts = sorted(run.checkpoints.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    return str(ckpts[-1]) if ckpts else None


def execute(run: Run, base: str, overrides: Sequence[str], label: str) -> None:
    """Fits (or resumes) and predicts one run as needed, printing one line about what it does."""
    record = _record(run, base, overrides)
    _check_record(run, record)
    if run.predictions.is_file():
        print(f"{label} {run.folder.name}: skipped (predictions exist)", flush=True)
        return
    run.folder.mkdir(parents=True, exist_ok=True)
    (run.folder / "run.json").write_text(json.dumps(record, indent=1) + "\n")
    common = ["-c", base, "-c", str(run.path), *overrides, "--seed_everything", str(run.seed),
              "--trainer.default_root_dir", str(run.folder)]
    if not (run.folder / FIT_DONE).is_file():
        resume = _resume_from(run)
        log = run.folder / "fit.log"
        how = "started" if resume is None else f"resumed from --ckpt_path {resume}"
        print(f"{label} {run.folder.name}: {how} (log: {log})", flush=True)
        _run_logged(_cli("fit", *common, *(["--ckpt_path", resume] if resume else [])), log,
                    "fit", run)
        (run.folder / FIT_DONE).write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
    else:
        print(f"{label} {run.folder.name}: predicting (fit finished earlier)", flush=True)
    _run_logged(_cli("predict", *common, "--ckpt_path", "best", "--data.predict_split", run.split,
                     "--submission.path", str(run.predictions)),
                run.folder / "predict.log", "predict", run)


def _score(runs: Sequence[Run], names: Sequence[str], ids: Sequence[str], labels: np.ndarray,
           targets: Sequence[str], reference: str, args: argparse.Namespace
           ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Returns the per-run table and the per-config summary with the bootstrap intervals."""
    rows, preds = [], {name: [] for name in names}
    for run in runs:
        p = read_predictions(run.predictions, ids, targets)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            r = stats.pearson(p, labels, targets)
        for w in caught:
            print(f"note: {run.folder.name}: {w.message}", flush=True)
        epoch, fit_score = best_of(run.checkpoints)
        if math.isfinite(fit_score) and abs(fit_score - r.mean()) > SCORE_TOLERANCE:
            print(f"note: {run.folder.name}: mean Pearson of its predictions {r.mean():.4f} "
                  f"differs from the val/pearson {fit_score:.4f} of its best checkpoint",
                  flush=True)
        preds[run.config].append(p)
        rows.append({"config": run.config, "seed": run.seed, "run": str(run.folder),
                     "best_epoch": epoch, "fit_val_pearson": fit_score,
                     "mean_pearson": float(r.mean()), **dict(zip(targets, r, strict=True))})
    table = pd.DataFrame(rows)
    intervals = stats.paired_bootstrap(preds, labels, reference, resamples=args.resamples,
                                       confidence=args.confidence, seed=args.bootstrap_seed,
                                       target_names=targets)
    summary = summarise(table, targets, intervals)
    return table, summary


def main(argv: list[str]) -> None:
    """Runs ``emimimic table`` on ``argv`` (the arguments after ``table``)."""
    own, overrides = split_argv(argv)
    args = build_parser().parse_args(own)
    if args.seeds < 1 or args.jobs < 1:
        raise UserError(f"--seeds and --jobs must be >= 1, got {args.seeds} and {args.jobs}")
    if args.resamples < 100:
        raise UserError(f"--resamples must be >= 100 for a percentile interval, got "
                        f"{args.resamples}")
    if not 0.0 < args.confidence < 1.0:
        raise UserError(f"--confidence must be in (0, 1), got {args.confidence}")
    for file in (args.base, *args.configs):
        if not os.path.isfile(file):
            raise UserError(f"{file}: no such config file")
    out = Path(args.out)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    rows = row_names(args.configs)
    names = list(rows)
    reference = args.reference or names[0]
    if reference not in names:
        raise UserError(f"--reference {reference!r} is not a row; rows are {names}")
    # each check is a CLI start-up (seconds of imports): run them side by side
    with ThreadPoolExecutor(max_workers=min(len(args.configs), os.cpu_count() or 1)) as pool:
        resolved = pool.map(lambda c: resolve_settings(args.base, c, overrides), args.configs)
        settings = dict(zip(args.configs, resolved, strict=True))
    runs = plan_runs(rows, seeds, out, args.split)
    store, ids, labels, targets, synthetic = _store_and_labels(
        settings[args.configs[0]], args.split, args.configs[0])
    for config in args.configs[1:]:
        other = (yaml.safe_load(settings[config]).get("data") or {}).get("store")
        if other is None or Path(other) != store:
            raise UserError(f"{config} reads store {other}, {args.configs[0]} reads {store}: "
                            "rows of one table must be scored on the same clips")

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(lambda item: execute(item[1], args.base, overrides,
                                           f"[{item[0]}/{len(runs)}]"), enumerate(runs, 1)))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        table, summary = _score(runs, names, ids, labels, targets, reference, args)
    for message in dict.fromkeys(str(w.message) for w in caught):
        print(f"note: bootstrap: {message}", flush=True)

    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "runs.csv", index=False, float_format="%.6f")
    kind = ("**SYNTHETIC demo store — not Hume-Vidmimic2 results.** " if synthetic else "")
    note = (f"{kind}Split `{args.split}` of `{store}` ({len(ids)} clips); seeds "
            f"{seeds[0]}–{seeds[-1]}. Mean ± sample std over seeds of each run's whole-split "
            f"Pearson. Δ: seed-averaged mean Pearson minus the reference row's, with the "
            f"{args.confidence:.0%} percentile interval of a paired bootstrap over clips "
            f"({args.resamples} resamples, seed {args.bootstrap_seed}; the same resampled clips "
            "for every run of every row, each run scored on its own).")
    (out / "table.md").write_text(markdown(summary, targets, reference, note))
    from emimimic import plots

    fig = plots.interval_rows(
        names, [table.loc[table.config == n, "mean_pearson"].tolist() for n in names],
        summary["difference"].tolist(), summary["low"].tolist(), summary["high"].tolist(),
        reference, args.confidence)
    if synthetic:
        fig.suptitle("SYNTHETIC demo store (not real data)", fontsize=9)
    plots.save_png(fig, out / "table.png")
    print(f"wrote {out / 'runs.csv'}, {out / 'table.md'}, {out / 'table.png'}", flush=True)


__all__ = ["build_parser", "main", "split_argv"]

if __name__ == "__main__":
    main(sys.argv[1:])
