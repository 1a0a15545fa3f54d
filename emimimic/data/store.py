"""Feature store: pooled per-clip features on disk, read through numpy memory mapping.

A store is a folder::

    STORE/manifest.json                 written LAST: a folder without it is not a store
    STORE/<split>/labels.csv            ABAW CSV: ``Filename`` + one column per target,
                                        or ``Filename`` only for an unlabelled split
    STORE/<split>/<modality>.f16        float16 rows [R, D], all clips of the split back to back
    STORE/<split>/<modality>.index.npy  int64 [N, 3] = (row_start, stored_rows, raw_T);
                                        stored_rows == 0 means the clip has no data for the modality

``manifest.json`` holds ``format_version``, ``targets`` (names, in label-column order), ``steps``
(128), ``modalities`` ({name: {dim, dtype: "float16"}}), ``splits`` ({name: {count, labelled,
present: {modality: clips with data}}}) and ``provenance`` (where the features came from;
synthetic stores say so there).

Storage rule (exact pooling at a fraction of the naive size): a clip whose raw sequence has
T > 128 steps is stored as its 128 pooled rows (``adaptive_avg_pool1d`` in float32, then float16);
a clip with T <= 128 is stored raw (T rows, float16) and pooled to 128 steps when read, with
the arithmetic of ``adaptive_avg_pool1d`` in float32 and a cast to float16. Either way a read
equals ``F.adaptive_avg_pool1d(raw.T[None].float(), 128)[0].T.half()`` bit for bit when ``raw`` is
float16-representable. Absent clips read as zeros and are reported by ``SplitView.present``.

Two ways to read: :meth:`SplitView.read` / :meth:`SplitView.read_batch` give pooled [128, D] rows
(through the memory map); :meth:`SplitView.read_rows` gives the *stored* rows of several clips back
to back (one positional read per run of adjacent clips, no pooling), which is what the training
loader serves; ``emimimic.data.datamodule.expand_batch`` pools those to [128, D] later, on the
device the model runs on. :meth:`SplitView.prefetch` asks the kernel to start reading clips' bytes
into the page cache (``posix_fadvise(WILLNEED)``) without copying them, which is what DataLoader
workers do ahead of the main process's ``read_rows``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import mmap
import os
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emimimic.constants import ID_COLUMN, STEPS

#: Version of the folder format written by this module; readers refuse other versions.
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LABELS = "labels.csv"
PROGRESS = "progress.json"
#: Largest magnitude a float16 can hold; larger raw values cannot be stored faithfully.
FLOAT16_MAX = 65504.0
#: Bytes of a split's mapped file a reader may touch before it drops its page mappings again, so
#: that resident memory stays bounded however large the store is (the page cache keeps the data).
RELEASE_BYTES = 128 * 2**20


class StoreError(ValueError):
    """Raised for an invalid store, input file or request; the message names file, clip and rule."""


# ----------------------------------------------------------------------------------------------
# Pooling
# ----------------------------------------------------------------------------------------------


def pool_reference(raw: np.ndarray | torch.Tensor, steps: int = STEPS) -> np.ndarray:
    """Returns ``adaptive_avg_pool1d`` of a raw [T, D] sequence to ``steps`` rows, as float16.

    This is the definition every read must match: pooling over time in float32, then float16.
    """
    t = torch.as_tensor(np.asarray(raw)).float()
    return torch.nn.functional.adaptive_avg_pool1d(t.T[None], steps)[0].T.half().numpy()


@lru_cache(maxsize=STEPS + 1)
def _upsample_plan(length: int, steps: int = STEPS
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (first raw row of each bin, two-row bins, their first rows, their second rows).

    For ``length <= steps`` every adaptive-pooling bin [floor(i*T/S), ceil((i+1)*T/S)) holds one or
    two raw rows, so a read needs a gather plus one float32 mean for the two-row bins.
    """
    i = torch.arange(steps)
    start = (i * length) // steps
    end = -((-(i + 1) * length) // steps)  # ceil division
    two = torch.nonzero(end - start == 2).flatten()
    return start, two, start[two], start[two] + 1


def pool_stored(rows: np.ndarray, out: np.ndarray) -> None:
    """Writes the 128 pooled float16 rows of a stored clip (``T <= 128`` raw rows) into ``out``.

    Equals :func:`pool_reference` bit for bit: one-row bins are copies, two-row bins are
    ``float16((float32(a) + float32(b)) / 2)``, which is what adaptive pooling computes for them.
    Stored rows hold no negative zeros (the writer turns them into +0, as pooling's sum would).
    Torch does the arithmetic because its float16 conversions are several times faster than numpy's.
    """
    length = rows.shape[0]
    if length == out.shape[0]:
        out[...] = rows
        return
    start, two, first, second = _upsample_plan(length, out.shape[0])
    src, dst = torch.from_numpy(rows), torch.from_numpy(out)
    torch.index_select(src, 0, start, out=dst)
    if two.numel():
        acc = src.index_select(0, first).float()
        acc += src.index_select(0, second)
        acc *= 0.5
        dst.index_copy_(0, two, acc.half())


def rows_to_store(raw: np.ndarray, dim: int, where: str) -> tuple[np.ndarray, int]:
    """Returns (float16 rows to store, raw length T) for a raw clip sequence, after validating it.

    Args:
        raw: the clip's features, [T, D] or a [D] vector (T = 1), any real numeric dtype.
        dim: the D the modality must have.
        where: ``"file X (clip Y, modality Z)"``, used in error messages.

    Raises:
        StoreError: wrong ndim, wrong D, empty, non-numeric, NaN/Inf or beyond float16's range.
    """
    arr = np.asarray(raw)
    if arr.dtype.kind not in "fiu":
        raise StoreError(f"{where}: expected a real numeric array, got dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise StoreError(f"{where}: expected a [T, {dim}] array or a [{dim}] vector, "
                         f"got ndim {arr.ndim} (shape {tuple(arr.shape)})")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise StoreError(f"{where}: empty array of shape {tuple(arr.shape)}, "
                         f"expected [T>=1, {dim}]")
    if arr.shape[1] != dim:
        raise StoreError(f"{where}: expected D = {dim}, got shape {tuple(arr.shape)}")
    # a new float32 array; adding +0 turns -0.0 into +0.0, as adaptive pooling's sum (0 + x) does
    arr32 = np.asarray(arr, dtype=np.float32) + np.float32(0.0)
    if not np.isfinite(arr32).all():
        raise StoreError(f"{where}: contains NaN or Inf values; expected finite features")
    if np.abs(arr32).max() > FLOAT16_MAX:
        raise StoreError(f"{where}: values beyond float16's range (|x| > {FLOAT16_MAX:g})")
    if arr32.shape[0] > STEPS:
        return pool_reference(arr32), arr32.shape[0]
    return arr32.astype(np.float16), arr32.shape[0]


# ----------------------------------------------------------------------------------------------
# Ids and label files
# ----------------------------------------------------------------------------------------------


def normalise_id(value: str, where: str) -> str:
    """Returns a clip id: integers zero-padded to 5 digits (ABAW ``Filename``), else the text.

    Raises:
        StoreError: the id is empty or could not name a file (path separators, leading dot).
    """
    text = str(value).strip()
    if text.isdigit():
        return text.zfill(5)
    if not text or "/" in text or "\\" in text or text.startswith("."):
        raise StoreError(f"{where}: {ID_COLUMN} {value!r} is not a valid clip id "
                         "(expected an integer or a plain file stem)")
    return text


def write_labels_csv(path: Path, targets: Sequence[str], ids: Sequence[str],
                     labels: np.ndarray | None) -> None:
    """Writes a split's ids (and labels when known) as an ABAW CSV, deterministically."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow([ID_COLUMN, *targets] if labels is not None else [ID_COLUMN])
        for n, clip in enumerate(ids):
            row = [clip]
            if labels is not None:
                row += [repr(float(v)) for v in labels[n]]
            writer.writerow(row)


def _read_labels_csv(path: Path, targets: Sequence[str], labelled: bool
                     ) -> tuple[list[str], np.ndarray | None]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    expected = [ID_COLUMN, *targets] if labelled else [ID_COLUMN]
    if not rows or rows[0] != expected:
        raise StoreError(f"{path}: header {rows[0] if rows else None} does not match the manifest, "
                         f"expected {expected}")
    ids = [r[0] for r in rows[1:]]
    if not labelled:
        return ids, None
    labels = np.asarray([[float(v) for v in r[1:]] for r in rows[1:]], dtype=np.float32)
    return ids, labels.reshape(len(ids), len(targets))


# ----------------------------------------------------------------------------------------------
# Reader
# ----------------------------------------------------------------------------------------------


class _Mapped:
    """A read-only memory map of one ``.f16`` file as a [R, D] float16 array (or an empty one)."""

    def __init__(self, path: Path, dim: int) -> None:
        self.path = path
        self.touched = 0
        size = path.stat().st_size
        if size == 0:
            self._mmap = None
            self.array = np.zeros((0, dim), dtype=np.float16)
            return
        with open(path, "rb") as f:
            # copy-on-write: the array is writable for torch.from_numpy, yet nothing writes to it,
            # so every page stays the page cache's (and the file is never modified)
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self.array = np.frombuffer(self._mmap, dtype=np.float16).reshape(-1, dim)

    def touch(self, nbytes: int) -> None:
        """Counts bytes read; past RELEASE_BYTES, unmaps this process's pages (the data stays)."""
        self.touched += nbytes
        if self._mmap is not None and self.touched > RELEASE_BYTES:
            self._mmap.madvise(mmap.MADV_DONTNEED)
            self.touched = 0


class SplitView:
    """One split of a :class:`FeatureStore`: ids, labels, presence and pooled reads per clip.

    Memory maps are opened on first read in each process and never pickled (see ``__getstate__``),
    so a view can be handed to DataLoader workers.
    """

    def __init__(self, root: Path, name: str, targets: Sequence[str], dims: Mapping[str, int],
                 info: Mapping[str, Any]) -> None:
        self.root = root
        self.name = name
        self.dims = dict(dims)
        self.labelled = bool(info["labelled"])
        folder = root / name
        self.ids, self.labels = _read_labels_csv(folder / LABELS, targets, self.labelled)
        if len(self.ids) != info["count"]:
            raise StoreError(f"{folder / LABELS}: {len(self.ids)} clips, "
                             f"manifest says {info['count']}")
        self._index: dict[str, np.ndarray] = {}
        for m, dim in self.dims.items():
            self._index[m] = self._check_index(folder, m, dim)
        self._maps: dict[str, _Mapped] = {}
        self._files: dict[str, Any] = {}
        self._preloaded: dict[str, np.ndarray] = {}
        self._pid = os.getpid()

    def _check_index(self, folder: Path, m: str, dim: int) -> np.ndarray:
        path = folder / f"{m}.index.npy"
        if not path.is_file():
            raise StoreError(f"{path}: missing index file of modality {m!r} in split {self.name!r}")
        index = np.load(path, allow_pickle=False)
        n = len(self.ids)
        if index.shape != (n, 3) or index.dtype != np.int64:
            raise StoreError(f"{path}: expected int64 [{n}, 3], got {index.dtype} {index.shape}")
        start, rows, raw_t = index.T
        ends = np.cumsum(rows)
        bad = (start != ends - rows) | (rows != np.minimum(raw_t, STEPS)) | (raw_t < 0)
        if bad.any():
            i = int(np.argmax(bad))
            raise StoreError(f"{path}: inconsistent row {i} (clip {self.ids[i]}): "
                             f"{index[i].tolist()}")
        data = folder / f"{m}.f16"
        expected = int(ends[-1] if n else 0) * dim * 2
        if not data.is_file() or data.stat().st_size != expected:
            size = data.stat().st_size if data.is_file() else "missing"
            raise StoreError(f"{data}: expected {expected} bytes ({dim}-d float16 rows), "
                             f"got {size}")
        return index

    def __len__(self) -> int:
        return len(self.ids)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = {}  # maps and files are reopened lazily in the receiving process
        state["_files"] = {}
        return state

    def present(self, m: str) -> np.ndarray:
        """Returns a bool [N] array: True where clip i has data for modality ``m``."""
        return self._index[self._modality(m)][:, 1] > 0

    def stored_rows(self, m: str) -> np.ndarray:
        """Returns the int64 [N] stored row counts of ``m``: 0 absent, else ``min(T, 128)``."""
        return self._index[self._modality(m)][:, 1].copy()

    def raw_lengths(self, m: str) -> np.ndarray:
        """Returns the int64 [N] raw sequence lengths T of modality ``m`` (0 where absent)."""
        return self._index[self._modality(m)][:, 2].copy()

    def _modality(self, m: str) -> str:
        if m not in self.dims:
            raise StoreError(f"{self.root}: modality {m!r} not in the store "
                             f"(it has {sorted(self.dims)})")
        return m

    def _rows(self, m: str) -> tuple[np.ndarray, _Mapped | None]:
        if m in self._preloaded:
            return self._preloaded[m], None
        self._check_pid()
        mapped = self._maps.get(m)
        if mapped is None:
            mapped = self._maps[m] = _Mapped(self.root / self.name / f"{m}.f16", self.dims[m])
        return mapped.array, mapped

    def _check_pid(self) -> None:
        if self._pid != os.getpid():  # forked worker: open its own maps and files
            self._maps, self._files, self._pid = {}, {}, os.getpid()

    def _file(self, m: str) -> Any:
        self._check_pid()
        f = self._files.get(m)
        if f is None:
            f = self._files[m] = open(self.root / self.name / f"{m}.f16", "rb",  # noqa: SIM115
                                      buffering=0)
        return f

    def preload(self, modalities: Sequence[str] | None = None) -> None:
        """Reads the split's stored rows of the given modalities (default all) into RAM."""
        for m in modalities or list(self.dims):
            path = self.root / self.name / f"{self._modality(m)}.f16"
            self._preloaded[m] = np.fromfile(path, dtype=np.float16).reshape(-1, self.dims[m])

    def read_rows(self, m: str, indices: Sequence[int] | np.ndarray,
                  out: np.ndarray | None = None) -> np.ndarray:
        """Returns the stored rows of clips ``indices`` of ``m`` back to back, float16 [R, D].

        Clip ``indices[k]`` contributes its ``stored_rows(m)[indices[k]]`` rows (0 when absent,
        its 128 pooled rows when T > 128, else its T raw rows), in the order of ``indices``; pool
        them to [128, D] with ``emimimic.data.datamodule.expand_batch``. Clips stored next to each
        other (consecutive indices) are read as one run. Without preloading, the rows come from
        the file by positional reads (``os.preadv``), which copy straight from the page cache into
        ``out``: unlike copying out of the memory map, this maps no pages into the process, so
        there are no page faults per read and no mapped pages to release.

        Args:
            m: the modality.
            indices: clip positions in the split.
            out: a C-contiguous float16 [R, D] array to fill (R = the rows of ``indices``);
                None allocates one.

        Raises:
            StoreError: ``out`` has the wrong shape or dtype, or the file is shorter than its index
                says (it changed after the store was opened).
        """
        dim = self.dims[self._modality(m)]
        run_starts, run_rows, total = self._runs(m, indices)
        if out is None:
            out = np.empty((total, dim), dtype=np.float16)
        elif out.shape != (total, dim) or out.dtype != np.float16 or not out.flags.c_contiguous:
            raise StoreError(f"{self.root / self.name / f'{m}.f16'}: read_rows needs a "
                             f"C-contiguous float16 [{total}, {dim}] output, got {out.dtype} "
                             f"{tuple(out.shape)}")
        if total == 0:
            return out
        if m in self._preloaded or not hasattr(os, "preadv"):
            data, mapped = self._rows(m)
            pos = 0
            for start, rows in zip(run_starts, run_rows, strict=True):
                out[pos:pos + rows] = data[start:start + rows]
                pos += rows
            if mapped is not None:
                mapped.touch(total * dim * 2)
            return out
        fd = self._file(m).fileno()
        row_bytes = dim * 2
        flat = out.reshape(-1).view(np.uint8)
        pos = 0
        for start, rows in zip(run_starts, run_rows, strict=True):
            nbytes = rows * row_bytes
            got = os.preadv(fd, [flat[pos:pos + nbytes]], start * row_bytes)
            if got != nbytes:  # a short read only happens at end of file (or on a signal)
                got += self._read_rest(m, flat[pos + got:pos + nbytes], start * row_bytes + got)
            pos += nbytes
        return out

    def _runs(self, m: str, indices: Sequence[int] | np.ndarray
              ) -> tuple[list[int], list[int], int]:
        """Returns (first row, rows) of each run of clips stored back to back, and all rows.

        Runs follow the order of ``indices``; absent clips are skipped, and consecutive clips
        stored next to each other merge (an in-order evaluation batch is a single run).
        """
        sel = self._index[m][np.asarray(indices, dtype=np.int64)]
        sel = sel[sel[:, 1] > 0]
        if len(sel) == 0:
            return [], [], 0
        starts, counts = sel[:, 0], sel[:, 1]
        first = np.ones(len(starts), dtype=bool)
        first[1:] = starts[1:] != starts[:-1] + counts[:-1]
        run_rows = np.add.reduceat(counts, np.flatnonzero(first))
        return starts[first].tolist(), run_rows.tolist(), int(counts.sum())

    def byte_ranges(self, m: str, indices: Sequence[int] | np.ndarray) -> list[tuple[int, int]]:
        """Returns the (offset, length) byte ranges of ``m.f16`` that clips ``indices`` occupy.

        The ranges are in file order, each stored byte once, with touching ranges merged: what
        :meth:`prefetch` asks the kernel for (absent clips occupy nothing).
        """
        sel = self._index[self._modality(m)][np.unique(np.asarray(indices, dtype=np.int64))]
        sel = sel[sel[:, 1] > 0]  # unique indices are sorted, and so are their row starts
        if len(sel) == 0:
            return []
        starts, ends = sel[:, 0], sel[:, 0] + sel[:, 1]
        first = np.ones(len(starts), dtype=bool)
        first[1:] = starts[1:] != ends[:-1]
        last = np.ones(len(starts), dtype=bool)
        last[:-1] = first[1:]
        row_bytes = self.dims[m] * 2
        return [(int(a) * row_bytes, int(b - a) * row_bytes)
                for a, b in zip(starts[first], ends[last], strict=True)]

    def prefetch(self, modalities: Sequence[str], indices: Sequence[int] | np.ndarray) -> int:
        """Asks the kernel to bring the stored bytes of clips ``indices`` into the page cache.

        One ``posix_fadvise(POSIX_FADV_WILLNEED)`` per range of :meth:`byte_ranges`: the kernel
        starts reading and returns without waiting or copying anything into this process, so a
        DataLoader worker can run ahead of the main process's :meth:`read_rows` (which then finds
        the bytes cached) even when the store is larger than RAM. Preloaded modalities, and
        systems without ``posix_fadvise``, are skipped. Returns the number of bytes advised.
        """
        if not hasattr(os, "posix_fadvise"):
            return 0
        advised = 0
        for m in modalities:
            if m in self._preloaded:
                continue
            ranges = self.byte_ranges(m, indices)
            if not ranges:
                continue
            fd = self._file(m).fileno()
            for offset, length in ranges:
                os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
                advised += length
        return advised

    def _read_rest(self, m: str, buf: np.ndarray, offset: int) -> int:
        fd, done = self._file(m).fileno(), 0
        while done < buf.nbytes:
            got = os.preadv(fd, [buf[done:]], offset + done)
            if got == 0:
                index = self._index[m]
                row = (offset + done) // (self.dims[m] * 2)
                clip = self.ids[int(np.searchsorted(index[:, 0] + index[:, 1], row, side="right"))]
                raise StoreError(f"{self.root / self.name / f'{m}.f16'}: file ends at byte "
                                 f"{offset + done} inside clip {clip}, whose index entry needs "
                                 f"{offset + buf.nbytes} bytes; the store changed after opening")
            done += got
        return done

    def read(self, m: str, i: int) -> np.ndarray:
        """Returns clip ``i``'s modality ``m`` pooled to [128, D] float16 (zeros if absent)."""
        return self.read_batch(m, [i])[0]

    def read_batch(self, m: str, indices: Sequence[int] | np.ndarray,
                   out: np.ndarray | None = None) -> np.ndarray:
        """Returns clips ``indices`` of modality ``m`` as [B, 128, D] float16 (in ``out`` if given).

        Absent clips give zero rows; use :meth:`present` to tell them from real data.
        """
        index = self._index[self._modality(m)]
        dim = self.dims[m]
        if out is None:
            out = np.empty((len(indices), STEPS, dim), dtype=np.float16)
        data, mapped = self._rows(m)
        nbytes = 0
        for b, i in enumerate(indices):
            start, rows, _ = index[i]
            if rows == 0:
                out[b] = 0
            else:
                pool_stored(data[start:start + rows], out[b])
                nbytes += int(rows) * dim * 2
        if mapped is not None:
            mapped.touch(nbytes)
        return out


class FeatureStore:
    """A feature store folder opened for reading; validates its manifest on construction.

    Attributes:
        path: the store folder.
        manifest: the parsed ``manifest.json``.
        targets: label column names, in order.
        dims: modality -> feature dimension D.
        splits: split names.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        file = self.path / MANIFEST
        if not file.is_file():
            partial = " (an unfinished pack is in .partial: rerun it)" if Path(
                f"{self.path}.partial").exists() else ""
            raise StoreError(f"{self.path}: not a feature store, no {MANIFEST}{partial}")
        try:
            manifest = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise StoreError(f"{file}: not valid JSON ({err})") from err
        _check_manifest(manifest, file)
        self.manifest: dict[str, Any] = manifest
        self.targets: list[str] = list(manifest["targets"])
        self.dims: dict[str, int] = {m: int(v["dim"]) for m, v in manifest["modalities"].items()}
        self.splits: list[str] = list(manifest["splits"])
        self.provenance: dict[str, Any] = dict(manifest["provenance"])
        self._views: dict[str, SplitView] = {}

    def split(self, name: str) -> SplitView:
        """Returns the :class:`SplitView` of split ``name``.

        Raises:
            StoreError: the split is not in the store (the message lists those that are).
        """
        if name not in self.manifest["splits"]:
            raise StoreError(f"{self.path}: split {name!r} not in the store (it has {self.splits})")
        if name not in self._views:
            self._views[name] = SplitView(self.path, name, self.targets, self.dims,
                                          self.manifest["splits"][name])
        return self._views[name]

    def nbytes(self) -> int:
        """Returns the store's size on disk in bytes (all files)."""
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())


