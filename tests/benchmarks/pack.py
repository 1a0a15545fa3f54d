"""Benchmark: ``emimimic pack`` with 1 and N workers vs a plain sequential read of the same files.

Writes per-clip ``.npy`` feature files at the paper's dims (visual 768, audio 1024, text 4096)
with realistic raw lengths (faces ~35 frames, audio ~350 frames, text ~25 tokens; float32, as
extractors write them) into a temporary folder, then, in one run, times:

* a plain sequential read (``np.load`` of every file, nothing else): the floor of any pack;
* ``pack(..., workers=1)`` and ``pack(..., workers=N)``: read, validate, pool T > 128, write;

and prints clips/s and MB/s of feature files read for each, the ratio to the sequential read,
and whether the N-worker store is byte-identical to the 1-worker one.

    python tests/benchmarks/pack.py --clips 1000 --workers 2
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import numpy as np

from emimimic.constants import EMOTIONS
from emimimic.data.pack import pack
from emimimic.data.synth import PAPER_DIMS

LENGTHS = {"visual": 35, "audio": 350, "text": 25}


def write_inputs(root: Path, clips: int, seed: int = 0) -> tuple[dict, dict, int]:
    """Writes a train split CSV and per-modality feature folders; returns them and their bytes."""
    rng = np.random.default_rng(seed)
    csv_path = root / "train.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Filename", *EMOTIONS])
        for clip in range(clips):
            writer.writerow([clip, *(rng.integers(0, 3, 6) / 2)])
    folders, nbytes = {}, 0
    for m, dim in PAPER_DIMS.items():
        folder = root / m
        folder.mkdir()
        folders[m] = str(folder)
        for clip in range(clips):
            t = max(1, int(rng.poisson(LENGTHS[m])))
            arr = rng.standard_normal((t, dim), dtype=np.float32)
            np.save(folder / f"{clip:05d}.npy", arr)
            nbytes += arr.nbytes
    return {"train": str(csv_path)}, folders, nbytes


def sequential_read(folders: dict[str, str]) -> float:
    """Returns the seconds a plain ``np.load`` of every feature file takes."""
    start = time.perf_counter()
    for folder in folders.values():
        for path in sorted(Path(folder).glob("*.npy")):
            np.load(path)
    return time.perf_counter() - start


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        splits, folders, nbytes = write_inputs(root, args.clips)
        sequential_read(folders)  # warm the page cache, as for every row below
        rows = {"sequential np.load of the files": min(sequential_read(folders)
                                                      for _ in range(2))}
        for workers in (1, args.workers):
            start = time.perf_counter()
            pack(root / f"store{workers}", splits, folders, progress=False, workers=workers)
            rows[f"pack, workers={workers}"] = time.perf_counter() - start
        same = files_of(root / "store1") == files_of(root / f"store{args.workers}")
    print(f"{args.clips} clips, dims {PAPER_DIMS}, {nbytes / 1e6:.0f} MB of float32 feature files")
    print("\n| row | seconds | clips/s | MB/s read | vs sequential read |")
    print("|---|---|---|---|---|")
    base = rows["sequential np.load of the files"]
    for name, seconds in rows.items():
        print(f"| {name} | {seconds:.2f} | {args.clips / seconds:.0f} | "
              f"{nbytes / seconds / 1e6:.0f} | {base / seconds:.2f}x |")
    print(f"\n{args.workers}-worker store byte-identical to the 1-worker store: {same}")


if __name__ == "__main__":
    main()
