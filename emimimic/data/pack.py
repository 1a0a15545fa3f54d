"""Builds a feature store from ABAW split CSVs and per-clip feature files (``emimimic pack``).

Inputs: one CSV per split (header ``Filename,<target>,...`` or ``Filename`` alone for an
unlabelled split; integer ids are zero-padded to 5 digits) and, per modality, a folder of
``{id}.npy`` or ``{id}.pkl`` files holding the clip's [T, D] features (a [D] vector is T = 1).
Everything is validated before the first feature file is read: split and modality names, CSV
headers, labels, duplicate ids and which feature files exist. Each modality's D is then agreed
by all its files (``.npy`` headers; ``.pkl`` files are loaded), and feature files are checked
one by one as they are stored.

A failed or interrupted pack keeps ``DEST.partial/``; the rerun resumes it, packing again every
clip from the first one whose files changed (size, mtime or a hash of their ends), so the
result is byte-identical to a fresh pack of the files as they are now.
"""

from __future__ import annotations

import csv
import math
from collections import Counter, deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
from jsonargparse.typing import PositiveInt
from tqdm import tqdm

from emimimic.constants import EMOTIONS, ID_COLUMN
from emimimic.data.safe_pickle import load_pickle
from emimimic.data.store import FORMAT_VERSION, StoreError, check_weights, normalise_id
from emimimic.data.store.format import load_npy, read_npy_header, safe_name
from emimimic.files import file_fingerprint

#: What ``missing`` may say about a clip whose feature file for a modality does not exist.
MissingPolicy = Literal["error", "absent"]
SUFFIXES = (".npy", ".pkl")


@dataclass
class SplitCSV:
    """What an ABAW split CSV holds.

    Attributes:
        ids: clip ids (integers zero-padded to 5 digits), in file order.
        labels: float64 [N, K] labels, or None for an unlabelled split (``Filename`` only).
        targets: the label columns' names, in order (empty when unlabelled).
        weights: float32 [N] sample weights from the weight column, or None.
    """

    ids: list[str]
    labels: np.ndarray | None
    targets: list[str]
    weights: np.ndarray | None = None


def read_split_csv(path: str | Path, targets: Sequence[str] | None = EMOTIONS,
                   weight_column: str | None = None) -> SplitCSV:
    """Returns the clips, labels and sample weights of one split CSV.

    Args:
        path: the CSV; header ``Filename`` + target columns, or ``Filename`` alone (unlabelled).
        targets: the target columns a labelled CSV must have, in order; None takes them from the
            header (any number, e.g. seven ERI emotions or a single valence column).
        weight_column: a column of per-clip sample weights (finite, >= 0), not a target; a
            labelled CSV must have it, an unlabelled one may.

    Raises:
        StoreError: wrong header, bad or duplicate id, a label that is missing, not a number or
            outside [0, 1], a bad weight. Messages name the file, the line and the clip id.
    """
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"{path}: split CSV not found")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise StoreError(f"{path}: empty CSV, expected a header starting with {ID_COLUMN!r}")
    header = [h.strip() for h in rows[0]]
    if header[0] != ID_COLUMN:
        raise StoreError(f"{path}: header {rows[0]} must start with {ID_COLUMN!r}")
    weight_at = header.index(weight_column) if weight_column in header[1:] else None
    names = [h for n, h in enumerate(header[1:], 1) if n != weight_at]
    labelled = bool(names)
    if labelled:
        if weight_column is not None and weight_at is None:
            raise StoreError(f"{path}: no sample-weight column {weight_column!r} in the header "
                             f"{header}")
        if targets is not None and names != list(targets):
            raise StoreError(f"{path}: header {header} does not match the expected targets; "
                             f"expected {[ID_COLUMN, *targets]}"
                             + (f" (and the weight column {weight_column!r})"
                                if weight_column else ""))
        if len(set(names)) != len(names) or not all(names):
            raise StoreError(f"{path}: header {header} has empty or repeated target names")
    ids: list[str] = []
    seen: dict[str, int] = {}
    labels = np.zeros((len(rows) - 1, len(names)), dtype=np.float64)
    weights = np.zeros(len(rows) - 1, dtype=np.float64)
    for n, row in enumerate(rows[1:]):
        line = n + 2
        if len(row) != len(header):
            raise StoreError(f"{path}, line {line}: {len(row)} fields, expected {len(header)}")
        clip = normalise_id(row[0], f"{path}, line {line}")
        if clip in seen:
            raise StoreError(f"{path}, line {line}: duplicate clip id {clip} "
                             f"(first on line {seen[clip]})")
        seen[clip] = line
        ids.append(clip)
        values = [text for k, text in enumerate(row[1:], 1) if k != weight_at]
        for k, (name, text) in enumerate(zip(names, values, strict=True)):
            labels[n, k] = _number(text, f"{path}, line {line}, clip {clip}, column {name!r}",
                                   "label", (0.0, 1.0))
        if weight_at is not None:
            weights[n] = _number(row[weight_at], f"{path}, line {line}, clip {clip}, column "
                                 f"{weight_column!r}", "sample weight", (0.0, math.inf))
    if not ids:
        raise StoreError(f"{path}: no clips after the header")
    return SplitCSV(ids, labels if labelled else None, names,
                    check_weights(weights, str(path), ids) if weight_at is not None else None)


