"""Feature-store benchmark: size vs the naive layout, loader throughput, resident memory.

Builds a synthetic store at the paper's dims (visual 768, audio 1024, text 4096) with realistic raw
lengths (durations ~7 s mean, 95th percentile ~11.5 s; visual 25/30 fps, audio 50 Hz, text 10-60
tokens, ~5% clips without text) in a temporary folder it removes afterwards, then prints:

* store bytes vs the naive [N, 128, D] float16 layout, extrapolated to the full Hume-Vidmimic2
  (17,246 clips), and the mean text length at which the full store would exceed 12e9 bytes;
* the shuffled training loader (``EMIDataModule.train_dataloader``, num_workers 0 and 2), timed
  over the whole path to a materialised compact batch in the main process: DataLoader iteration
  (plans; workers, if any, prefetch into the page cache) plus ``EMIDataModule.read`` (what
  ``on_before_batch_transfer`` runs), in samples/s and GB/s of stored bytes. Its ratio is printed
  against two sequential reads of the same stored bytes in the same run (warm page cache):

  - baseline A, ``readinto`` in 8 MiB chunks into ONE reused buffer: an upper bound, as the
    buffer stays in the CPU caches and its pages are never faulted in again;
  - baseline B, the same output the loader must produce, in file order: per modality, chunks of
    the loader's mean batch bytes read with ``preadv`` into FRESH buffers allocated the way the
    loader allocates its batches (page faults included);

  a memmap copy of the same bytes is printed too, for reference;
* the separate cost of expanding batches to [B, 128, D] on the CPU (``FeatureBatch.dense``), which
  the model no longer needs;
* resident memory growth (VmRSS from /proc) over an extra, untimed epoch, main process and workers.

Usage: ``python tests/benchmarks/store.py --clips 2000 [--batch-size 32] [--workers 0 2]
[--epochs 3] [--store EXISTING]``.
This is a script that prints figures, not a timed test.
"""

from __future__ import annotations

import argparse
import math
import mmap
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from emimimic.constants import STEPS
from emimimic.data.datamodule import EMIDataModule
from emimimic.data.dataset import batch_buffers
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
    """Reads files front to back with ``readinto`` into a preallocated buffer; (s, bytes)."""
    buf = bytearray(chunk)
    view = memoryview(buf)
    total = 0
    start = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return time.perf_counter() - start, total


