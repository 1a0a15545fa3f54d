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
import os
import re
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple

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


#: What a split or modality name may be: it becomes a file or folder name in the store.
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
SAFE_NAME_RULE = "letters, digits, '_' and '-', not empty and not starting with '-'"


def safe_name(name: Any, what: str, where: str | os.PathLike[str] = "") -> str:
    """Returns ``name`` if it is safe as a file or folder name in a store; else raises.

    The one rule for every user string that becomes a path (split and modality names): ASCII
    letters, digits, ``_`` and ``-``, not empty, not starting with ``-``. So no name can climb
    out of its folder (``..``, ``/``), hide (``.x``) or pass for an option (``-x``).
    Target names are CSV column names, not file names, and are not restricted.

    Args:
        name: the name to check.
        what: what it names, e.g. ``"split"`` or ``"modality"`` (for the message).
        where: the file or option it came from (for the message).

    Raises:
        StoreError: the name breaks the rule (the message names it, ``where`` and the rule).
    """
    if isinstance(name, str) and _SAFE_NAME.fullmatch(name):
        return name
    prefix = f"{where}: " if str(where) else ""
    raise StoreError(f"{prefix}{what} name {name!r} is not allowed; a {what} name becomes a file "
                     f"name, so it may hold only {SAFE_NAME_RULE}")


def file_start(data: bytes, size: int = 8) -> str:
    """Returns the first bytes of a file, for a message: ``'hello wo...'`` or ``b'\\x93NUMPY'``."""
    head = data[:size]
    more = "..." if len(data) > size else ""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        return f"{head!r}{more}"
    if text.isprintable():
        return f"{text + more!r}"
    return f"{head!r}{more}"


