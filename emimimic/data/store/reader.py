"""Reading a feature store: a split's ids, labels, presence and rows, larger than RAM or not."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from emimimic.constants import STEPS
from emimimic.data.store.format import (
    LABELS,
    MANIFEST,
    WEIGHTS,
    StoreError,
    check_manifest,
    check_weights,
    data_file,
    index_file,
    load_npy,
    read_labels_csv,
)


class SplitView:
    """One split of a :class:`FeatureStore`: ids, labels, presence, stored rows and pooled reads.

    Rows come from the file by positional reads, which copy straight from the page cache into the
    caller's buffer (nothing is mapped into the process, so resident memory stays flat however
    large the store is), or from RAM after :meth:`preload`. Open files are per process and never
    pickled, so a view can be handed to DataLoader workers.
    """

    def __init__(self, root: Path, name: str, targets: Sequence[str], dims: Mapping[str, int],
                 info: Mapping[str, Any]) -> None:
        self.root = root
        self.name = name
        self.folder = root / name
        self.dims = dict(dims)
        self.labelled = bool(info["labelled"])
        if not self.folder.is_dir():
            raise StoreError(f"{self.folder}: missing folder of split {name!r}, which the "
                             f"manifest lists")
        self.ids, self.labels = read_labels_csv(self.folder / LABELS, targets, self.labelled)
        if len(self.ids) != info["count"]:
            raise StoreError(f"{self.folder / LABELS}: {len(self.ids)} clips, "
                             f"manifest says {info['count']} (splits.{name}.count)")
        #: float32 [N] per-clip sample weights, or None when the split has none.
        self.weights = self._read_weights() if info.get("weighted") else None
        self._index = {m: self._check_index(m, dim, info["present"][m])
                       for m, dim in self.dims.items()}
        self._files: dict[str, Any] = {}
        self._preloaded: dict[str, np.ndarray] = {}
        self._pid = os.getpid()

    def _read_weights(self) -> np.ndarray:
        path = self.folder / WEIGHTS
        if not path.is_file():
            raise StoreError(f"{path}: missing; the manifest says split {self.name!r} is weighted")
        weights = load_npy(path, np.float32, (len(self.ids),), "sample weights")
        return check_weights(weights, str(path), self.ids)

    def _check_index(self, m: str, dim: int, present: int) -> np.ndarray:
        path = index_file(self.folder, m)
        if not path.is_file():
            raise StoreError(f"{path}: missing index file of modality {m!r} in split {self.name!r}")
        n = len(self.ids)
        index = load_npy(path, np.int64, (n, 3), "index")
        start, rows, raw_t = index.T
        ends = np.cumsum(rows)
        bad = (start != ends - rows) | (rows != np.minimum(raw_t, STEPS)) | (raw_t < 0)
        if bad.any():
            i = int(np.argmax(bad))
            raise StoreError(f"{path}: inconsistent row {i} (clip {self.ids[i]}): "
                             f"{index[i].tolist()}; expected (row_start, stored_rows, raw_T) "
                             f"with clips back to back and stored_rows = min(raw_T, {STEPS})")
        if int((rows > 0).sum()) != present:
            raise StoreError(f"{path}: {int((rows > 0).sum())} clips with data, the manifest says "
                             f"{present} (splits.{self.name}.present.{m})")
        data = data_file(self.folder, m)
        expected = int(ends[-1] if n else 0) * dim * 2
        if not data.is_file() or data.stat().st_size != expected:
            size = data.stat().st_size if data.is_file() else "missing"
            raise StoreError(f"{data}: expected {expected} bytes ({dim}-d float16 rows), "
                             f"got {size}")
        return np.ascontiguousarray(index)

    def __len__(self) -> int:
        return len(self.ids)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_files"] = {}  # files are reopened lazily in the receiving process
        return state

    def _modality(self, m: str) -> str:
        if m not in self.dims:
            raise StoreError(f"{self.root}: modality {m!r} not in the store "
                             f"(it has {sorted(self.dims)})")
        return m

    def present(self, m: str) -> np.ndarray:
        """Returns a bool [N] array: True where clip i has data for modality ``m``."""
        return self._index[self._modality(m)][:, 1] > 0

    def stored_rows(self, m: str) -> np.ndarray:
        """Returns the int64 [N] stored row counts of ``m``: 0 absent, else ``min(T, 128)``."""
        return self._index[self._modality(m)][:, 1].copy()

    def raw_lengths(self, m: str) -> np.ndarray:
        """Returns the int64 [N] raw sequence lengths T of modality ``m`` (0 where absent)."""
        return self._index[self._modality(m)][:, 2].copy()

    def row_starts(self, m: str) -> np.ndarray:
        """Returns the int64 [N] first stored row of each clip of ``m`` in its ``.f16`` file."""
        return self._index[self._modality(m)][:, 0].copy()

    def _file(self, m: str) -> Any:
        if self._pid != os.getpid():  # forked worker: open its own files
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(m)
        if f is None:
            f = self._files[m] = open(data_file(self.folder, m), "rb", buffering=0)  # noqa: SIM115
        return f

    def preload(self, modalities: Sequence[str] | None = None) -> None:
        """Reads the split's stored rows of the given modalities (default all) into RAM."""
        for m in modalities or list(self.dims):
            self._preloaded[m] = self.all_rows(m)

    def all_rows(self, m: str) -> np.ndarray:
        """Returns every stored row of modality ``m`` in file order, float16 [R, D] (reads it)."""
        path = data_file(self.folder, self._modality(m))
        return np.fromfile(path, dtype=np.float16).reshape(-1, self.dims[m])

    def read_rows(self, m: str, indices: Sequence[int] | np.ndarray,
                  out: np.ndarray | None = None) -> np.ndarray:
        """Returns the stored rows of clips ``indices`` of ``m`` back to back, float16 [R, D].

        Clip ``indices[k]`` contributes its ``stored_rows(m)[indices[k]]`` rows (0 when absent,
        its 128 pooled rows when T > 128, else its T raw rows), in the order of ``indices``; clips
        stored next to each other are read as one run.

        Args:
            m: the modality.
            indices: clip positions in the split.
            out: a C-contiguous float16 [R, D] array to fill; None allocates one.

        Raises:
            StoreError: ``out`` has the wrong shape or dtype, or the file is shorter than its index
                says (it changed after the store was opened).
        """
        dim = self.dims[self._modality(m)]
        run_starts, run_rows, total = self._runs(m, indices)
        if out is None:
            out = np.empty((total, dim), dtype=np.float16)
        elif out.shape != (total, dim) or out.dtype != np.float16 or not out.flags.c_contiguous:
            raise StoreError(f"{data_file(self.folder, m)}: read_rows needs a C-contiguous float16 "
                             f"[{total}, {dim}] output, got {out.dtype} {tuple(out.shape)}")
        pos = 0
        if m in self._preloaded:
            data = self._preloaded[m]
            for start, rows in zip(run_starts, run_rows, strict=True):
                out[pos:pos + rows] = data[start:start + rows]
                pos += rows
            return out
        row_bytes = dim * 2
        flat = out.reshape(-1).view(np.uint8)
        for start, rows in zip(run_starts, run_rows, strict=True):
            self._pread(m, flat[pos:pos + rows * row_bytes], start * row_bytes)
            pos += rows * row_bytes
        return out

    def _pread(self, m: str, buf: np.ndarray, offset: int) -> None:
        """Fills ``buf`` from ``m.f16`` at ``offset``, looping over short reads."""
        f, done = self._file(m), 0
        while done < buf.nbytes:
            if hasattr(os, "preadv"):
                got = os.preadv(f.fileno(), [buf[done:]], offset + done)
            else:  # no positional reads on this platform: seek in this process's own file
                f.seek(offset + done)
                got = f.readinto(memoryview(buf[done:]))
            if not got:
                index = self._index[m]
                row = (offset + done) // (self.dims[m] * 2)
                clip = self.ids[int(np.searchsorted(index[:, 0] + index[:, 1], row, side="right"))]
                raise StoreError(f"{data_file(self.folder, m)}: file ends at byte "
                                 f"{offset + done} inside clip {clip}, whose index entry needs "
                                 f"{offset + buf.nbytes} bytes; the store changed after opening")
            done += got

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
        DataLoader worker can run ahead of the main process's :meth:`read_rows` even when the
        store is larger than RAM. Preloaded modalities, and systems without ``posix_fadvise``,
        are skipped. Returns the number of bytes advised.
        """
        if not hasattr(os, "posix_fadvise"):
            return 0
        advised = 0
        for m in modalities:
            if m in self._preloaded:
                continue
            for offset, length in self.byte_ranges(m, indices):
                os.posix_fadvise(self._file(m).fileno(), offset, length, os.POSIX_FADV_WILLNEED)
                advised += length
        return advised

    def read_batch(self, m: str, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Returns clips ``indices`` of modality ``m`` pooled to [B, 128, D] float16.

        Absent clips give zero rows; use :meth:`present` to tell them from real data.
        """
        import torch

        from emimimic.pooling import expand_rows

        idx = np.asarray(indices, dtype=np.int64)
        rows = torch.from_numpy(self.read_rows(m, idx))
        lengths = torch.from_numpy(self._index[self._modality(m)][idx, 1])
        return expand_rows(rows, lengths).numpy()

    def read(self, m: str, i: int) -> np.ndarray:
        """Returns clip ``i``'s modality ``m`` pooled to [128, D] float16 (zeros if absent)."""
        return self.read_batch(m, [i])[0]