def _number(text: str, where: str, what: str, bounds: tuple[float, float]) -> float:
    """Returns a CSV cell as a float in ``bounds``; errors name ``where``."""
    low, high = bounds
    rule = f"a number in [{low:g}, {high:g}]" if math.isfinite(high) else f"a number >= {low:g}"
    if not text.strip():
        raise StoreError(f"{where}: missing {what} (empty); expected {rule}")
    try:
        value = float(text)
    except ValueError:
        raise StoreError(f"{where}: {what} {text!r} is not a number; expected {rule}") from None
    if math.isnan(value):
        raise StoreError(f"{where}: missing {what} (NaN); expected {rule}")
    if not low <= value <= high:
        raise StoreError(f"{where}: {what} {value} outside [{low:g}, {high:g}]")
    return value


def find_feature_file(folder: Path, clip: str) -> Path | None:
    """Returns ``folder/{clip}.npy`` or ``.pkl``, whichever exists, or None if neither does.

    Raises:
        StoreError: both exist (which one is meant is ambiguous).
    """
    found = [folder / f"{clip}{s}" for s in SUFFIXES if (folder / f"{clip}{s}").is_file()]
    if len(found) > 1:
        raise StoreError(f"{found[0]} and {found[1]}: two feature files for clip {clip}; keep one")
    return found[0] if found else None


def load_feature_file(path: Path) -> np.ndarray:
    """Returns the array in a ``.npy`` (no pickles allowed) or ``.pkl`` feature file.

    A ``.npy`` header is checked against the file's size before anything is allocated.

    Raises:
        StoreError: missing or unreadable file, a damaged ``.npy`` or one whose header claims more
            (or less) data than the file holds, refused pickle, or a suffix other than .npy / .pkl.
    """
    path = Path(path)
    if path.suffix == ".pkl":
        return load_pickle(path)
    if path.suffix != ".npy":
        raise StoreError(f"{path}: unknown feature file type, expected one of {SUFFIXES}")
    return load_npy(path, what="feature")


def file_origin(path: Path | None) -> list[Any] | None:
    """Returns what a resume compares of a feature file (:func:`~emimimic.files.file_fingerprint`:
    name, size, mtime and a hash of its ends); None for no file.

    Raises:
        StoreError: the file cannot be read.
    """
    if path is None:
        return None
    try:
        return file_fingerprint(path)
    except FileNotFoundError:
        raise StoreError(f"{path}: feature file disappeared while packing") from None
    except OSError as err:
        raise StoreError(f"{path}: cannot read the feature file ({err.strerror})") from None


def clip_origin(found: Mapping[str, Path | None]) -> dict[str, list[Any] | None]:
    """Returns the origin of a clip: :func:`file_origin` of its file in each modality."""
    return {m: file_origin(f) for m, f in found.items()}


