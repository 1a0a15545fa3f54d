"""The feature store's on-disk format: file names, the manifest and the label files.

A store is a folder::

    STORE/manifest.json                 written LAST: a folder without it is not a store
    STORE/<split>/labels.csv            ABAW CSV: ``Filename`` + one column per target,
                                        or ``Filename`` only for an unlabelled split
    STORE/<split>/<modality>.f16        float16 rows [R, D], all clips of the split back to back
    STORE/<split>/<modality>.index.npy  int64 [N, 3] = (row_start, stored_rows, raw_T);
                                        stored_rows == 0 means the clip has no data for the modality
    STORE/<split>/weights.npy           float32 [N] per-clip sample weights (optional: splits
                                        whose manifest entry says ``"weighted": true``)

``manifest.json`` holds ``format_version``, ``targets`` (names, in label-column order), ``steps``
(128), ``modalities`` ({name: {dim, dtype: "float16"}}), ``splits`` ({name: {count, labelled,
present: {modality: clips with data}, weighted (optional, default false)}}) and ``provenance``
(where the features came from; synthetic stores say so there).

Storage rule: a clip whose raw sequence has T > 128 steps is stored as its 128 pooled rows; a clip
with T <= 128 is stored raw (T rows) and pooled when read (:mod:`emimimic.pooling`). Either way
a read equals ``adaptive_avg_pool1d`` of the raw rows in float32, cast to float16.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from emimimic.constants import ID_COLUMN, STEPS
from emimimic.errors import UserError

#: Version of the folder format; readers refuse other versions.
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LABELS = "labels.csv"
WEIGHTS = "weights.npy"
#: Largest magnitude a float16 can hold; larger raw values cannot be stored faithfully.
FLOAT16_MAX = 65504.0


class StoreError(UserError, ValueError):
    """Raised for an invalid store, input file or request; the message names file, clip and rule."""


def data_file(split_dir: Path, modality: str) -> Path:
    """Returns the path of a split's float16 rows of ``modality``."""
    return split_dir / f"{modality}.f16"


def index_file(split_dir: Path, modality: str) -> Path:
    """Returns the path of a split's finished index of ``modality``."""
    return split_dir / f"{modality}.index.npy"


def check_weights(weights: np.ndarray, where: str, ids: Sequence[str] | None = None) -> np.ndarray:
    """Returns per-clip sample weights as float32 [N] after checking them.

    Raises:
        StoreError: a weight is not finite or negative (naming the clip when ``ids`` are given),
            or all are zero.
    """
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    bad = ~np.isfinite(w) | (w < 0)
    if bad.any():
        i = int(np.argmax(bad))
        clip = f" (clip {ids[i]})" if ids is not None else ""
        raise StoreError(f"{where}: sample weight {w[i]!r} at row {i}{clip}; expected a finite "
                         "number >= 0")
    if w.size and not (w > 0).any():
        raise StoreError(f"{where}: every sample weight is 0; expected some clip to count")
    return w.astype(np.float32)


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


def read_labels_csv(path: Path, targets: Sequence[str], labelled: bool
                    ) -> tuple[list[str], np.ndarray | None]:
    """Returns (ids, float32 labels [N, K] or None) of a store's ``labels.csv``.

    Raises:
        StoreError: the header does not match the manifest's targets.
    """
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


def check_manifest(manifest: Any, file: Path) -> None:
    """Checks a parsed manifest's keys, version, steps and modality specs.

    Raises:
        StoreError: naming the manifest file and what is wrong.
    """
    required = ("format_version", "targets", "steps", "modalities", "splits", "provenance")
    if not isinstance(manifest, dict) or any(k not in manifest for k in required):
        raise StoreError(f"{file}: expected keys {list(required)}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise StoreError(f"{file}: format_version {manifest['format_version']}, "
                         f"this emimimic reads {FORMAT_VERSION}")
    if manifest["steps"] != STEPS:
        raise StoreError(f"{file}: steps {manifest['steps']}, expected {STEPS}")
    if not manifest["modalities"]:
        raise StoreError(f"{file}: the store has no modalities")
    for m, spec in manifest["modalities"].items():
        if spec.get("dtype") != "float16" or int(spec.get("dim", 0)) < 1:
            raise StoreError(f"{file}: modality {m!r} must have dim >= 1 and dtype float16: {spec}")


def make_manifest(targets: Sequence[str], dims: dict[str, int], splits: dict[str, Any],
                  provenance: dict[str, Any]) -> dict[str, Any]:
    """Returns the manifest of a finished store (the inverse of :func:`check_manifest`)."""
    return {
        "format_version": FORMAT_VERSION,
        "targets": list(targets),
        "steps": STEPS,
        "modalities": {m: {"dim": d, "dtype": "float16"} for m, d in dims.items()},
        "splits": splits,
        "provenance": provenance,
    }


def human_bytes(n: float) -> str:
    """Returns ``n`` bytes as a short human-readable string (e.g. ``"1.25 GB"``, decimal units)."""
    if n < 1000:
        return f"{int(n)} B"
    exp = min(int(math.log(n, 1000)), 4)
    return f"{n / 1000 ** exp:.2f} {'BKMGT'[exp]}B"
