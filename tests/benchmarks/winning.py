"""Benchmark: what the work after a paper's config buys, scored on a held-out test split.

On a SYNTHETIC store whose test split is labelled for the purpose (``synth --labelled_test``),
every step through the real commands, the test split never used to choose anything:

1. the paper's final model, 5 seeds (``emimimic table``; each run's checkpoint is selected on
   valid, its test predictions scored), and the mean of its 5 seeds (a seed ensemble);
2. ``emimimic tune`` (>= 20 trials on valid, median pruning, 2 workers), then the best trial's
   config over 5 seeds, and their mean;
3. the tuned config refit on train + valid for the best trial's epochs, 5 seeds, ensembled by
   their mean (``emimimic ensemble``);

then one table of all of them on test: mean Pearson ± std over seeds, the paired-bootstrap 95%
interval of each row's difference to the paper's final model, and the wall time of each step.

    python tests/benchmarks/winning.py --out runs/bench_winning
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SPACE = """\
# what the benchmark searches (the paper's final model over the quickstart protocol)
model.optimizer.init_args.lr: {type: log_float, low: 3.0e-4, high: 3.0e-3}
model.network.init_args.pooling: {type: categorical, choices: [mean, attention]}
model.network.init_args.dropout: {type: float, low: 0.1, high: 0.4}
model.network.init_args.modality_dropout: {type: float, low: 0.0, high: 0.3}
model.loss.lambda_corr: {type: float, low: 0.0, high: 0.3}
"""


def emimimic(*args: str) -> float:
    """Runs ``emimimic ARGS`` (output shown); returns its wall seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "emimimic", *args], cwd=REPO, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_winning"))
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--clips", default="train=600,valid=400,test=400")
    parser.add_argument("--fresh", action="store_true", help="remove --out first")
    args = parser.parse_args()
    out = args.out.resolve()
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "store"
    quiet = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary",
             "false"]
    base = str(REPO / "configs" / "quickstart.yaml")
    final = str(REPO / "configs" / "paper" / "final.yaml")
    walls: dict[str, float] = {}
    counts = dict(part.split("=") for part in args.clips.split(","))
    if not store.exists():
        walls["synth store (labelled test)"] = emimimic(
            "synth", str(store), "--labelled_test", "true",
            *[a for k, v in counts.items() for a in (f"--counts.{k}", v)])
    space = out / "space.yaml"
    space.write_text(SPACE)
    walls[f"tune ({args.trials} trials, {args.jobs} workers)"] = emimimic(
        "tune", base, final, "--space", str(space), "--trials", str(args.trials), "--workers",
        str(args.jobs), "--out", str(out / "tune"), "--data.store", str(store), *quiet)
    refit = out / "tune" / "refit.yaml"
    best = out / "tuned.yaml"  # the table names the row after the file
    shutil.copy(out / "tune" / "best.yaml", best)

    # the refits: the tuned config on train + valid for the best trial's epochs, several seeds
    from emimimic.experiments.runs import RunFolder

    folders = [RunFolder([Path(base), best, refit], seed, out / "refit" / f"seed{seed}",
                         quiet, side_by_side=args.jobs) for seed in range(args.seeds)]

    def fit(run: RunFolder) -> None:
        run.claim()
        if not run.fitted:
            run.fit()

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(fit, folders))
    walls[f"refit on train+valid ({args.seeds} seeds)"] = time.perf_counter() - start
    walls["ensemble of the refits (mean)"] = emimimic(
        "ensemble", *[str(r.folder) for r in folders], "--out", str(out / "refit_ensemble"),
        "--predict_split", "test", "--score_split", "test")
    walls[f"table: final and tuned, {args.seeds} seeds each, scored on test"] = emimimic(
        "table", final, str(best), str(out / "refit_ensemble"), "--base", base, "--seeds",
        str(args.seeds), "--jobs", str(args.jobs), "--split", "test", "--seed_ensembles",
        "true", "--out", str(out / "table"), "--data.store", str(store), *quiet)
    print("\n" + (out / "table" / "table.md").read_text())
    print("| step | wall time |\n|---|---:|")
    for step, seconds in walls.items():
        print(f"| {step} | {seconds / 60:.1f} min |")


if __name__ == "__main__":
    main()
