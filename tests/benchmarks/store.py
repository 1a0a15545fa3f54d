"""Feature-store benchmark: size vs the naive layout, loader throughput, resident memory.

Builds a synthetic store at the paper's dims (visual 768, audio 1024, text 4096) with realistic raw
lengths (durations ~7 s mean, 95th percentile ~11.5 s; visual 25/30 fps, audio 50 Hz, text 10-60
tokens, ~5% clips without text) in a temporary folder it removes afterwards, then prints:

* store bytes vs the naive [N, 128, D] float16 layout, extrapolated to the full Hume-Vidmimic2
  (17,246 clips), and the mean text length at which the full store would exceed 12e9 bytes;
* one shuffled training epoch through ``EMIDataModule`` (num_workers 0 and 2) against a plain
  sequential read of the same stored bytes in the same run, with a warm page cache;
* resident memory growth (VmRSS from /proc) over the epoch, main process and workers.

Usage: ``python tests/benchmarks/store.py --clips 2000 [--batch-size 32] [--workers 0 2]``.
This is a script that prints figures, not a timed test.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from emimimic.constants import STEPS
from emimimic.data.datamodule import EMIDataModule
from emimimic.data.store import FeatureStore
from emimimic.data.synth import PAPER_DIMS, synth

FULL_CLIPS = 17_246
LIMIT = 12e9


def rss_kib(pid: int | str = "self") -> dict[str, int]:
    """Returns VmRSS, RssAnon, RssFile and RssShmem of a process in KiB (from /proc)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(value.split()[0])
    return out


def children() -> list[int]:
    """Returns the pids of this process's children (DataLoader workers)."""
    pids: list[int] = []
    for task in Path("/proc/self/task").iterdir():
        text = (task / "children").read_text().split()
        pids += [int(p) for p in text]
    return pids


def sequential_read(files: list[Path], chunk: int = 8 * 2**20) -> tuple[float, int]:
    """Reads files start to end into one buffer; returns (seconds, bytes)."""
    buf = bytearray(chunk)
    view = memoryview(buf)
    total = 0
    start = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return time.perf_counter() - start, total


def size_report(store: FeatureStore) -> None:
    view = store.split("train")
    n = len(view)
    dims = store.dims
    total = store.nbytes()
    naive = n * STEPS * sum(dims.values()) * 2
    print(f"clips                {n}")
    print(f"store bytes          {total:,}  ({total / 1e9:.3f} GB)")
    print(f"naive bytes          {naive:,}  ({naive / 1e9:.3f} GB)  [N x 128 x sum(D) x 2]")
    print(f"ratio store/naive    {total / naive:.3f}")
    per_mod = {}
    for m, d in dims.items():
        lengths = view.raw_lengths(m)
        present = lengths > 0
        rows = np.minimum(lengths, STEPS)
        per_mod[m] = rows.sum() * d * 2
        print(f"  {m:<7} D={d:<5} present {present.mean():6.1%}  "
              f"raw T mean {lengths[present].mean():7.1f}  "
              f"p5/p50/p95 {np.percentile(lengths[present], [5, 50, 95]).round(0).tolist()}"
              f"  stored rows/clip {rows[present].mean():6.1f}  bytes {per_mod[m]:,}")
    other = total - sum(per_mod.values())
    scale = FULL_CLIPS / n
    full = total * scale
    text = view.raw_lengths("text")
    text_present = (text > 0).mean()
    fixed = (total - per_mod["text"]) * scale  # visual + audio + index/labels, scaled
    crossing = (LIMIT - fixed) / (FULL_CLIPS * text_present * dims["text"] * 2)
    print(f"index/labels/manifest {other:,} bytes")
    print(f"full store ({FULL_CLIPS:,} clips, same length distribution): {full:,.0f} bytes "
          f"= {full / 1e9:.2f} GB  (limit 12 GB: {'OK' if full <= LIMIT else 'EXCEEDED'})")
    print(f"full naive layout: {FULL_CLIPS * STEPS * sum(dims.values()) * 2 / 1e9:.2f} GB")
    print(f"sample mean text length {text[text > 0].mean():.1f} tokens (present clips); the full "
          f"store would cross 12e9 bytes at a mean text length of {crossing:.1f} tokens")
    for mean_t in (24, 30, 35, 45):
        est = fixed + FULL_CLIPS * text_present * mean_t * dims["text"] * 2
        print(f"  if mean text length were {mean_t:>2} tokens: full store {est / 1e9:.2f} GB")