def _check_manifest(manifest: Any, file: Path) -> None:
    required = ("format_version", "targets", "steps", "modalities", "splits", "provenance")
    if not isinstance(manifest, dict) or any(k not in manifest for k in required):
        raise StoreError(f"{file}: expected keys {list(required)}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise StoreError(f"{file}: format_version {manifest['format_version']}, "
                         f"this emimimic reads {FORMAT_VERSION}")
    if manifest["steps"] != STEPS:
        raise StoreError(f"{file}: steps {manifest['steps']}, expected {STEPS}")
    for m, spec in manifest["modalities"].items():
        if spec.get("dtype") != "float16" or int(spec.get("dim", 0)) < 1:
            raise StoreError(f"{file}: modality {m!r} must have dim >= 1 and dtype float16: {spec}")
    if not manifest["modalities"]:
        raise StoreError(f"{file}: the store has no modalities")


# ----------------------------------------------------------------------------------------------
# Writer (shared by `emimimic pack` and `emimimic synth`)
# ----------------------------------------------------------------------------------------------


class SplitPlan:
    """What one split of a store will hold: its ids and labels (None for an unlabelled split)."""

    def __init__(self, name: str, ids: Sequence[str], labels: np.ndarray | None) -> None:
        self.name = name
        self.ids = list(ids)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.float64)


