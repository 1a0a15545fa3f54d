"""Benchmark: validation Pearson of 32-true vs bf16-mixed training on the CPU, over seeds.

Fits the quickstart config (the paper's final model, 12 epochs) on the synthetic demo store
(``emimimic synth``, default sizes) once per seed and precision, and prints each run's best
``val/pearson`` (EMA weights, computed in float32 either way), its wall time, and mean ± std per
precision, so users know what bf16 trades on a CPU with AVX-512 bf16.

    python tests/benchmarks/precision.py --seeds 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from emimimic.cli import cli_main
from emimimic.data.synth import synth

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float]]] = {"32-true": [], "bf16-mixed": []}
    with tempfile.TemporaryDirectory() as tmp:
        store = synth(Path(tmp) / "store", seed=0)
        for seed in range(args.seeds):
            for precision, runs in results.items():
                start = time.perf_counter()
                cli = cli_main(["fit", "-c", str(REPO / "configs" / "quickstart.yaml"),
                                "--data.store", str(store), "--seed_everything", str(seed),
                                "--trainer.precision", precision,
                                "--trainer.default_root_dir", f"{tmp}/{precision}-{seed}",
                                "--trainer.enable_progress_bar", "false",
                                "--trainer.enable_model_summary", "false"])
                best = float(cli.trainer.checkpoint_callback.best_model_score)
                runs.append((best, time.perf_counter() - start))
                print(f"seed {seed} {precision:10s}: best val/pearson {best:.4f} "
                      f"({runs[-1][1]:.1f} s)", flush=True)
    print("\n| precision | best val/pearson, mean ± std over seeds | fit wall time (s) |")
    print("|---|---|---|")
    for precision, runs in results.items():
        scores = [r for r, _ in runs]
        spread = statistics.stdev(scores) if len(scores) > 1 else 0.0
        print(f"| {precision} | {statistics.mean(scores):.4f} ± {spread:.4f} "
              f"| {statistics.mean(t for _, t in runs):.1f} |")


if __name__ == "__main__":
    main()
