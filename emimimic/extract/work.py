"""The extraction work folder: per-clip results written atomically, so runs resume.

Layout::

    WORK/<modality>/{id}.npy          float32 [T, D] features of one clip (visual, audio, text)
    WORK/asr/{id}.txt                 the speech recogniser's transcript of one clip
    WORK/failures/<stage>/{id}.json   {"reason", "detail"}: why the clip has no data for the stage
    WORK/sources/<stage>/{id}.json    the fingerprints of the source files the result was made from
    WORK/provenance/<stage>.json      how the stage's results were made (model, weights, layer...)
    WORK/transcripts.csv              ``Filename,transcript``: readable, correctable, re-usable
    WORK/report.csv                   ``Filename,split,modality,reason,detail``: every missing item
    WORK/splits/<split>.csv           the split CSVs given to ``pack`` (clips with no data dropped)

Every file is written to a temporary name and renamed into place, so a killed run never leaves a
half-written clip, and a clip with a result (or a recorded failure) is done — unless its source
files (the video, the audio file, the face crops) changed since the result was made: each result
records the fingerprints of its sources (name, size, mtime, a hash of the file's ends), written
before the result, and a result whose recorded sources differ from today's is redone.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from emimimic.constants import ID_COLUMN
from emimimic.data.store import normalise_id
from emimimic.data.store.format import safe_name
from emimimic.errors import UserError
from emimimic.extract.media import Failure
from emimimic.files import file_fingerprint, write_atomic

TRANSCRIPT_COLUMN = "transcript"
REPORT_HEADER = (ID_COLUMN, "split", "modality", "reason", "detail")


@dataclass(frozen=True)
class Clip:
    """One clip to extract: its id (``Filename`` zero-padded to 5 digits) and its split.

    The split's name becomes a file name (``WORK/splits/<split>.csv``, the store's folders), so
    it must be a safe name (:func:`~emimimic.data.store.format.safe_name`).
    """

    id: str
    split: str

    def __post_init__(self) -> None:
        safe_name(self.split, "split", f"--splits.{self.split}")


def file_sha256(path: Path) -> str:
    """Returns the hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_transcripts(path: Path) -> dict[str, str]:
    """Returns clip id -> transcript from a ``Filename,transcript`` CSV.

    Raises:
        UserError: the file is missing, has another header or repeats a clip.
    """
    if not path.is_file():
        raise UserError(f"{path}: transcripts file not found")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    if not rows or [h.strip() for h in rows[0]] != [ID_COLUMN, TRANSCRIPT_COLUMN]:
        raise UserError(f"{path}: header {rows[0] if rows else None}, expected "
                        f"{ID_COLUMN},{TRANSCRIPT_COLUMN}")
    out: dict[str, str] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 2:
            raise UserError(f"{path}, line {line}: {len(row)} fields, expected 2 "
                            "(quote transcripts that contain commas)")
        clip = normalise_id(row[0], f"{path}, line {line}")
        if clip in out:
            raise UserError(f"{path}, line {line}: clip {clip} appears twice")
        out[clip] = row[1]
    return out


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    """Writes a CSV atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_atomic(path, buf.getvalue().encode("utf-8"))


def source_fingerprints(files: Sequence[Path]) -> list[list[Any]]:
    """Returns the fingerprints of a clip's source files (empty for none)."""
    out = []
    for path in files:
        try:
            out.append(file_fingerprint(path))
        except OSError as err:
            raise UserError(f"{path}: cannot read the source file ({err.strerror})") from None
    return out