def _file_shape(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Returns a feature file's shape and dtype: the header of a ``.npy``, a loaded ``.pkl``."""
    if path.suffix == ".npy":
        try:
            with open(path, "rb") as f:
                header = read_npy_header(f, path)
        except OSError as err:
            raise StoreError(f"{path}: cannot read the feature file ({err.strerror})") from None
        return header.shape, header.dtype
    arr = load_feature_file(path)
    return tuple(arr.shape), arr.dtype


def agree_dim(modality: str, entries: Sequence[tuple[str, Path]]
              ) -> tuple[int, list[tuple[str, Path, tuple[int, ...]]]]:
    """Returns the D most of a modality's files have, and the files with another D.

    Args:
        modality: the modality, for messages.
        entries: (clip id, feature file) of every clip that has a file of the modality.

    Returns:
        (D, [(clip, file, shape)] of the files whose last dimension is not D). Files that cannot
        tell a D (unreadable, damaged, not [T, D] or [D] numbers) do not vote; they are named
        when they are packed.

    Raises:
        StoreError: no file tells a D (the first file's problem), or two Ds tie (naming both).
    """
    shapes: dict[int, list[tuple[str, Path, tuple[int, ...]]]] = {}
    first_error: StoreError | None = None
    for clip, path in entries:
        try:
            shape, dtype = _file_shape(path)
        except StoreError as err:
            first_error = first_error or _with_clip(err, path, clip, modality)
            continue
        if len(shape) in (1, 2) and shape[-1] > 0 and dtype.kind in "fiu":
            shapes.setdefault(shape[-1], []).append((clip, path, shape))
    if not shapes:
        if first_error is not None:
            raise first_error
        clip, path = entries[0]
        raise StoreError(f"{path} (clip {clip}, modality {modality}): no file of the modality "
                         "holds a [T, D] or [D] numeric array, so its D is unknown")
    votes = Counter({d: len(files) for d, files in shapes.items()}).most_common()
    if len(votes) > 1 and votes[0][1] == votes[1][1]:
        tied = "; ".join(f"D = {d} in {n} files (e.g. {shapes[d][0][1]}, clip {shapes[d][0][0]})"
                         for d, n in votes if n == votes[0][1])
        raise StoreError(f"modality {modality}: its files disagree on D with no majority: {tied}; "
                         f"fix the odd files or pass --dims.{modality} D")
    dim = votes[0][0]
    odd = sorted((e for d, files in shapes.items() if d != dim for e in files),
                 key=lambda e: str(e[1]))
    return dim, odd


def _odd_dim_error(modality: str, dim: int, agreed: int, total: int,
                   odd: list[tuple[str, Path, tuple[int, ...]]]) -> StoreError:
    clip, path, shape = odd[0]
    msg = (f"{path} (clip {clip}, modality {modality}): expected D = {dim} (the D of {agreed} of "
           f"the modality's {total} files), got shape {shape}")
    if len(odd) > 1:
        listed = ", ".join(f"{p} (clip {c}, shape {s})" for c, p, s in odd[1:6])
        msg += (f"; {len(odd) - 1} more file{'s' if len(odd) > 2 else ''} with another D: "
                f"{listed}{', ...' if len(odd) > 6 else ''}")
    return StoreError(msg)


def pack(dest: Path, splits: dict[str, Path], modalities: dict[str, Path], *,
         missing: MissingPolicy = "error", targets: list[str] | None = list(EMOTIONS),  # noqa: B006
         dims: dict[str, int] | None = None, provenance: dict[str, Any] | None = None,
         progress: bool = True, workers: PositiveInt = 1,
         weight_column: str | None = None) -> Path:
    """Builds a feature store from split CSVs and per-clip feature files; returns its path.

    An interrupted run resumes from ``DEST.partial/`` when rerun with the same arguments.

    Args:
        dest: the store folder to create (must not exist; work happens in ``DEST.partial``).
        splits: split name -> CSV path (``Filename`` + targets, or ``Filename`` only for an
            unlabelled split), e.g. ``--splits.train train_split.csv``.
        modalities: modality name -> folder of ``{id}.npy`` / ``{id}.pkl`` files holding each
            clip's [T, D] features, e.g. ``--modalities.text features/chatglm3``.
        missing: ``error``: a missing feature file is an error; ``absent``: it is recorded as a
            clip without that modality (it reads as zeros with ``present`` False).
        targets: target columns the labelled CSVs must have, in order (default the six EMI
            emotions); null takes them from the first labelled CSV's header (all must agree).
        dims: expected D per modality; by default the D most of the modality's files have (the
            others are named in the error).
        provenance: extra key/values recorded in the manifest (e.g. the feature extractor).
        progress: show a progress bar.
        workers: processes that read and validate feature files in parallel (1: this process).
            The store is byte-identical whatever the number.
        weight_column: a CSV column of per-clip sample weights (e.g. the square root of a clip's
            annotator count), stored with each labelled split and used by every training loss
            term.

    Split and modality names become file names in the store: only letters, digits, ``_`` and
    ``-`` (not starting with ``-``). A failed run keeps ``DEST.partial/``; rerunning the same
    command resumes it, packing again the clips whose files changed since.

    Raises:
        StoreError: any invalid input, with a message naming the file, the clip and the rule.
    """
    if workers < 1:
        raise StoreError(f"workers={workers}; expected at least 1")
    if missing not in get_args(MissingPolicy):
        raise StoreError(f"missing={missing!r}; expected one of {get_args(MissingPolicy)}")
    if not splits or not modalities:
        raise StoreError("pack needs at least one split CSV and one modality folder")
    for name in splits:
        safe_name(name, "split", f"--splits.{name}")
    for m in modalities:
        safe_name(m, "modality", f"--modalities.{m}")
    unknown = sorted(set(dims or {}) - set(modalities))
    if unknown:
        raise StoreError(f"--dims names {unknown}, which are not modalities "
                         f"(the modalities are {list(modalities)})")
    dest = Path(dest)
    if dest.exists():
        raise StoreError(f"{dest}: destination already exists; choose a new path or remove it")
    # 1. all CSVs, fully, before any feature file
    from emimimic.data.store.writer import SplitSpec, StoreWriter  # torch: only to write

    specs: list[SplitSpec] = []
    owner: dict[str, str] = {}
    for name, csv_path in splits.items():
        split = read_split_csv(csv_path, targets, weight_column)
        ids, labels, names = split.ids, split.labels, split.targets
        if labels is not None:
            if targets is None:
                targets = names
            elif names != list(targets):
                raise StoreError(f"{csv_path}: targets {names} differ from another split's "
                                 f"{list(targets)}")
        for clip in ids:
            if clip in owner:
                raise StoreError(f"{csv_path}: clip id {clip} also appears in split "
                                 f"{owner[clip]!r} ({splits[owner[clip]]})")
            owner[clip] = name
        specs.append(SplitSpec(name, ids, labels, split.weights))
    if targets is None:
        raise StoreError("no split CSV has label columns, so the targets are unknown; pass them")
    # 2. which feature files exist, and the dims, before reading any of them
    folders = {m: Path(p) for m, p in modalities.items()}
    for m, folder in folders.items():
        if not folder.is_dir():
            raise StoreError(f"{folder}: feature folder of modality {m!r} not found")
    files: dict[str, list[dict[str, Path | None]]] = {}
    for spec in specs:
        files[spec.name] = []
        for clip in spec.ids:
            found = {m: find_feature_file(folder, clip) for m, folder in folders.items()}
            if all(f is None for f in found.values()):
                raise StoreError(f"clip {clip} of {splits[spec.name]}: no feature file in any "
                                 f"modality (looked for {clip}.npy/.pkl in "
                                 f"{[str(f) for f in folders.values()]})")
            if missing == "error":
                for m, f in found.items():
                    if f is None:
                        raise StoreError(f"{folders[m] / clip}.npy (or .pkl): missing feature file "
                                         f"of clip {clip} (split {spec.name!r}, modality {m}); "
                                         "use --missing absent if the clip has no such data")
            files[spec.name].append(found)
    expected = dict(dims or {})
    odd: dict[str, StoreError] = {}
    for m in folders:
        if m not in expected:
            entries = [(c, f[m]) for p in specs for c, f in zip(p.ids, files[p.name], strict=True)
                       if f[m] is not None]
            expected[m], others = agree_dim(m, entries)
            if others:
                odd[m] = _odd_dim_error(m, expected[m], len(entries) - len(others), len(entries),
                                        others)
    record = {"created_by": "emimimic pack", "synthetic": False, "format_version": FORMAT_VERSION,
              "splits": {n: str(p) for n, p in splits.items()},
              "modalities": {m: str(p) for m, p in modalities.items()},
              "missing": missing, "weight_column": weight_column, **dict(provenance or {})}
    # 3. features, clip by clip, resumable; workers read and validate, this process writes
    writer = StoreWriter(dest, targets, expected, specs, record)
    try:
        if odd:
            raise next(iter(odd.values()))
        for spec in specs:  # a resume keeps each split's clips up to the first changed one
            recorded = writer.origins(spec.name)
            keep = next((k for k, origin in enumerate(recorded)
                         if origin != clip_origin(files[spec.name][k])), len(recorded))
            writer.rewind(spec.name, keep)
        todo = [(spec.name, spec.ids[n], files[spec.name][n])
                for spec in specs for n in range(writer.done(spec.name), len(spec.ids))]
        total = sum(len(s.ids) for s in specs)
        with tqdm(total=total, initial=total - len(todo), desc=f"pack {dest.name}", unit="clip",
                  disable=not progress) as bar:
            for (split, _, _), (origin, clip) in _prepared(todo, expected, workers):
                writer.append(split, clip, origin)
                bar.update(1)
    except StoreError as err:
        writer.close()
        packed = sum(writer.done(s.name) for s in specs)
        raise StoreError(f"{err}; {writer.partial}/ keeps the {packed} clips packed so far: rerun "
                         "the same command to resume (clips whose files changed are packed "
                         "again)") from err
    finally:
        writer.close()
    return writer.finish()


def _load_clip(clip: str, found: Mapping[str, Path | None], dims: Mapping[str, int]
               ) -> tuple[dict[str, list[Any] | None], Any]:
    """Returns one clip's origin and its read and validated features (runs in pack's workers).

    The origin is taken before the files are read: a file changed meanwhile differs from it at
    the next resume, and is packed again then.
    """
    try:
        origin = clip_origin(found)
    except StoreError as err:
        raise StoreError(f"{err} (clip {clip})") from None
    arrays: dict[str, np.ndarray | None] = {}
    for m, f in found.items():
        try:
            arrays[m] = None if f is None else load_feature_file(f)
        except StoreError as err:
            raise _with_clip(err, f, clip, m) from None
    from emimimic.data.store.writer import prepare_clip

    return origin, prepare_clip(arrays, dims, clip, {m: str(f) for m, f in found.items()})


def _with_clip(err: StoreError, path: Path, clip: str, modality: str) -> StoreError:
    """Returns a file's error naming its clip and modality: ``FILE (clip C, modality M): ...``."""
    text, prefix = str(err), f"{path}: "
    if text.startswith(prefix):
        return StoreError(f"{path} (clip {clip}, modality {modality}): {text[len(prefix):]}")
    return StoreError(f"{text} (clip {clip}, modality {modality})")


def _prepared(todo: list[tuple[str, str, dict[str, Path | None]]], dims: Mapping[str, int],
              workers: int) -> Iterator[tuple[tuple[str, str, dict[str, Path | None]],
                                              tuple[dict[str, list[Any] | None], Any]]]:
    """Yields ``(task, (origin, prepared clip))`` in the order of ``todo``, read by ``workers``
    processes.

    With ``workers > 1`` at most ``4 * workers`` clips are in flight, so memory stays bounded
    whatever the number of clips; the order (and so the store's bytes) is that of one worker.
    """
    if workers <= 1:
        for task in todo:
            yield task, _load_clip(task[1], task[2], dims)
        return
    # one intra-op thread per worker: a forked child that inherits the parent's OpenMP pool
    # (any torch op run before pack) deadlocks in its first pooling of a T > 128 clip
    import torch

    with ProcessPoolExecutor(max_workers=workers, initializer=torch.set_num_threads,
                             initargs=(1,)) as pool:
        pending: deque = deque()
        tasks = iter(todo)
        try:
            for task in tasks:
                pending.append((task, pool.submit(_load_clip, task[1], task[2], dict(dims))))
                if len(pending) >= 4 * workers:
                    done, future = pending.popleft()
                    yield done, future.result()
            while pending:
                done, future = pending.popleft()
                yield done, future.result()
        finally:
            for _, future in pending:
                future.cancel()