class StoreWriter:
    """Writes a store into ``DEST.partial/`` clip by clip, resumably, and publishes it atomically.

    Usage: ``writer = StoreWriter(dest, targets, dims, plans, provenance)``; for each split, for
    clip ``writer.done(split)`` onward, ``writer.add(split, {modality: raw [T, D] array or None})``;
    then ``writer.finish()``. Progress is recorded in ``progress.json`` after each clip's data is
    flushed; a new writer on the same ``DEST.partial`` with the same plan truncates anything past
    the recorded point and continues from there. ``finish`` writes the indexes, then
    ``manifest.json``, then renames ``DEST.partial`` to ``DEST``.
    """

    def __init__(self, dest: str | os.PathLike[str], targets: Sequence[str],
                 dims: Mapping[str, int], plans: Sequence[SplitPlan],
                 provenance: Mapping[str, Any]) -> None:
        self.dest = Path(dest)
        if self.dest.exists():
            raise StoreError(f"{self.dest}: destination already exists; "
                             "choose a new path or remove it first")
        self.partial = Path(f"{self.dest}.partial")
        self.targets = list(targets)
        self.dims = {m: int(d) for m, d in dims.items()}
        self.plans = {p.name: p for p in plans}
        self.provenance = dict(provenance)
        self.fingerprint = self._fingerprint()
        self._files: dict[str, tuple[Any, Any]] = {}
        self._complete = False
        self._progress = self._open_partial()

    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps([self.targets, self.dims, self.provenance], sort_keys=True).encode())
        for p in self.plans.values():
            h.update(json.dumps([p.name, p.ids]).encode())
            h.update(b"" if p.labels is None else np.ascontiguousarray(p.labels).tobytes())
        return h.hexdigest()

    def _open_partial(self) -> dict[str, Any]:
        progress_file = self.partial / PROGRESS
        if (self.partial / MANIFEST).is_file() and not progress_file.is_file():
            # a crash between writing the manifest and the rename: the data is complete
            self._complete = True
            return {"splits": {n: {"done": len(p.ids)} for n, p in self.plans.items()}}
        if self.partial.exists():
            if not progress_file.is_file():
                raise StoreError(f"{self.partial}: exists without {PROGRESS}; "
                                 "remove it to start over")
            progress = json.loads(progress_file.read_text(encoding="utf-8"))
            if progress.get("fingerprint") != self.fingerprint:
                raise StoreError(f"{self.partial}: an unfinished store built from different inputs "
                                 "(splits, labels, dims, targets or provenance); remove it or "
                                 "rerun with the same arguments")
            self._truncate(progress)
            return progress
        self.partial.mkdir(parents=True)
        progress = {"fingerprint": self.fingerprint,
                    "splits": {n: {"done": 0, "rows": dict.fromkeys(self.dims, 0)}
                               for n in self.plans}}
        for name, plan in self.plans.items():
            (self.partial / name).mkdir()
            write_labels_csv(self.partial / name / LABELS, self.targets, plan.ids, plan.labels)
            for m in self.dims:
                (self.partial / name / f"{m}.f16").touch()
                (self.partial / name / f"{m}.index.part").touch()
        self._write_progress(progress)
        return progress

    def _truncate(self, progress: dict[str, Any]) -> None:
        """Cuts data and index files back to the last recorded clip (a crash may have left more)."""
        for name, state in progress["splits"].items():
            for m, dim in self.dims.items():
                folder = self.partial / name
                os.truncate(folder / f"{m}.f16", state["rows"][m] * dim * 2)
                os.truncate(folder / f"{m}.index.part", state["done"] * 3 * 8)

    def _write_progress(self, progress: dict[str, Any]) -> None:
        tmp = self.partial / f"{PROGRESS}.tmp"
        tmp.write_text(json.dumps(progress, sort_keys=True), encoding="utf-8")
        os.replace(tmp, self.partial / PROGRESS)

    def done(self, split: str) -> int:
        """Returns how many clips of ``split`` are already written (where to continue)."""
        return int(self._progress["splits"][split]["done"])

    def _handles(self, split: str) -> tuple[Any, Any]:
        if split not in self._files:
            folder = self.partial / split
            self._files[split] = (
                {m: open(folder / f"{m}.f16", "ab") for m in self.dims},  # noqa: SIM115
                {m: open(folder / f"{m}.index.part", "ab") for m in self.dims},  # noqa: SIM115
            )
        return self._files[split]

    def add(self, split: str, arrays: Mapping[str, np.ndarray | None],
            sources: Mapping[str, str] | None = None) -> None:
        """Validates and appends the next clip of ``split``; None for a modality means absent.

        Args:
            split: the split name.
            arrays: modality -> raw [T, D] (or [D]) array, or None when the clip has no data.
            sources: modality -> file the array came from, for error messages.

        Raises:
            StoreError: an array is invalid (nothing is written for this clip then), or every
                modality is absent.
        """
        state = self._progress["splits"][split]
        n = state["done"]
        plan = self.plans[split]
        if n >= len(plan.ids):
            raise StoreError(f"{self.partial / split}: all {len(plan.ids)} clips already written")
        clip = plan.ids[n]
        stored: dict[str, tuple[np.ndarray | None, int]] = {}
        for m, dim in self.dims.items():
            raw = arrays.get(m)
            if raw is None:
                stored[m] = (None, 0)
                continue
            src = (sources or {}).get(m, "<generated>")
            where = f"{src} (clip {clip}, modality {m})"
            stored[m] = rows_to_store(raw, dim, where)
        if all(rows is None for rows, _ in stored.values()):
            raise StoreError(f"clip {clip} of split {split!r}: no features in any modality "
                             f"({sorted(self.dims)})")
        data_files, index_files = self._handles(split)
        for m, (rows, raw_t) in stored.items():
            count = 0 if rows is None else rows.shape[0]
            if rows is not None:
                data_files[m].write(rows.tobytes())
            index_files[m].write(np.asarray([state["rows"][m], count, raw_t],
                                            dtype=np.int64).tobytes())
            state["rows"][m] += count
        for f in (*data_files.values(), *index_files.values()):
            f.flush()
        state["done"] = n + 1
        self._write_progress(self._progress)

    def close(self) -> None:
        """Closes open files (the partial folder stays for a later resume)."""
        for data_files, index_files in self._files.values():
            for f in (*data_files.values(), *index_files.values()):
                f.close()
        self._files = {}

    def finish(self) -> Path:
        """Writes indexes and the manifest, renames ``DEST.partial`` to ``DEST``; returns DEST.

        Raises:
            StoreError: some split is not complete.
        """
        self.close()
        if self._complete:
            os.replace(self.partial, self.dest)
            return self.dest
        splits: dict[str, Any] = {}
        for name, plan in self.plans.items():
            state = self._progress["splits"][name]
            if state["done"] != len(plan.ids):
                raise StoreError(f"{self.partial / name}: {state['done']} of {len(plan.ids)} "
                                 "clips written; cannot finish")
            present = {}
            for m in self.dims:
                part = self.partial / name / f"{m}.index.part"
                index = np.fromfile(part, dtype=np.int64).reshape(-1, 3)
                np.save(self.partial / name / f"{m}.index.npy", index)
                part.unlink()
                present[m] = int((index[:, 1] > 0).sum())
            splits[name] = {"count": len(plan.ids), "labelled": plan.labels is not None,
                            "present": present}
        manifest = {
            "format_version": FORMAT_VERSION,
            "targets": self.targets,
            "steps": STEPS,
            "modalities": {m: {"dim": d, "dtype": "float16"} for m, d in self.dims.items()},
            "splits": splits,
            "provenance": self.provenance,
        }
        for path in self.partial.rglob("*"):
            if path.is_file():
                _fsync(path)
        (self.partial / PROGRESS).unlink()
        # the manifest is the last file: a folder without it is never taken for a store
        text = json.dumps(manifest, indent=2) + "\n"
        (self.partial / MANIFEST).write_text(text, encoding="utf-8")
        _fsync(self.partial / MANIFEST)
        os.replace(self.partial, self.dest)
        return self.dest

def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def human_bytes(n: float) -> str:
    """Returns ``n`` bytes as a short human-readable string (e.g. ``"1.25 GB"``, decimal units)."""
    if n < 1000:
        return f"{int(n)} B"
    exp = min(int(math.log(n, 1000)), 4)
    return f"{n / 1000 ** exp:.2f} {'BKMGT'[exp]}B"