class FeatureStore:
    """A feature store folder opened for reading; validates its manifest on construction.

    Attributes:
        path: the store folder.
        manifest: the parsed ``manifest.json``.
        targets: label column names, in order.
        dims: modality -> feature dimension D.
        splits: split names.
        provenance: where the features came from (synthetic stores say so).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        file = self.path / MANIFEST
        if not self.path.exists():
            partial = Path(f"{self.path}.partial")
            hint = (f"an unfinished build is in {partial}: rerun the same pack or synth"
                    if partial.exists() else
                    "build one with `emimimic synth` (demo data) or `emimimic pack`")
            raise StoreError(f"{self.path}: feature store does not exist; {hint}")
        if not file.is_file():
            raise StoreError(f"{self.path}: not a feature store, no {MANIFEST}")
        try:
            manifest = json.loads(file.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise StoreError(f"{file}: not UTF-8 text (byte {err.start}); expected JSON") from None
        except json.JSONDecodeError as err:
            raise StoreError(f"{file}: not valid JSON ({err})") from None
        except (OSError, RecursionError) as err:
            raise StoreError(f"{file}: cannot read the manifest ({err})") from None
        check_manifest(manifest, file)
        self.manifest: dict[str, Any] = manifest
        self.targets: list[str] = list(manifest["targets"])
        self.dims: dict[str, int] = {m: v["dim"] for m, v in manifest["modalities"].items()}
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
