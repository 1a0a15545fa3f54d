"""``extract``: raw clips -> per-clip features in a work folder -> a feature store (``pack``).

Stages run in order: visual, audio, then text (speech recognition first, unless a transcripts
file is given). Each stage records its provenance in the work folder before it runs and refuses
to mix its results with results made by other settings. The store is then (re)packed from every
complete modality of the work folder, so a later run with ``--modalities [text]`` adds text to
a store that had visual and audio. Every option is declared once, in :class:`ExtractOptions`
and the stages' own dataclasses (``VisualOptions`` in ``visual.py``, ...), and reaches
``emimimic extract --help``, ``--config`` files and the provenance records from there.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch

from emimimic.constants import ID_COLUMN, MODALITIES
from emimimic.data.pack import SplitCSV, pack, read_split_csv
from emimimic.data.store import FeatureStore, StoreError
from emimimic.data.store.format import write_labels_csv
from emimimic.errors import UserError
from emimimic.extract.asr import ASROptions
from emimimic.extract.audio import AudioOptions
from emimimic.extract.engine import BadInput, EngineOptions, Stage, run_stage
from emimimic.extract.media import (
    VIDEO_SUFFIXES,
    Failure,
    audio_source,
    face_image_files,
    find_media,
)
from emimimic.extract.text import TextOptions
from emimimic.extract.visual import VisualOptions
from emimimic.extract.work import (
    REPORT_HEADER,
    TRANSCRIPT_COLUMN,
    Clip,
    WorkFolder,
    file_sha256,
    read_transcripts,
    source_fingerprints,
    write_csv,
)
from emimimic.files import write_atomic

#: Stages a work folder can hold, in the order they run.
StageName = Literal["visual", "audio", "asr", "text"]
STAGES: tuple[str, ...] = get_args(StageName)
Modality = Literal["visual", "audio", "text"]


@dataclass
class ExtractOptions:
    """Extract per-clip features from raw clips with Hugging Face models and pack them into a
    feature store; interrupted runs resume and finished clips are skipped.

    Attributes:
        splits: split name -> CSV (Filename + targets, or Filename only), e.g.
            ``--splits.train train_split.csv``.
        work: work folder of per-clip results (resume, report.csv, transcripts.csv).
        store: feature store to write (re-packed when the work folder gains data); none: only
            the work folder.
        raw: folder of videos {id}.mp4 (frames and audio).
        audio_files: folder of audio files {id}.wav|mp3 used instead of the video's track.
        face_images: folder of face crops {id}/{k}.jpg used instead of detecting faces.
        modalities: the modalities to extract.
        redo: stages whose results in the work folder are discarded and extracted again.
        bad_input: a corrupt or missing file, a clip with no audio track, no face or no frames
            is recorded as missing in WORK/report.csv and the run goes on (record), or stops the
            run with an error naming the clip (error).
        visual: the visual stage (:class:`~emimimic.extract.visual.VisualOptions`).
        audio: the audio stage (:class:`~emimimic.extract.audio.AudioOptions`).
        asr: speech recognition (:class:`~emimimic.extract.asr.ASROptions`).
        text: the text stage (:class:`~emimimic.extract.text.TextOptions`).
        engine: how stages run (:class:`~emimimic.extract.engine.EngineOptions`).
    """

    splits: dict[str, Path]
    work: Path
    store: Path | None = None
    raw: Path | None = None
    audio_files: Path | None = None
    face_images: Path | None = None
    modalities: list[Modality] = field(default_factory=lambda: list(MODALITIES))
    redo: list[StageName] = field(default_factory=list)
    bad_input: BadInput = "record"
    visual: VisualOptions = field(default_factory=VisualOptions)
    audio: AudioOptions = field(default_factory=AudioOptions)
    asr: ASROptions = field(default_factory=ASROptions)
    text: TextOptions = field(default_factory=TextOptions)
    engine: EngineOptions = field(default_factory=EngineOptions)


@dataclass
class Summary:
    """What a run left: per stage, clips with results and missing clips by reason."""

    clips: int
    done: dict[str, int]
    missing: dict[str, dict[str, int]]
    excluded: list[str]
    store: Path | None
    store_updated: bool

    def lines(self) -> list[str]:
        """Returns the summary as printed at the end of a run."""
        out = [f"emimimic extract: {self.clips} clips"]
        for stage, count in self.done.items():
            reasons = self.missing.get(stage, {})
            text = ", ".join(f"{r} {n}" for r, n in sorted(reasons.items()))
            out.append(f"  {stage}: {count} with results, {sum(reasons.values())} missing"
                       + (f" ({text})" if text else ""))
        if self.excluded:
            out.append(f"  {len(self.excluded)} clip(s) with no data in any modality, left out of "
                       f"the store: {', '.join(self.excluded[:10])}"
                       + (" ..." if len(self.excluded) > 10 else ""))
        if self.store is not None:
            out.append(f"  store {self.store}: {'written' if self.store_updated else 'up to date'}")
        return out


def _normalised(record: Any) -> Any:
    return json.loads(json.dumps(record, sort_keys=True))


def _absolute(path: Path | None) -> Any:
    return None if path is None else Path(path).expanduser().resolve()


def _is_main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()
                ) or torch.distributed.get_rank() == 0


def _check_inputs(opts: ExtractOptions) -> None:
    unknown = sorted(set(opts.modalities) - set(MODALITIES))
    if unknown or not opts.modalities:
        raise UserError(f"--modalities {opts.modalities}: expected some of {list(MODALITIES)}")
    bad = sorted(set(opts.redo) - set(STAGES))
    if bad:
        raise UserError(f"--redo {bad}: expected some of {list(STAGES)}")
    for option, folder in (("--raw", opts.raw), ("--audio_files", opts.audio_files),
                           ("--face_images", opts.face_images)):
        if folder is not None and not folder.is_dir():
            raise UserError(f"{option} {folder}: folder not found")
    needs = {"visual": [("--visual.model", opts.visual.model)],
             "audio": [("--audio.model", opts.audio.model)],
             "text": [("--text.model", opts.text.model)]
             + ([] if opts.text.transcripts else [("--asr.model or --text.transcripts",
                                                    opts.asr.model)])}
    for m in opts.modalities:
        for option, value in needs[m]:
            if not value:
                raise UserError(f"--modalities {m} needs {option}")
    if "visual" in opts.modalities and opts.raw is None and opts.face_images is None:
        raise UserError("--modalities visual needs --raw (videos) or --face_images")
    audio_needed = "audio" in opts.modalities or ("text" in opts.modalities
                                                  and not opts.text.transcripts)
    if audio_needed and opts.raw is None and opts.audio_files is None:
        raise UserError("audio and speech recognition need --raw (videos) or --audio_files")


def _source_files(stage: str, clip: str, opts: ExtractOptions) -> list[Path]:
    """Returns the files a stage reads for a clip (as its preparer finds them)."""
    if stage == "visual":
        if opts.face_images is not None:
            folder = opts.face_images / clip
            return face_image_files(folder) if folder.is_dir() else []
        found = find_media(opts.raw, clip, VIDEO_SUFFIXES)
    else:  # audio and speech recognition read the same audio
        found = audio_source(clip, opts.audio_files, opts.raw)
    return [found] if found is not None else []


def _run(stage: Stage, clips: list[Clip], work: WorkFolder, opts: ExtractOptions) -> None:
    if stage.name in ("visual", "audio", "asr"):
        stale = work.track_sources(stage.name, {
            c.id: source_fingerprints(_source_files(stage.name, c.id, opts)) for c in clips})
        if stale and _is_main_process():
            print(f"{stage.name}: {len(stale)} clip(s) whose source files changed since their "
                  f"results were made are redone ({', '.join(stale[:5])}"
                  f"{' ...' if len(stale) > 5 else ''})", flush=True)
    recorded = work.provenance(stage.name)
    wanted = _normalised(stage.provenance)
    if recorded is not None and recorded != wanted:
        changed = sorted(k for k in set(recorded) | set(wanted) if recorded.get(k) != wanted.get(k))
        raise UserError(f"{work.folder(stage.name)}: {stage.name} results made with other "
                        f"settings (differing: {', '.join(changed)}); rerun with --redo "
                        f"[{stage.name}] to replace them, or use another --work folder")
    if recorded is None and _is_main_process():
        work.save_provenance(stage.name, wanted)
    run_stage(stage, clips, work, opts.engine, opts.bad_input)


def _transcripts_csv(clips: list[Clip], work: WorkFolder) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([ID_COLUMN, TRANSCRIPT_COLUMN])
    for clip in clips:
        writer.writerow([clip.id, work.transcript(clip.id) or ""])
    return buf.getvalue().encode("utf-8")


def _text(clips: list[Clip], work: WorkFolder, opts: ExtractOptions) -> None:
    from emimimic.extract.text import parse_empty_text, text_stage

    parse_empty_text(opts.text.empty_text)  # a bad value fails before any model loads
    entries: dict[str, str | Failure] = {}
    transcripts = opts.text.transcripts
    if transcripts is not None:
        given = read_transcripts(transcripts)
        lacking = [c.id for c in clips if c.id not in given]
        if lacking:
            raise UserError(f"{transcripts}: no transcript for {len(lacking)} clip(s) "
                            f"({', '.join(lacking[:5])}{' ...' if len(lacking) > 5 else ''}); "
                            "add a row for each (an empty transcript is allowed)")
        entries = {c.id: given[c.id] for c in clips}
        source, sha, asr = str(transcripts), file_sha256(transcripts), None
    else:
        from emimimic.extract.asr import asr_stage

        stage = asr_stage(opts.asr, opts.audio_files, opts.raw)
        _run(stage, clips, work, opts)
        for clip in clips:
            text = work.transcript(clip.id)
            failure = work.failure("asr", clip.id)
            entries[clip.id] = text if text is not None else (
                failure or Failure("missing_file", "speech recognition gave no result"))
        content = _transcripts_csv(clips, work)
        path = work.root / "transcripts.csv"
        if _is_main_process():
            write_atomic(path, content)
        source, sha, asr = str(path), hashlib.sha256(content).hexdigest(), stage.provenance
    _run(text_stage(opts.text, entries, source, sha, asr), clips, work, opts)


def _missing(clips: list[Clip], work: WorkFolder, stage: str) -> dict[str, Failure]:
    return {c.id: f for c in clips if (f := work.failure(stage, c.id)) is not None}


def read_clips(splits: dict[str, Path]) -> tuple[list[Clip], dict[str, SplitCSV]]:
    """Returns every split CSV's clips in file order, and the CSVs (validated in full).

    Raises:
        StoreError: a bad CSV, or a clip in two splits (naming both).
    """
    csvs = {split: read_split_csv(path, targets=None) for split, path in splits.items()}
    clips: list[Clip] = []
    owner: dict[str, str] = {}
    for split, content in csvs.items():
        for clip in content.ids:
            if clip in owner:
                raise StoreError(f"{splits[split]}: clip {clip} is also in split "
                                 f"{owner[clip]!r} ({splits[owner[clip]]})")
            owner[clip] = split
            clips.append(Clip(clip, split))
    return clips, csvs


def _write_splits(opts: ExtractOptions, csvs: dict[str, SplitCSV], work: WorkFolder,
                  excluded: set[str]) -> dict[str, Path]:
    """Writes the split CSVs without the clips that have no data; returns their paths."""
    out = {}
    for split, content in csvs.items():
        kept = [n for n, clip in enumerate(content.ids) if clip not in excluded]
        if not kept:
            raise UserError(f"{opts.splits[split]}: no clip of split {split!r} has data in any "
                            f"modality (see {work.root / 'report.csv'})")
        out[split] = work.root / "splits" / f"{split}.csv"
        out[split].parent.mkdir(parents=True, exist_ok=True)
        labels = None if content.labels is None else content.labels[kept]
        write_labels_csv(out[split], content.targets, [content.ids[n] for n in kept], labels)
    return out


def _publish(store: Path, work: WorkFolder, splits: dict[str, Path], modalities: dict[str, Path],
             dims: dict[str, int], record: dict[str, Any], progress: bool) -> bool:
    """Packs the store unless it is up to date; returns whether it was written."""
    new, old = Path(f"{store}.new"), Path(f"{store}.old")
    if not store.exists() and (new / "manifest.json").is_file():
        os.replace(new, store)  # a crash between the two renames below
    shutil.rmtree(old, ignore_errors=True)
    if store.exists():
        try:
            current = FeatureStore(store).provenance.get("extract")
        except StoreError as err:
            raise UserError(f"{store}: exists but is not a readable store ({err}); remove it or "
                            "choose another --store") from None
        if current == _normalised(record["extract"]):
            return False
    target = new if store.exists() else store
    if target == new:
        shutil.rmtree(new, ignore_errors=True)
    # pack resumes DEST.partial only for the same inputs; one of other inputs is ours to remove
    pending = work.root / "pack.json"
    fingerprint = json.dumps([str(target), _normalised(record)], sort_keys=True)
    partial = Path(f"{target}.partial")
    if partial.exists() and (not pending.is_file() or pending.read_text() != fingerprint):
        shutil.rmtree(partial)
    write_atomic(pending, fingerprint.encode("utf-8"))
    pack(target, {s: str(p) for s, p in splits.items()},
         {m: str(p) for m, p in modalities.items()}, missing="absent", targets=None, dims=dims,
         provenance=record, progress=progress)
    if target == new:
        os.replace(store, old)
        os.replace(new, store)
        shutil.rmtree(old)
    pending.unlink(missing_ok=True)
    return True


def extract(opts: ExtractOptions) -> Summary:
    """Runs the requested stages, writes the report and packs the store; returns the summary.

    Raises:
        UserError: invalid options or inputs, or (``--bad-input error``) a bad clip.
        StoreError: invalid split CSVs or features that ``pack`` refuses.
    """
    opts = replace(opts, splits={s: _absolute(p) for s, p in opts.splits.items()},
                   work=_absolute(opts.work), store=_absolute(opts.store), raw=_absolute(opts.raw),
                   audio_files=_absolute(opts.audio_files),
                   face_images=_absolute(opts.face_images),
                   text=replace(opts.text, transcripts=_absolute(opts.text.transcripts)))
    _check_inputs(opts)
    clips, csvs = read_clips(opts.splits)
    if not clips:
        raise UserError("the split CSVs list no clips")
    work = WorkFolder(opts.work)
    if _is_main_process():
        for stage in opts.redo:
            work.clear(stage)
    if "visual" in opts.modalities:
        from emimimic.extract.visual import visual_stage

        _run(visual_stage(opts.visual, opts.raw, opts.face_images), clips, work, opts)
    if "audio" in opts.modalities:
        from emimimic.extract.audio import audio_stage

        _run(audio_stage(opts.audio, opts.audio_files, opts.raw), clips, work, opts)
    if "text" in opts.modalities:
        _text(clips, work, opts)
    if not _is_main_process():
        return Summary(len(clips), {}, {}, [], None, False)
    return _finish(clips, csvs, work, opts)


def _finish(clips: list[Clip], csvs: dict[str, SplitCSV], work: WorkFolder,
            opts: ExtractOptions) -> Summary:
    split_of = {c.id: c.split for c in clips}
    done: dict[str, int] = {}
    missing: dict[str, dict[str, int]] = {}
    report: list[list[str]] = []
    packable: dict[str, Path] = {}
    dims: dict[str, int] = {}
    for stage in STAGES:
        if work.provenance(stage) is None:
            continue
        failures = _missing(clips, work, stage)
        have = [c.id for c in clips if work.result_file(stage, c.id).is_file()]
        done[stage] = len(have)
        missing[stage] = dict(Counter(f.reason for f in failures.values()))
        report += [[clip, split_of[clip], stage, f.reason, f.detail]
                   for clip, f in failures.items()]
        if stage == "asr":
            continue
        if len(have) + len(failures) < len(clips):
            print(f"warning: {work.folder(stage)} is incomplete ({len(have) + len(failures)} of "
                  f"{len(clips)} clips); it is left out of the store: run --modalities "
                  f"[{stage}]")
            continue
        if have:
            packable[stage] = work.folder(stage)
            dims[stage] = int(np.load(work.result_file(stage, have[0]), mmap_mode="r").shape[-1])
    report_path = work.root / "report.csv"
    write_csv(report_path, REPORT_HEADER, report)
    with_data = {c.id for m in packable for c in clips if work.result_file(m, c.id).is_file()}
    excluded = [c.id for c in clips if c.id not in with_data]
    updated = False
    if opts.store is not None:
        if not packable:
            raise UserError(f"{work.root}: no modality has complete results to pack into "
                            f"{opts.store}")
        splits = _write_splits(opts, csvs, work, set(excluded))
        record = {"created_by": "emimimic extract", "extract": {
            "work": str(work.root),
            "splits": {s: {"csv": str(p), "sha256": file_sha256(p)}
                       for s, p in opts.splits.items()},
            "modalities": {m: work.provenance(m) for m in packable},
            "asr": work.provenance("asr") if "text" in packable else None,
            "missing": {m: missing.get(m, {}) for m in packable},
            "excluded": excluded,
            "report": str(report_path),
            # which results were packed: a clip redone (--redo, or changed sources) re-packs
            "results": {m: work.results_digest(m, [c.id for c in clips]) for m in packable},
        }}
        updated = _publish(opts.store, work, splits, packable, dims, record, opts.engine.progress)
    return Summary(len(clips), done, missing, excluded, opts.store, updated)
