"""Writing a feature store: validated clips appended resumably, published atomically."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emimimic.constants import STEPS
from emimimic.data.store.format import (
    FLOAT16_MAX,
    LABELS,
    MANIFEST,
    WEIGHTS,
    StoreError,
    check_weights,
    data_file,
    index_file,
    make_manifest,
    safe_name,
    write_labels_csv,
)
from emimimic.files import write_atomic
from emimimic.pooling import pool_reference

PROGRESS = "progress.json"
#: Per split in ``DEST.partial``: one JSON line per written clip, where its data came from.
ORIGINS = "origins.part"


@dataclass
class SplitSpec:
    """What one split of a store will hold: its clip ids, labels and sample weights.

    Attributes:
        name: the split's name.
        ids: clip ids, in store order.
        labels: float [N, K] labels, or None for an unlabelled split.
        weights: float [N] per-clip sample weights for the loss, or None.
    """

    name: str
    ids: list[str]
    labels: np.ndarray | None
    weights: np.ndarray | None = None

    def __post_init__(self) -> None:
        safe_name(self.name, "split")
        self.ids = list(self.ids)
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.float64)
            if self.labels.ndim != 2 or self.labels.shape[0] != len(self.ids):
                raise StoreError(f"split {self.name!r}: labels of shape {self.labels.shape} for "
                                 f"{len(self.ids)} clips; expected [{len(self.ids)}, K]")
            bad = ~((self.labels >= 0) & (self.labels <= 1))  # (NaN is bad too)
            if bad.any():
                n, k = np.argwhere(bad)[0]
                raise StoreError(f"split {self.name!r}: label {self.labels[n, k]!r} of clip "
                                 f"{self.ids[n]} (column {k}); expected a number in [0, 1]")
        if self.weights is not None:
            self.weights = check_weights(self.weights, f"split {self.name!r}", self.ids)
            if self.weights.shape != (len(self.ids),):
                raise StoreError(f"split {self.name!r}: {self.weights.shape[0]} sample weights "
                                 f"for {len(self.ids)} clips")


@dataclass
class StoredClip:
    """One clip ready to append: per modality its float16 rows (None: absent) and raw length."""

    rows: dict[str, np.ndarray | None]
    raw_lengths: dict[str, int]


def stored_rows(raw: np.ndarray, dim: int, where: str) -> tuple[np.ndarray, int]:
    """Returns (float16 rows to store, raw length T) for a raw clip sequence, after validating it.

    Clips with T > 128 are pooled to 128 rows here; shorter ones are stored raw.

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
    # torch's float16 conversion: the same rounding as numpy's, ~50x faster
    return torch.from_numpy(arr32).half().numpy(), arr32.shape[0]


def prepare_clip(arrays: Mapping[str, np.ndarray | None], dims: Mapping[str, int], clip: str,
                 sources: Mapping[str, str] | None = None) -> StoredClip:
    """Returns a clip's validated rows per modality (a pure function: runs in pack's workers).

    Args:
        arrays: modality -> raw [T, D] (or [D]) array, or None when the clip has no data.
        dims: modality -> the D each modality must have.
        clip: the clip id, for error messages.
        sources: modality -> the file the array came from, for error messages.

    Raises:
        StoreError: an array is invalid, or every modality is absent.
    """
    rows: dict[str, np.ndarray | None] = {}
    lengths: dict[str, int] = {}
    for m, dim in dims.items():
        raw = arrays.get(m)
        if raw is None:
            rows[m], lengths[m] = None, 0
            continue
        where = f"{(sources or {}).get(m, '<generated>')} (clip {clip}, modality {m})"
        rows[m], lengths[m] = stored_rows(raw, dim, where)
    if all(r is None for r in rows.values()):
        raise StoreError(f"clip {clip}: no features in any modality ({sorted(dims)})")
    return StoredClip(rows, lengths)