def epoch_report(store_path: Path, workers: int, batch_size: int, baseline_rate: float,
                 stored_bytes: int) -> None:
    dm = EMIDataModule(str(store_path), batch_size=batch_size, num_workers=workers,
                       val_split=None, test_split=None, predict_split=None)
    loader = dm.train_dataloader()
    before = rss_kib()
    peak_main = dict(before)
    worker_first: dict[int, int] = {}
    worker_peak: dict[int, int] = {}
    served = clips = 0
    start = time.perf_counter()
    for batch in loader:
        clips += len(batch["ids"])
        served += sum(t.numel() * t.element_size() for t in batch["features"].values())
        del batch
        now = rss_kib()
        if now["VmRSS"] > peak_main["VmRSS"]:
            peak_main = now
        for pid in children():
            try:
                kib = rss_kib(pid)["VmRSS"]
            except (FileNotFoundError, KeyError, ProcessLookupError):
                continue
            worker_first.setdefault(pid, kib)
            worker_peak[pid] = max(worker_peak.get(pid, 0), kib)
    seconds = time.perf_counter() - start
    rate = clips / seconds
    print(f"train epoch, num_workers={workers}, batch {batch_size}, shuffled: {clips} clips in "
          f"{seconds:.2f} s = {rate:,.0f} samples/s; stored bytes "
          f"{stored_bytes / seconds / 1e9:.2f} GB/s, served [B,128,D] bytes "
          f"{served / seconds / 1e9:.2f} GB/s; "
          f"vs sequential read {rate / baseline_rate:.2f}x")
    growth = (peak_main["VmRSS"] - before["VmRSS"]) / 1024
    print(f"  main RSS {before['VmRSS'] / 1024:.0f} MiB before, "
          f"peak {peak_main['VmRSS'] / 1024:.0f} MiB (growth {growth:.0f} MiB; at peak anon "
          f"{peak_main['RssAnon'] / 1024:.0f}, file "
          f"{peak_main['RssFile'] / 1024:.0f}, shmem {peak_main['RssShmem'] / 1024:.0f} MiB)")
    for pid in sorted(worker_peak):
        print(f"  worker {pid} RSS first seen {worker_first[pid] / 1024:.0f} MiB, peak "
              f"{worker_peak[pid] / 1024:.0f} MiB (growth "
              f"{(worker_peak[pid] - worker_first[pid]) / 1024:.0f} MiB)")
    del loader, dm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="emimimic-bench-"))
    try:
        start = time.perf_counter()
        path = synth(tmp / "store", seed=args.seed, counts={"train": args.clips},
                     dims=PAPER_DIMS, progress=False)
        print(f"built a synthetic paper-dims store in {time.perf_counter() - start:.1f} s")
        store = FeatureStore(path)
        size_report(store)
        files = sorted((path / "train").glob("*.f16"))
        sequential_read(files)  # warm the page cache
        seconds, nbytes = min(sequential_read(files) for _ in range(3))
        baseline = args.clips / seconds
        print(f"sequential read of the {nbytes:,} stored bytes (warm cache): {seconds:.2f} s = "
              f"{nbytes / seconds / 1e9:.2f} GB/s = {baseline:,.0f} clips/s")
        for workers in args.workers:
            epoch_report(path, workers, args.batch_size, baseline, nbytes)
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