class WorkFolder:
    """Per-clip results of every stage under one folder (see the module docstring)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        #: stage -> clip -> the fingerprints its result must have been made from
        self._sources: dict[str, dict[str, Any]] = {}
        #: stage -> the clips whose results on disk were made from other sources
        self._stale: dict[str, set[str]] = {}

    def track_sources(self, stage: str, sources: Mapping[str, Any]) -> list[str]:
        """Sets the source fingerprints each clip's result of ``stage`` must be made from;
        returns the clips whose results were made from other sources (no longer done).

        A result with no recorded sources (made by emimimic 0.1) is taken as it is. Stages whose
        sources are not tracked (text: its transcript is) have every result done.
        """
        self._sources[stage] = dict(sources)
        stale = [clip for clip in sources
                 if self._has_result(stage, clip) and not self._recorded(stage, clip)]
        self._stale[stage] = set(stale)
        return stale

    def sources_file(self, stage: str, clip: str) -> Path:
        """Returns where the source fingerprints of a clip's result of ``stage`` live."""
        return self.root / "sources" / stage / f"{clip}.json"

    def _recorded(self, stage: str, clip: str) -> bool:
        """Returns whether the clip's recorded sources are today's (or none were recorded)."""
        path = self.sources_file(stage, clip)
        if not path.is_file():
            return True
        return json.loads(path.read_text(encoding="utf-8")) == self._sources[stage][clip]

    def _record_sources(self, stage: str, clip: str) -> None:
        # before the result: a result on disk always has its sources recorded
        if clip in self._sources.get(stage, {}):
            write_atomic(self.sources_file(stage, clip),
                         json.dumps(self._sources[stage][clip]).encode("utf-8"))
            self._stale[stage].discard(clip)

    def _has_result(self, stage: str, clip: str) -> bool:
        return self.result_file(stage, clip).is_file() or self.failure_file(stage, clip).is_file()

    def folder(self, stage: str) -> Path:
        """Returns the folder of a stage's per-clip results."""
        return self.root / stage

    def result_file(self, stage: str, clip: str) -> Path:
        """Returns where a clip's result of ``stage`` lives (``.txt`` for asr, else ``.npy``)."""
        return self.root / stage / f"{clip}{'.txt' if stage == 'asr' else '.npy'}"

    def failure_file(self, stage: str, clip: str) -> Path:
        """Returns where a clip's recorded failure of ``stage`` lives."""
        return self.root / "failures" / stage / f"{clip}.json"

    def done(self, stage: str, clip: str) -> bool:
        """Returns whether the clip has a result or a recorded failure for ``stage``, made from
        the sources it has now (see :meth:`track_sources`)."""
        return self._has_result(stage, clip) and clip not in self._stale.get(stage, ())

    def results_digest(self, stage: str, clips: Sequence[str]) -> str:
        """Returns a digest of the clips' results of ``stage`` as they are on disk (each file's
        size and mtime): it changes when any clip is redone."""
        h = hashlib.sha256()
        for clip in clips:
            for path in (self.result_file(stage, clip), self.failure_file(stage, clip)):
                if path.is_file():
                    stat = path.stat()
                    h.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
        return h.hexdigest()

    def save_features(self, stage: str, clip: str, features: np.ndarray) -> None:
        """Writes a clip's [T, D] float32 features (and drops any earlier failure record)."""
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(features, dtype=np.float32), allow_pickle=False)
        self._record_sources(stage, clip)
        write_atomic(self.result_file(stage, clip), buf.getvalue())
        self.failure_file(stage, clip).unlink(missing_ok=True)

    def save_transcript(self, clip: str, text: str) -> None:
        """Writes a clip's transcript (UTF-8)."""
        self._record_sources("asr", clip)
        write_atomic(self.result_file("asr", clip), text.encode("utf-8"))
        self.failure_file("asr", clip).unlink(missing_ok=True)

    def save_failure(self, stage: str, clip: str, failure: Failure) -> None:
        """Records why a clip has no result for ``stage``."""
        record = {"reason": failure.reason, "detail": failure.detail}
        self._record_sources(stage, clip)
        write_atomic(self.failure_file(stage, clip), json.dumps(record).encode("utf-8"))
        self.result_file(stage, clip).unlink(missing_ok=True)

    def failure(self, stage: str, clip: str) -> Failure | None:
        """Returns the recorded failure of a clip for ``stage``, or None."""
        path = self.failure_file(stage, clip)
        if not path.is_file():
            return None
        record = json.loads(path.read_text(encoding="utf-8"))
        return Failure(record["reason"], record["detail"])

    def transcript(self, clip: str) -> str | None:
        """Returns a clip's recognised transcript, or None when there is none."""
        path = self.result_file("asr", clip)
        return path.read_text(encoding="utf-8") if path.is_file() else None

    def provenance(self, stage: str) -> dict[str, Any] | None:
        """Returns the recorded provenance of a stage, or None if it never ran here."""
        path = self.root / "provenance" / f"{stage}.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def save_provenance(self, stage: str, record: Mapping[str, Any]) -> None:
        """Records how a stage's results are made."""
        text = json.dumps(dict(record), indent=2, sort_keys=True) + "\n"
        write_atomic(self.root / "provenance" / f"{stage}.json", text.encode("utf-8"))

    def clear(self, stage: str) -> None:
        """Removes every result, failure and the provenance of a stage (to redo it)."""
        shutil.rmtree(self.folder(stage), ignore_errors=True)
        shutil.rmtree(self.root / "failures" / stage, ignore_errors=True)
        shutil.rmtree(self.root / "sources" / stage, ignore_errors=True)
        (self.root / "provenance" / f"{stage}.json").unlink(missing_ok=True)