def sequential_fresh(files: list[Path], dims: dict[str, int], batches: int) -> tuple[float, int]:
    """Reads files in file order, ``batches`` chunks per file, each into a fresh buffer; (s, bytes).

    Chunk k of every modality's file is its share of one loader batch (the file's bytes divided
    by the number of batches); the chunks of batch k are allocated together with the loader's
    allocator (:func:`batch_buffers`), filled with ``preadv`` (the loader's read call) and
    dropped together: the output a loader must produce, minus shuffling and planning.
    """
    total = 0
    handles = [(open(path, "rb", buffering=0), dims[path.stem])  # noqa: SIM115
               for path in files]
    sizes = [os.fstat(f.fileno()).st_size // (dim * 2) for f, dim in handles]  # rows per file
    start = time.perf_counter()
    for k in range(batches):
        firsts = [rows * k // batches for rows in sizes]
        shapes = [(rows * (k + 1) // batches - first, dim)
                  for rows, first, (_, dim) in zip(sizes, firsts, handles, strict=True)]
        bufs = batch_buffers(shapes)
        for (f, dim), first, buf in zip(handles, firsts, bufs, strict=True):
            flat = buf.numpy().reshape(-1).view(np.uint8)
            done = 0
            while done < flat.nbytes:
                done += os.preadv(f.fileno(), [flat[done:]], first * dim * 2 + done)
            total += done
        del bufs, flat
    seconds = time.perf_counter() - start
    for f, _ in handles:
        f.close()
    return seconds, total


def memmap_copy(files: list[Path], chunk: int = 8 * 2**20) -> tuple[float, int]:
    """Copies memory-mapped files front to back into one preallocated buffer; (seconds, bytes)."""
    buf = np.empty(chunk, dtype=np.uint8)
    total = 0
    start = time.perf_counter()
    for path in files:
        if path.stat().st_size == 0:
            continue
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            data = np.frombuffer(mm, dtype=np.uint8)
            for pos in range(0, len(data), chunk):
                piece = data[pos:pos + chunk]
                buf[:len(piece)] = piece
                total += len(piece)
            del data, piece
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


def batch_bytes(batch) -> int:
    """Returns the bytes of stored rows a batch carries."""
    return sum(t.numel() * t.element_size() for t in batch.rows.values())


def epoch_report(store_path: Path, workers: int, batch_size: int, epochs: int,
                 baselines: dict[str, tuple[float, int]]) -> None:
    """Times ``epochs`` shuffled epochs up to compact batches in the main process (DataLoader
    plans + ``read``); then one untimed epoch, doing the same, for resident memory."""
    dm = EMIDataModule(str(store_path), batch_size=batch_size, num_workers=workers)
    loader = dm.train_dataloader()
    best = (math.inf, 0, 0)
    for epoch in range(epochs):
        clips = served = 0
        start = time.perf_counter()
        for plan in loader:
            batch = dm.read(plan)  # what on_before_batch_transfer does under a Trainer
            clips += len(batch)
            served += batch_bytes(batch)
            del batch, plan
        seconds = time.perf_counter() - start
        print(f"train loader, num_workers={workers}, batch {batch_size}, shuffled, epoch {epoch}"
              f"{' (includes starting the workers)' if epoch == 0 and workers else ''}: "
              f"{clips} clips in {seconds:.3f} s = {clips / seconds:,.0f} samples/s, "
              f"{served / seconds / 1e9:.2f} GB/s of stored rows (plans + main-process reads)")
        if seconds < best[0]:
            best = (seconds, clips, served)
    seconds, clips, served = best
    print(f"  best epoch: {clips / seconds:,.0f} samples/s, {served / seconds / 1e9:.2f} GB/s")
    for name, (base_seconds, base_bytes) in baselines.items():
        if served != base_bytes:
            print(f"  NOTE: the loader served {served:,} bytes, baseline {name} {base_bytes:,}")
        ratio = (served / seconds) / (base_bytes / base_seconds)
        print(f"  = {ratio:.2f}x baseline {name} (target >= 0.8: "
              f"{'MET' if ratio >= 0.8 else 'NOT MET'})")
    before = rss_kib()
    peak_main = dict(before)
    worker_first: dict[int, int] = {}
    worker_peak: dict[int, int] = {}
    for plan in loader:  # untimed: reading /proc after every batch costs time itself
        batch = dm.read(plan)
        del batch, plan
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
    growth = (peak_main["VmRSS"] - before["VmRSS"]) / 1024
    print(f"  RSS over one more (untimed) epoch: main {before['VmRSS'] / 1024:.0f} MiB before, "
          f"peak {peak_main['VmRSS'] / 1024:.0f} MiB (growth {growth:.0f} MiB; at peak anon "
          f"{peak_main['RssAnon'] / 1024:.0f}, file "
          f"{peak_main['RssFile'] / 1024:.0f}, shmem {peak_main['RssShmem'] / 1024:.0f} MiB)")
    for pid in sorted(worker_peak):
        print(f"  worker {pid} RSS first seen {worker_first[pid] / 1024:.0f} MiB, peak "
              f"{worker_peak[pid] / 1024:.0f} MiB (growth "
              f"{(worker_peak[pid] - worker_first[pid]) / 1024:.0f} MiB)")
    del loader, dm


def drop_page_cache() -> bool:
    """Empties the kernel's page cache (needs root); returns False where that is not allowed."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError:
        return False
    return True


def cold_report(store_path: Path, files: list[Path], workers_list: list[int],
                batch_size: int) -> None:
    """One epoch per loader setting, and one sequential read, each from an empty page cache:
    the case of a store larger than RAM, where workers' read-ahead should pay off."""
    if not drop_page_cache():
        print("cold cache: not measured (dropping the page cache needs root)")
        return
    seconds, nbytes = sequential_read(files)
    print(f"cold cache, sequential read (8 MiB chunks): {nbytes / seconds / 1e9:.2f} GB/s")
    for workers in workers_list:
        dm = EMIDataModule(str(store_path), batch_size=batch_size, num_workers=workers)
        loader = dm.train_dataloader()
        drop_page_cache()
        clips = served = 0
        start = time.perf_counter()
        for plan in loader:
            batch = dm.read(plan)
            clips += len(batch)
            served += batch_bytes(batch)
        elapsed = time.perf_counter() - start
        print(f"cold cache, train loader, num_workers={workers}, shuffled: {clips / elapsed:,.0f} "
              f"samples/s, {served / elapsed / 1e9:.2f} GB/s "
              f"= {(served / elapsed) / (nbytes / seconds):.2f}x the cold sequential read")
        del loader, dm


def expand_report(store_path: Path, batch_size: int, batches: int = 8) -> None:
    """Times expanding batches to [B, 128, D] on the CPU (``FeatureBatch.dense``): work the
    model no longer needs (it projects distinct windows), kept for code that wants dense input."""
    dm = EMIDataModule(str(store_path), batch_size=batch_size, num_workers=0)
    compact = [dm.read(b) for _, b in zip(range(batches), dm.train_dataloader(), strict=False)]
    compact[0].dense("text")  # warm-up
    clips = sum(len(b) for b in compact)
    start = time.perf_counter()
    out = 0
    for b in compact:
        out += sum(b.dense(m).numel() * 2 for m in b.modalities)
    seconds = time.perf_counter() - start
    print(f"FeatureBatch.dense on the CPU ({torch.get_num_threads()} threads; NOT part of the "
          f"loader figures, not needed by the model): {clips} clips in {seconds:.3f} s = "
          f"{clips / seconds:,.0f} samples/s, writing {out / seconds / 1e9:.2f} GB/s of "
          "[B,128,D] float16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per loader")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cold", action="store_true",
                        help="also time one epoch from an empty page cache (needs root)")
    parser.add_argument("--store", type=Path, default=None,
                        help="use this existing store (its train split) instead of building one")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="emimimic-bench-"))
    try:
        if args.store is None:
            start = time.perf_counter()
            path = synth(tmp / "store", seed=args.seed, counts={"train": args.clips},
                         dims=PAPER_DIMS, progress=False)
            print(f"built a synthetic paper-dims store in {time.perf_counter() - start:.1f} s")
        else:
            path = args.store
        store = FeatureStore(path)
        clips = len(store.split("train"))
        size_report(store)
        files = sorted((path / "train").glob("*.f16"))
        sequential_read(files)  # warm the page cache
        seconds, nbytes = min(sequential_read(files) for _ in range(3))
        print(f"baseline A: sequential read (readinto, 8 MiB chunks, one reused buffer) of the "
              f"{nbytes:,} stored bytes (warm cache), best of 3: {seconds:.3f} s = "
              f"{nbytes / seconds / 1e9:.2f} GB/s = {clips / seconds:,.0f} clips/s")
        batches = math.ceil(clips / args.batch_size)
        fresh_seconds, fresh_bytes = min(sequential_fresh(files, store.dims, batches)
                                         for _ in range(3))
        print(f"baseline B: sequential read in file order, {batches} loader-batch-sized chunks "
              f"per modality (mean {fresh_bytes / batches / 1e6:.1f} MB a batch), each into a "
              f"fresh buffer allocated like the loader's, best of 3: {fresh_seconds:.3f} s = "
              f"{fresh_bytes / fresh_seconds / 1e9:.2f} GB/s = "
              f"{clips / fresh_seconds:,.0f} clips/s")
        mm_seconds, _ = min(memmap_copy(files) for _ in range(3))
        print(f"memmap copy of the same bytes (reference only), best of 3: {mm_seconds:.3f} s = "
              f"{nbytes / mm_seconds / 1e9:.2f} GB/s")
        for workers in args.workers:
            epoch_report(path, workers, args.batch_size, args.epochs,
                         {"A (8 MiB reused buffer)": (seconds, nbytes),
                          "B (batch-sized fresh buffers)": (fresh_seconds, fresh_bytes)})
        expand_report(path, args.batch_size)
        if args.cold:
            cold_report(path, files, args.workers, args.batch_size)
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