class NpyHeader(NamedTuple):
    """What a ``.npy`` header says: the array's shape, dtype and order, and where data starts."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    offset: int

    @property
    def nbytes(self) -> int:
        """Returns how many data bytes the header promises (shape times item size)."""
        return math.prod(self.shape) * self.dtype.itemsize


def read_npy_header(f: Any, path: str | os.PathLike[str]) -> NpyHeader:
    """Returns the header of an open ``.npy`` file after checking it against the file's size.

    Reads only the magic string and the header (``f`` is left after it), so a header that claims
    10^12 rows costs nothing: the claim is compared with the file's size before any allocation.

    Raises:
        StoreError: not a ``.npy`` file, a damaged header, pickled (object) data, or a size that
            differs from what the header promises (a truncated file or a lying header).
    """
    size = os.fstat(f.fileno()).st_size
    head = f.read(len(np.lib.format.MAGIC_PREFIX) + 2)
    if not head.startswith(np.lib.format.MAGIC_PREFIX) or len(head) < 8:
        what = ("an empty file" if size == 0 else
                f"it starts with {file_start(head + f.read(len(head)), len(head))}")
        raise StoreError(f"{path}: not a .npy file ({what}); expected a numpy array saved "
                         "with numpy.save")
    version = (head[6], head[7])
    readers = {(1, 0): np.lib.format.read_array_header_1_0,
               (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        raise StoreError(f"{path}: .npy format version {version[0]}.{version[1]} is not "
                         "supported (expected 1.0 or 2.0)")
    try:
        shape, fortran, dtype = readers[version](f)
    except (ValueError, EOFError, OSError, SyntaxError, TypeError) as err:
        raise StoreError(f"{path}: damaged .npy header ({' '.join(str(err).split())})") from None
    header = NpyHeader(tuple(int(n) for n in shape), dtype, bool(fortran), f.tell())
    if dtype.hasobject:
        raise StoreError(f"{path}: holds pickled Python objects (dtype {dtype}); .npy files are "
                         "read without pickles, expected a numeric array")
    if any(n < 0 for n in header.shape):
        raise StoreError(f"{path}: damaged .npy header (shape {header.shape})")
    need = header.offset + header.nbytes
    if size != need:
        what = "truncated" if size < need else "has bytes after the array"
        raise StoreError(f"{path}: {size} bytes, but its header says {dtype} "
                         f"{list(header.shape)}, which needs {need} bytes ({what})")
    return header


def load_npy(path: str | os.PathLike[str], dtype: np.dtype | type | None = None,
             shape: Sequence[int | None] | None = None, what: str = "array") -> np.ndarray:
    """Returns the array of a ``.npy`` file, read without pickles after checking its header.

    Args:
        path: the file.
        dtype: the dtype it must have (None: any).
        shape: the shape it must have; None in it matches any size (None: any shape).
        what: what the file holds, for messages (e.g. ``"index"``).

    Raises:
        StoreError: missing or unreadable file, damaged or lying header, object data, or another
            dtype or shape than required (checked before the data is read).
    """
    try:
        f = open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        raise StoreError(f"{path}: missing {what} file") from None
    except OSError as err:
        raise StoreError(f"{path}: cannot read the {what} file ({err.strerror})") from None
    with f:
        header = read_npy_header(f, path)
        wrong_shape = shape is not None and (
            len(header.shape) != len(shape)
            or any(n is not None and n != h for n, h in zip(shape, header.shape, strict=True)))
        if (dtype is not None and header.dtype != np.dtype(dtype)) or wrong_shape:
            expected = " ".join(
                ([str(np.dtype(dtype))] if dtype is not None else [])
                + ([f"[{', '.join('N' if n is None else str(n) for n in shape)}]"]
                   if shape is not None else []))
            raise StoreError(f"{path}: expected {expected} {what}, got {header.dtype} "
                             f"{list(header.shape)}")
        f.seek(0)
        try:
            return np.lib.format.read_array(f, allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise StoreError(f"{path}: cannot read the {what} "
                             f"({' '.join(str(err).split())})") from None


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


#: A number written with a decimal point (``1.0``, ``00012.``, ``.5``), as spreadsheets and
#: pandas write integer ids.
_DECIMAL = re.compile(r"[0-9]+\.[0-9]*|\.[0-9]+")
ID_RULE = ("an integer (zero-padded to 5 digits: 1 and 1.0 mean clip 00001) or a plain file "
           "stem (no '/', '\\', leading '.' or control characters)")


def normalise_id(value: str, where: str) -> str:
    """Returns a clip id: integers zero-padded to 5 digits (ABAW ``Filename``), else the text.

    The rule: an integer (``1``, ``00001``) names clip ``00001``; so does an integer-valued
    number written with a decimal point (``1.0``, ``1.``, ``00001.000``, as spreadsheets and
    pandas write integer columns), while a decimal that is not an integer (``1.5``) is refused.
    Any other text is a file stem, used as it is, provided it could name a file in the feature
    folder: not empty, no path separator, no leading dot, no control character.

    Raises:
        StoreError: the id is empty, a non-integer number, or could not name a file (the message
            states the rule).
    """
    text = str(value).strip()
    if text.isascii() and text.isdigit():
        return text.zfill(5)
    if _DECIMAL.fullmatch(text):
        number = Decimal(text)
        if number == number.to_integral_value():
            return str(int(number)).zfill(5)
        raise StoreError(f"{where}: {ID_COLUMN} {value!r} is not a valid clip id: a number must "
                         f"be an integer; expected {ID_RULE}")
    if (not text or "/" in text or "\\" in text or text.startswith(".")
            or not text.isprintable()):
        raise StoreError(f"{where}: {ID_COLUMN} {value!r} is not a valid clip id; expected "
                         f"{ID_RULE}")
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
        StoreError: the file is missing or unreadable, the header does not match the manifest's
            targets, a row has another number of fields, an id is invalid or repeated, or a
            label is not a finite number in [0, 1] (naming the line, the clip and the column).
    """
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise StoreError(f"{path}: missing; every split of the store has a {LABELS}") from None
    except UnicodeDecodeError as err:
        raise StoreError(f"{path}: not UTF-8 text (byte {err.start}); expected the CSV "
                         "written by pack") from None
    except (OSError, csv.Error) as err:
        raise StoreError(f"{path}: cannot read the CSV ({' '.join(str(err).split())})") from None
    expected = [ID_COLUMN, *targets] if labelled else [ID_COLUMN]
    if not rows or rows[0] != expected:
        raise StoreError(f"{path}: header {rows[0] if rows else None} does not match the manifest, "
                         f"expected {expected}")
    ids: list[str] = []
    seen: dict[str, int] = {}
    labels = np.zeros((len(rows) - 1, len(targets) if labelled else 0), dtype=np.float32)
    for n, row in enumerate(rows[1:]):
        line = n + 2
        if len(row) != len(expected):
            clip = f" (clip {row[0]})" if row and row[0] else ""
            raise StoreError(f"{path}, line {line}{clip}: {len(row)} fields, expected "
                             f"{len(expected)} ({', '.join(expected)})")
        clip = normalise_id(row[0], f"{path}, line {line}")
        if clip != row[0]:
            raise StoreError(f"{path}, line {line}: {ID_COLUMN} {row[0]!r} is not written as "
                             f"the store writes ids (expected {clip!r})")
        if clip in seen:
            raise StoreError(f"{path}, line {line}: duplicate clip id {clip} "
                             f"(first on line {seen[clip]})")
        seen[clip] = line
        ids.append(clip)
        for k, (name, text) in enumerate(zip(expected[1:], row[1:], strict=True)):
            try:
                value = float(text)
            except ValueError:
                value = math.nan
            if not 0.0 <= value <= 1.0:  # (False for NaN)
                raise StoreError(f"{path}, line {line}, clip {clip}, column {name!r}: label "
                                 f"{text!r} is not a number in [0, 1]")
            labels[n, k] = value
    return ids, (labels if labelled else None)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_manifest(manifest: Any, file: Path) -> None:
    """Checks every field of a parsed manifest: keys, types, version, steps, names and counts.

    Checks ``format_version`` and ``steps`` (integers of the right value), ``targets`` (distinct
    non-empty strings), ``modalities`` (safe names, each ``{"dim": int >= 1, "dtype":
    "float16"}``), ``splits`` (safe names, each ``{"count": int >= 0, "labelled": bool,
    "present": {modality: int in [0, count]} for every modality, "weighted": bool (optional)}``)
    and ``provenance`` (an object). What the split files hold is checked when a split is opened.

    Raises:
        StoreError: naming the manifest file, the field and what is wrong.
    """
    required = ("format_version", "targets", "steps", "modalities", "splits", "provenance")
    if not isinstance(manifest, dict):
        raise StoreError(f"{file}: expected a JSON object with keys {list(required)}, got "
                         f"{type(manifest).__name__}")
    lacking = [k for k in required if k not in manifest]
    if lacking:
        raise StoreError(f"{file}: no {', '.join(repr(k) for k in lacking)}; expected keys "
                         f"{list(required)}")
    version = manifest["format_version"]
    if not _is_int(version) or version != FORMAT_VERSION:
        raise StoreError(f"{file}: format_version {version!r}, this emimimic reads "
                         f"{FORMAT_VERSION}")
    if not _is_int(manifest["steps"]) or manifest["steps"] != STEPS:
        raise StoreError(f"{file}: steps {manifest['steps']!r}, expected {STEPS}")
    targets = manifest["targets"]
    if (not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets)
            or len(set(targets)) != len(targets)):
        raise StoreError(f"{file}: \"targets\" is {targets!r}; expected a list of distinct, "
                         "non-empty names")
    modalities = manifest["modalities"]
    if not isinstance(modalities, dict) or not modalities:
        raise StoreError(f"{file}: \"modalities\" is {modalities!r}; expected an object "
                         "{name: {\"dim\": D, \"dtype\": \"float16\"}} with at least one modality")
    for m, spec in modalities.items():
        safe_name(m, "modality", f"{file}, \"modalities\"")
        if (not isinstance(spec, dict) or spec.get("dtype") != "float16"
                or not _is_int(spec.get("dim")) or spec["dim"] < 1):
            raise StoreError(f"{file}: modalities.{m} is {spec!r}; expected {{\"dim\": an "
                             "integer >= 1, \"dtype\": \"float16\"}")
    splits = manifest["splits"]
    if not isinstance(splits, dict) or not splits:
        raise StoreError(f"{file}: \"splits\" is {splits!r}; expected an object {{name: "
                         "{\"count\", \"labelled\", \"present\"}} with at least one split")
    for name, info in splits.items():
        safe_name(name, "split", f"{file}, \"splits\"")
        where = f"{file}: splits.{name}"
        if not isinstance(info, dict):
            raise StoreError(f"{where} is {info!r}; expected an object with \"count\", "
                             "\"labelled\" and \"present\"")
        count = info.get("count")
        if not _is_int(count) or count < 0:
            raise StoreError(f"{where}.count is {count!r}; expected an integer >= 0")
        if not isinstance(info.get("labelled"), bool):
            raise StoreError(f"{where}.labelled is {info.get('labelled')!r}; expected true or "
                             "false")
        if info["labelled"] and not targets:
            raise StoreError(f"{where} is labelled but the manifest has no targets")
        if not isinstance(info.get("weighted", False), bool):
            raise StoreError(f"{where}.weighted is {info['weighted']!r}; expected true or false")
        present = info.get("present")
        if not isinstance(present, dict) or set(present) != set(modalities):
            raise StoreError(f"{where}.present is {present!r}; expected a count for each "
                             f"modality {list(modalities)}")
        for m, n in present.items():
            if not _is_int(n) or not 0 <= n <= count:
                raise StoreError(f"{where}.present.{m} is {n!r}; expected an integer in "
                                 f"[0, {count}]")
    if not isinstance(manifest["provenance"], dict):
        raise StoreError(f"{file}: \"provenance\" is {manifest['provenance']!r}; expected an "
                         "object")


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