class StoreWriter:
    """Writes a store into ``DEST.partial/`` clip by clip, resumably, and publishes it atomically.

    Usage: ``writer = StoreWriter(dest, targets, dims, splits, provenance)``; for each split, for
    clip ``writer.done(split)`` onward, ``writer.add(split, {modality: raw [T, D] array or None})``
    (or ``writer.append(split, prepare_clip(...))``); then ``writer.finish()``. Progress is recorded
    in ``progress.json`` after each clip's data is flushed; a new writer on the same
    ``DEST.partial`` with the same inputs truncates anything past the recorded point and continues
    from there. ``finish`` writes the indexes, then ``manifest.json``, then renames
    ``DEST.partial`` to ``DEST``.

    Clips read from files record where they came from (``origin``: e.g. each file's size, mtime
    and a hash of its ends); a resuming caller compares :meth:`origins` with the files now and
    :meth:`rewind` s a split to its first clip whose files changed, so a resumed store never
    keeps rows of files that were edited since.
    """

    def __init__(self, dest: str | os.PathLike[str], targets: Sequence[str],
                 dims: Mapping[str, int], splits: Sequence[SplitSpec],
                 provenance: Mapping[str, Any]) -> None:
        self.dest = Path(dest)
        if self.dest.exists():
            raise StoreError(f"{self.dest}: destination already exists; "
                             "choose a new path or remove it first")
        self.partial = Path(f"{self.dest}.partial")
        self.targets = list(targets)
        if (not all(isinstance(t, str) and t for t in self.targets)
                or len(set(self.targets)) != len(self.targets)):
            raise StoreError(f"targets {self.targets}: expected distinct, non-empty names")
        self.dims = {safe_name(m, "modality"): d for m, d in dims.items()}
        if (not self.dims or not all(isinstance(d, int | np.integer) for d in self.dims.values())
                or min(self.dims.values()) < 1):
            raise StoreError(f"dims {self.dims}: expected at least one modality, each D >= 1")
        self.splits = {s.name: s for s in splits}
        if not self.splits or len(self.splits) != len(splits):
            raise StoreError(f"splits {[s.name for s in splits]}: expected at least one split, "
                             "each name once")
        self.dims = {m: int(d) for m, d in self.dims.items()}
        for spec in self.splits.values():
            if spec.labels is not None and spec.labels.shape[1] != len(self.targets):
                raise StoreError(f"split {spec.name!r}: {spec.labels.shape[1]} label columns "
                                 f"for {len(self.targets)} targets")
        self.provenance = dict(provenance)
        self._files: dict[str, tuple[dict[str, Any], dict[str, Any], Any]] = {}
        self._complete = False
        self._progress = self._open_partial()

    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps([self.targets, self.dims, self.provenance], sort_keys=True).encode())
        for s in self.splits.values():
            h.update(json.dumps([s.name, s.ids]).encode())
            h.update(b"" if s.labels is None else np.ascontiguousarray(s.labels).tobytes())
            if s.weights is not None:  # (stores without weights keep their old fingerprint)
                h.update(b"weights" + s.weights.tobytes())
        return h.hexdigest()

    def _index_part(self, split: str, m: str) -> Path:
        return self.partial / split / f"{m}.index.part"

    def _origins_part(self, split: str) -> Path:
        return self.partial / split / ORIGINS

    def _open_partial(self) -> dict[str, Any]:
        progress_file = self.partial / PROGRESS
        if (self.partial / MANIFEST).is_file() and not progress_file.is_file():
            # a crash between writing the manifest and the rename: the data is complete
            self._complete = True
            return {"splits": {n: {"done": len(s.ids)} for n, s in self.splits.items()}}
        fingerprint = self._fingerprint()
        if self.partial.exists():
            if not progress_file.is_file():
                raise StoreError(f"{self.partial}: exists without {PROGRESS}; "
                                 "remove it to start over")
            progress = self._read_progress(progress_file)
            if progress.get("fingerprint") != fingerprint:
                raise StoreError(f"{self.partial}: an unfinished store built from different inputs "
                                 "(splits, labels, dims, targets or provenance); remove it or "
                                 "rerun with the same arguments")
            self._truncate(progress)
            return progress
        self.partial.mkdir(parents=True)
        progress = {"fingerprint": fingerprint,
                    "splits": {n: {"done": 0, "rows": dict.fromkeys(self.dims, 0), "origins": 0}
                               for n in self.splits}}
        for name, spec in self.splits.items():
            (self.partial / name).mkdir()
            write_labels_csv(self.partial / name / LABELS, self.targets, spec.ids, spec.labels)
            if spec.weights is not None:
                np.save(self.partial / name / WEIGHTS, spec.weights, allow_pickle=False)
            for m in self.dims:
                data_file(self.partial / name, m).touch()
                self._index_part(name, m).touch()
            self._origins_part(name).touch()
        self._write_progress(progress)
        return progress

    def _read_progress(self, path: Path) -> dict[str, Any]:
        """Returns a partial store's progress record after checking its shape."""
        try:
            progress = json.loads(path.read_text(encoding="utf-8"))
            states = progress["splits"]
            ok = set(states) == set(self.splits) and all(
                isinstance(st["done"], int) and 0 <= st["done"] <= len(self.splits[n].ids)
                and set(st["rows"]) == set(self.dims)
                and all(isinstance(r, int) and r >= 0 for r in st["rows"].values())
                and isinstance(st.get("origins", 0), int) and st.get("origins", 0) >= 0
                for n, st in states.items())
        except (ValueError, TypeError, KeyError, AttributeError, OSError):
            ok = False
        if not ok:
            raise StoreError(f"{path}: damaged progress record of an unfinished store; remove "
                             f"{self.partial} to start over")
        return progress

    def _truncate(self, progress: dict[str, Any]) -> None:
        """Cuts data and index files back to the last recorded clip (a crash may have left more).

        A split recorded without the origins of its clips (a partial store of an older emimimic)
        starts over: nothing says which files its rows came from.
        """
        for name, state in progress["splits"].items():
            if "origins" not in state:
                state.update(done=0, rows=dict.fromkeys(self.dims, 0), origins=0)
            for m, dim in self.dims.items():
                os.truncate(data_file(self.partial / name, m), state["rows"][m] * dim * 2)
                os.truncate(self._index_part(name, m), state["done"] * 3 * 8)
            origins = self._origins_part(name)
            origins.touch()
            os.truncate(origins, state["origins"])
        self._write_progress(progress)

    def origins(self, split: str) -> list[Any]:
        """Returns the recorded origin of each clip of ``split`` written so far, in order.

        An origin is what :meth:`append` was given (None for generated clips), after a JSON
        round trip (tuples come back as lists).

        Raises:
            StoreError: the record does not hold one origin per written clip (it was damaged).
        """
        done = self.done(split)
        if self._complete:
            return [None] * done
        path = self._origins_part(split)
        lines = path.read_bytes().split(b"\n")[:-1] if done else []
        try:
            records = [json.loads(line) for line in lines]
        except ValueError:
            records = []
        if len(records) != done:
            raise StoreError(f"{path}: {len(records)} readable clip origins for {done} written "
                             f"clips; remove {self.partial} to start over")
        return records

    def rewind(self, split: str, clips: int) -> None:
        """Cuts ``split`` back to its first ``clips`` clips (those after are written again).

        Raises:
            StoreError: ``clips`` is more than the split has written.
        """
        done = self.done(split)
        if not 0 <= clips <= done:
            raise StoreError(f"{self.partial / split}: cannot rewind to {clips} clips, "
                             f"{done} are written")
        if clips == done or self._complete:
            return
        self.close()
        state = self._progress["splits"][split]
        for m in self.dims:
            entry = np.fromfile(self._index_part(split, m), dtype=np.int64, count=3,
                                offset=clips * 3 * 8)
            state["rows"][m] = int(entry[0])  # the first row of clip ``clips``
        lines = self._origins_part(split).read_bytes().split(b"\n")
        state["origins"] = sum(len(line) + 1 for line in lines[:clips])
        state["done"] = clips
        self._truncate(self._progress)

    def _write_progress(self, progress: dict[str, Any]) -> None:
        write_atomic(self.partial / PROGRESS, json.dumps(progress, sort_keys=True))

    def done(self, split: str) -> int:
        """Returns how many clips of ``split`` are already written (where to continue)."""
        return int(self._progress["splits"][split]["done"])

    def next_clip(self, split: str) -> str:
        """Returns the id of the next clip of ``split`` to write.

        Raises:
            StoreError: the split is complete.
        """
        spec, n = self.splits[split], self.done(split)
        if n >= len(spec.ids):
            raise StoreError(f"{self.partial / split}: all {len(spec.ids)} clips already written")
        return spec.ids[n]

    def _handles(self, split: str) -> tuple[dict[str, Any], dict[str, Any], Any]:
        if split not in self._files:
            folder = self.partial / split
            self._files[split] = (
                {m: open(data_file(folder, m), "ab") for m in self.dims},  # noqa: SIM115
                {m: open(self._index_part(split, m), "ab") for m in self.dims},  # noqa: SIM115
                open(self._origins_part(split), "ab"),  # noqa: SIM115
            )
        return self._files[split]

    def add(self, split: str, arrays: Mapping[str, np.ndarray | None],
            sources: Mapping[str, str] | None = None, origin: Any = None) -> None:
        """Validates and appends the next clip of ``split``; None for a modality means absent.

        Args:
            split: the split.
            arrays: modality -> raw [T, D] (or [D]) array, or None when the clip has no data.
            sources: modality -> the file the array came from, for error messages.
            origin: where the data came from, recorded for resumes (see :meth:`append`).

        Raises:
            StoreError: an array is invalid (nothing is written for this clip then), or every
                modality is absent.
        """
        self.append(split, prepare_clip(arrays, self.dims, self.next_clip(split), sources),
                    origin)

    def append(self, split: str, clip: StoredClip, origin: Any = None) -> None:
        """Appends the next clip of ``split``, already validated by :func:`prepare_clip`.

        Args:
            split: the split.
            clip: the prepared clip.
            origin: a JSON-able record of the clip's sources (e.g. each file's size, mtime and
                content hash; None for generated data), kept in ``DEST.partial`` so that a resume
                can tell whether the rows are still those of the files (:meth:`origins`).
        """
        self.next_clip(split)
        state = self._progress["splits"][split]
        data_files, index_files, origins = self._handles(split)
        for m, rows in clip.rows.items():
            count = 0 if rows is None else rows.shape[0]
            if rows is not None:
                data_files[m].write(rows.tobytes())
            index_files[m].write(np.asarray([state["rows"][m], count, clip.raw_lengths[m]],
                                            dtype=np.int64).tobytes())
            state["rows"][m] += count
        line = json.dumps(origin, sort_keys=True, separators=(",", ":")).encode() + b"\n"
        origins.write(line)
        for f in (*data_files.values(), *index_files.values(), origins):
            f.flush()
        state["done"] += 1
        state["origins"] += len(line)
        self._write_progress(self._progress)

    def close(self) -> None:
        """Closes open files (the partial folder stays for a later resume)."""
        for data_files, index_files, origins in self._files.values():
            for f in (*data_files.values(), *index_files.values(), origins):
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
        for name, spec in self.splits.items():
            done = self.done(name)
            if done != len(spec.ids):
                raise StoreError(f"{self.partial / name}: {done} of {len(spec.ids)} "
                                 "clips written; cannot finish")
            present = {}
            for m in self.dims:
                part = self._index_part(name, m)
                index = np.fromfile(part, dtype=np.int64).reshape(-1, 3)
                np.save(index_file(self.partial / name, m), index)
                part.unlink()
                present[m] = int((index[:, 1] > 0).sum())
            splits[name] = {"count": len(spec.ids), "labelled": spec.labels is not None,
                            "present": present}
            if spec.weights is not None:
                splits[name]["weighted"] = True
            self._origins_part(name).unlink(missing_ok=True)
        for path in self.partial.rglob("*"):
            if path.is_file():
                _fsync(path)
        (self.partial / PROGRESS).unlink()
        # the manifest is the last file: a folder without it is never taken for a store
        manifest = make_manifest(self.targets, self.dims, splits, self.provenance)
        (self.partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n",
                                             encoding="utf-8")
        _fsync(self.partial / MANIFEST)
        os.replace(self.partial, self.dest)
        return self.dest


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
