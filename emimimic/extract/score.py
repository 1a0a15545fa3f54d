"""``emimimic score-clips``: new raw clips -> a trained model's challenge CSV, in one command.

Usage::

    emimimic score-clips --checkpoint runs/final --clips new_clips/ --out scores.csv \\
        [--transcripts new_transcripts.csv] [--engine.batch_size 16 --engine.precision 32-true]

The checkpoint (a ``.ckpt`` of ``emimimic fit``, or a run folder: its best checkpoint, else its
``last.ckpt``) names the store it was trained on; that store's manifest records how
``emimimic extract`` made its features (models, revisions, layers, tokens, frame rate, face
detector and margin, audio windows, speech recognition, text settings, and each model's weights
hash). The clips ``{id}.mp4`` of ``--clips`` (any file stem is an id: integers are zero-padded
to 5 digits, as ABAW's ``Filename``) are extracted with those very settings into a work folder
(``--work``, default ``OUT_STEM_work`` beside ``--out``), each model's weights are checked
against the recorded hash (other weights would give other features, and silently wrong
scores), the features are packed into ``WORK/store`` and the checkpoint's model predicts every
clip in this process. ``--out`` gets the challenge CSV: ``Filename`` + the targets, one row per
clip, predictions in [0, 1].

A clip that lacks a modality (no face found, no audio track, an empty transcript) is scored
through the model's learned missing-modality path. A clip with no data in any modality the
model uses (a corrupt file, say) gets **no row**: one printed line names it, and
``WORK/report.csv`` says why, as for ``emimimic extract``.

``--transcripts FILE`` (``Filename,transcript``) skips speech recognition; without it the
recorded speech recogniser transcribes the clips (``WORK/transcripts.csv``), which needs a store
whose transcripts came from speech recognition. ``--models.visual PATH`` (and ``audio``,
``asr``, ``text``) loads a model from elsewhere than the recorded name (a copy of the same
weights): the weights hash must still match. A store not made by ``emimimic extract`` records no
extraction settings, and is refused. The work folder resumes an interrupted run; it refuses
other clips or settings than it was made for.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from jsonargparse.typing import PositiveInt

from emimimic.constants import ID_COLUMN
from emimimic.errors import UserError
from emimimic.extract.commands import require_extra

require_extra()  # before anything imports av or cv2: a missing extra is one line, not a traceback

from emimimic.extract.engine import EngineOptions  # noqa: E402

#: The split name of the clips in the work folder's store.
SPLIT = "clips"
#: Stages whose model a store's extraction record names, in the order they run.
MODEL_STAGES = ("visual", "audio", "asr", "text")
#: The work folder's record of what it was made for.
INPUTS_FILE = "score_inputs.json"


@dataclass
class ScoreClipsOptions:
    """Score new raw clips with a trained model: extract their features with the settings of the
    store the model was trained on (its weights checked), predict them, and write the challenge
    CSV.

    Attributes:
        checkpoint: a checkpoint of emimimic fit (.ckpt), or its run folder (its best
            checkpoint, else last.ckpt).
        clips: folder of video clips {id}.mp4 (or .mkv, .avi, .webm, .mov); any file stem is a
            clip id.
        out: the challenge CSV to write (Filename + targets); an existing file is refused.
        work: work folder of the extraction, its report.csv and the clips' store (default: beside
            out, named OUT_STEM_work); an interrupted run resumes there.
        store: the store the checkpoint was trained on, to read its extraction settings from
            (default: the path the checkpoint records; pass it when the store has moved).
        transcripts: CSV Filename,transcript of the clips, used instead of speech recognition.
        models: stage (visual, audio, asr, text) -> model name or local path to load instead of
            the recorded one (e.g. the same weights in another folder); its weights must hash to
            the recorded ones.
        device: torch device to predict on (cpu, cuda, cuda:1).
        batch_size: clips per batch when predicting.
        engine: how the extraction stages run (clips per batch, workers, devices, precision).
    """

    checkpoint: Path
    clips: Path
    out: Path
    work: Path | None = None
    store: Path | None = None
    transcripts: Path | None = None
    models: dict[str, str] = field(default_factory=dict)
    device: str = "cpu"
    batch_size: PositiveInt = 64
    engine: EngineOptions = field(default_factory=EngineOptions)


@dataclass
class Scored:
    """What a run wrote: the CSV, the clips it scored and those left out (no data at all)."""

    out: Path
    checkpoint: Path
    ids: list[str]
    excluded: list[str]
    store: Path
    work: Path


# -- the training store's extraction settings --------------------------------------------------


def _training_store(checkpoint: Path, state: dict[str, Any], given: Path | None) -> Path:
    """Returns the store the checkpoint was trained on (or ``given``), checked to be readable."""
    from emimimic.data.store import FeatureStore, StoreError

    if given is not None:
        store = Path(given)
    else:
        recorded = (state.get("datamodule_hyper_parameters") or {}).get("store")
        if not recorded:
            raise UserError(f"{checkpoint} records no training store; pass --store with the "
                            "store it was trained on")
        store = Path(str(recorded))
    if not store.exists():
        where = "--store" if given is not None else f"the store {checkpoint} was trained on"
        raise UserError(f"{store} ({where}) is gone; its manifest records how the features "
                        "were extracted: pass --store to point at a copy of it")
    try:
        FeatureStore(store)
    except StoreError as err:
        raise UserError(f"{store}: not a readable feature store ({err}); pass --store to point "
                        "at a copy of the store the checkpoint was trained on") from None
    return store


def extraction_record(store: Path, modalities: Sequence[str], checkpoint: Path
                      ) -> dict[str, Any]:
    """Returns the store's ``provenance["extract"]``, checked to cover ``modalities``.

    Raises:
        UserError: the store was not made by ``emimimic extract`` (synthetic, or packed from
            features made elsewhere), or its record lacks a modality the model uses.
    """
    from emimimic.data.store import FeatureStore

    provenance = FeatureStore(store).provenance
    record = provenance.get("extract")
    if not isinstance(record, dict) or not isinstance(record.get("modalities"), dict):
        if provenance.get("synthetic"):
            raise UserError(f"{checkpoint} was trained on {store}, a SYNTHETIC store "
                            f"({provenance.get('created_by', 'emimimic synth')}): its features "
                            "come from no model, so raw clips cannot be scored with it; train "
                            "on a store made by `emimimic extract`")
        raise UserError(f"{checkpoint} was trained on {store}, made by "
                        f"{provenance.get('created_by', 'an unknown tool')}, not by `emimimic "
                        "extract`: the models and settings its features were extracted with "
                        "are unknown; extract the clips' features as the store's were made, "
                        "pack them (emimimic pack) and run emimimic predict with the checkpoint")
    lacking = [m for m in modalities if not isinstance(record["modalities"].get(m), dict)]
    if lacking:
        raise UserError(f"{store}: its extraction record has no settings for modality "
                        f"{', '.join(lacking)}, which {checkpoint} uses (it has "
                        f"{sorted(record['modalities'])})")
    return record


def stage_options(cls: type, recorded: dict[str, Any], skip: Sequence[str] = ()) -> Any:
    """Returns a stage's options dataclass built from its recorded provenance.

    Each recorded key that names a field of ``cls`` sets it; the others (``weights_sha256``,
    ``source``, ``frame_rate``...) describe the results, not options. A recorded None for a
    field whose default is not None marks a setting that did not apply to the training run (no
    frame rate for given face crops, no windows for a model encoded whole): the default stays.
    """
    values = {}
    for f in fields(cls):
        if f.name in skip or f.name not in recorded:
            continue
        value = recorded[f.name]
        if value is None and f.default is not None:
            continue
        values[f.name] = value
    return cls(**values)


@dataclass
class Settings:
    """The stages' options rebuilt from the record, what to check the new records against, and
    notes to print.

    Attributes:
        stages: stage -> its options (``VisualOptions``...), as ``ExtractOptions`` takes them.
        expected: stage -> the training store's record of it.
        unchecked: stage -> recorded keys that differ by design (a model given by --models,
            settings that did not apply to given face crops).
        notes: lines to print before extracting.
    """

    stages: dict[str, Any]
    expected: dict[str, dict[str, Any]]
    unchecked: dict[str, set[str]]
    notes: list[str]


#: Recorded keys that describe where a stage's inputs came from, not how they became features.
INPUT_KEYS = frozenset({"source", "frames_from", "transcripts", "transcripts_sha256", "asr"})


def detector_option(recorded: str, store: Path) -> str:
    """Returns the ``--visual.detector`` value that gives the detector a store records.

    The record holds the detector's name (``detector_name``): the built-in detectors' names
    map back to ``haar`` and ``none``; a detector of your own recorded as
    ``package.module:Class`` is that option.

    Raises:
        UserError: a name that is neither (a detector of your own with a ``name`` attribute).
    """
    from emimimic.extract.faces import HaarFaceDetector, WholeFrame

    known = {HaarFaceDetector.name: "haar", WholeFrame.name: "none"}
    if recorded in known:
        return known[recorded]
    if ":" in recorded:
        return recorded
    raise UserError(f"{store}: its faces were found by detector {recorded!r}, a name that does "
                    "not say how to build it (haar, none or package.module:Class); extract the "
                    "clips with that detector yourself and run emimimic predict")


def rebuild_settings(record: dict[str, Any], modalities: Sequence[str], store: Path,
                     transcripts: Path | None, models: dict[str, str]) -> Settings:
    """Returns the extraction options of ``modalities`` as the store's record gives them.

    Raises:
        UserError: text came from a transcripts file and none is given, the transcripts file is
            missing, the recorded face detector cannot be rebuilt, or ``models`` names a stage
            that does not run.
    """
    from emimimic.extract.asr import ASROptions
    from emimimic.extract.audio import AudioOptions
    from emimimic.extract.text import TextOptions
    from emimimic.extract.visual import VisualOptions

    classes = {"visual": VisualOptions, "audio": AudioOptions, "text": TextOptions}
    recorded = record["modalities"]
    stages: dict[str, Any] = {}
    expected: dict[str, dict[str, Any]] = {}
    unchecked: dict[str, set[str]] = {}
    notes: list[str] = []
    for m in modalities:
        # the text record's transcripts are the training clips' file, not an option to copy
        stages[m] = stage_options(classes[m], recorded[m], ("transcripts", "detector"))
        expected[m], unchecked[m] = recorded[m], set()
    if "visual" in modalities:
        visual = recorded["visual"]
        if visual.get("detector") is not None:
            stages["visual"].detector = detector_option(str(visual["detector"]), store)
        if visual.get("source") == "face_images":
            unchecked["visual"] |= {"fps", "detector", "face_margin"}
            notes.append(f"note: {store}'s visual features came from given face crops; the "
                         f"clips' faces are found by the {stages['visual'].detector} detector at "
                         f"{stages['visual'].fps:g} fps instead")
    if transcripts is not None and not Path(transcripts).is_file():
        raise UserError(f"--transcripts {transcripts}: file not found")
    if "text" in modalities:
        if transcripts is not None:
            stages["text"].transcripts = Path(transcripts)
        else:
            asr = record.get("asr") or recorded["text"].get("asr")
            if not isinstance(asr, dict):
                raise UserError(f"{store}'s text features came from a transcripts file "
                                f"({recorded['text'].get('transcripts')}), not speech "
                                "recognition: pass --transcripts with the clips' transcripts "
                                f"(CSV {ID_COLUMN},transcript)")
            stages["asr"] = stage_options(ASROptions, asr)
            expected["asr"], unchecked["asr"] = asr, set()
    elif transcripts is not None:
        notes.append("note: --transcripts is not used: the model uses no text")
    unknown = sorted(set(models) - set(stages))
    if unknown:
        raise UserError(f"--models {unknown}: no such stage runs for this model (it runs "
                        f"{[s for s in MODEL_STAGES if s in stages]})")
    for stage, name in models.items():
        stages[stage].model = name
        unchecked[stage].add("model")
    return Settings(stages, expected, unchecked, notes)


# -- the clips and the work folder ---------------------------------------------------------------


def find_clips(folder: Path) -> dict[str, Path]:
    """Returns clip id -> video file of a folder, in id order (hidden files are skipped).

    Raises:
        UserError: no folder, no clip, or two files with the same id.
    """
    from emimimic.data.store import normalise_id
    from emimimic.extract.media import VIDEO_SUFFIXES

    if not folder.is_dir():
        raise UserError(f"--clips {folder}: folder not found")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix not in VIDEO_SUFFIXES or not path.is_file():
            continue
        clip = normalise_id(path.stem, str(path))
        if clip in found:
            raise UserError(f"{found[clip]} and {path} are both clip {clip}; keep one")
        found[clip] = path
    if not found:
        raise UserError(f"--clips {folder}: no video clip ({'/'.join(VIDEO_SUFFIXES)}) in it")
    return dict(sorted(found.items()))


def _inputs_record(clips: dict[str, Path], settings: Settings) -> dict[str, Any]:
    """Returns what the work folder's results depend on: the clip files and the stage settings
    (the transcripts file by its content)."""
    from emimimic.extract.work import file_sha256

    def plain(options: Any) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()}

    stages = {s: plain(o) for s, o in settings.stages.items()}
    text = settings.stages.get("text")
    if text is not None and text.transcripts is not None:
        stages["text"]["transcripts"] = file_sha256(text.transcripts)
    return json.loads(json.dumps({
        "clips": {c: [p.name, p.stat().st_size, p.stat().st_mtime_ns] for c, p in clips.items()},
        "stages": stages}, sort_keys=True))


def _claim_work(work: Path, inputs: dict[str, Any]) -> None:
    """Records the run's inputs in the work folder, or refuses one made for other inputs.

    A folder made by an earlier run takes more clips, but not a changed clip file (same id) nor
    other settings of a stage it ran: its results would be stale.
    """
    from emimimic.files import write_atomic

    file = work / INPUTS_FILE
    if file.is_file():
        before = json.loads(file.read_text(encoding="utf-8"))
        stages = sorted(s for s in set(before["stages"]) & set(inputs["stages"])
                        if before["stages"][s] != inputs["stages"][s])
        clips = sorted(c for c in set(before["clips"]) & set(inputs["clips"])
                       if before["clips"][c] != inputs["clips"][c])
        if stages or clips:
            what = [f"{s} settings" for s in stages] + (
                [f"clip files {', '.join(clips[:5])}{' ...' if len(clips) > 5 else ''}"]
                if clips else [])
            raise UserError(f"--work {work} holds results of another run (differing: "
                            f"{'; '.join(what)}); pass another --work folder, or remove it")
        inputs = {"clips": {**before["clips"], **inputs["clips"]},
                  "stages": {**before["stages"], **inputs["stages"]}}
        if inputs == before:
            return
    elif work.exists() and (not work.is_dir() or any(work.iterdir())):
        raise UserError(f"--work {work} is not empty and was not made by emimimic score-clips; "
                        "pass a new --work folder")
    write_atomic(file, json.dumps(inputs, indent=1, sort_keys=True) + "\n")


def _raw_folder(clips: dict[str, Path], folder: Path, work: Path) -> Path:
    """Returns a folder where every clip is ``{id}{suffix}``: ``folder`` itself, or (when a file
    stem is not its id, e.g. ``7.mp4`` for clip 00007) links in ``WORK/raw``."""
    if all(p.stem == c for c, p in clips.items()):
        return folder
    raw = work / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for clip, path in clips.items():
        link = raw / f"{clip}{path.suffix}"
        if link.is_symlink() and os.readlink(link) == str(path.resolve()):
            continue  # made by an earlier (interrupted) run, or another process of this one
        link.unlink(missing_ok=True)
        os.symlink(path.resolve(), link)
    return raw


def _write_ids(path: Path, ids: Sequence[str]) -> None:
    """Writes an unlabelled split CSV (``Filename`` only) of ``ids``."""
    from emimimic.extract.work import write_csv

    write_csv(path, [ID_COLUMN], [[c] for c in ids])


# -- the command ---------------------------------------------------------------------------------


def check_records(work: Path, settings: Settings, store: Path) -> None:
    """Refuses clips' features made otherwise than the training store's: a stage whose model's
    weights differ from the recorded ones, or any other recorded setting or property of the
    model (sample rate, frame rate, layer...) that differs.

    Raises:
        UserError: naming the stage, the model and both values (both hashes for weights).
    """
    from emimimic.extract.work import WorkFolder

    folder = WorkFolder(work)
    for stage in MODEL_STAGES:
        if stage not in settings.stages:
            continue
        want, got = settings.expected[stage], folder.provenance(stage) or {}
        model = settings.stages[stage].model
        if want.get("weights_sha256") is None:
            print(f"note: {store} records no weights hash for {stage}: its model {model} is not "
                  "checked", flush=True)
        elif got.get("weights_sha256") != want["weights_sha256"]:
            raise UserError(f"{stage} model {model}: weights sha256 {got.get('weights_sha256')}, "
                            f"but {store}'s features were extracted with weights sha256 "
                            f"{want['weights_sha256']}; features from other weights would be "
                            f"silently wrong: pass the recorded model (--models.{stage} PATH)")
        skip = INPUT_KEYS | settings.unchecked[stage]
        differing = sorted(k for k in set(want) & set(got) if k not in skip and want[k] != got[k])
        if differing:
            raise UserError(f"{stage} model {model}: the clips' features would be made otherwise "
                            f"than {store}'s ("
                            + ", ".join(f"{k} {got[k]!r} instead of {want[k]!r}"
                                        for k in differing)
                            + "); not scoring them with a model trained on the store's")


def _pack(work: Path, ids: list[str], dims: dict[str, int], targets: list[str],
          record: dict[str, Any], progress: bool) -> Path:
    """Packs the clips' features of the work folder into ``WORK/store``; returns its path."""
    from emimimic.data.pack import pack
    from emimimic.data.store.format import write_labels_csv

    store = work / "store"
    for leftover in (store, Path(f"{store}.partial")):
        shutil.rmtree(leftover, ignore_errors=True)
    split = work / "splits" / f"{SPLIT}.csv"
    split.parent.mkdir(parents=True, exist_ok=True)
    write_labels_csv(split, targets, ids, None)
    for m in dims:  # a modality no clip has (no face anywhere) is absent for every clip
        (work / m).mkdir(parents=True, exist_ok=True)
    pack(store, {SPLIT: split}, {m: work / m for m in dims}, missing="absent", targets=targets,
         dims=dims, provenance=record, progress=progress)
    return store


def _models_line(settings: Settings) -> str:
    parts = [f"{s} {settings.stages[s].model}" for s in MODEL_STAGES
             if s in settings.stages and s != "asr"]
    text = settings.stages.get("text")
    if text is not None:
        parts[-1] += (f" (transcripts {text.transcripts})" if text.transcripts is not None
                      else f" (speech recognition {settings.stages['asr'].model})")
    return ", ".join(parts)


def score_clips(opts: ScoreClipsOptions) -> Scored | None:
    """Runs ``emimimic score-clips`` (see the module docstring); returns what it wrote (None in
    the other processes of a multi-device extraction).

    Raises:
        UserError: the output exists, the checkpoint or its store cannot give the extraction
            settings, a model's weights differ from the recorded ones, or no clip has data.
    """
    import numpy as np
    import torch

    from emimimic.data import EMIDataModule
    from emimimic.experiments.ensemble import resolve
    from emimimic.extract.pipeline import ExtractOptions, extract
    from emimimic.extract.work import WorkFolder
    from emimimic.training import EMIModule
    from emimimic.training.checkpoints import check_data_fits, checkpoint_hparams, load_checkpoint
    from emimimic.training.dashboard import predict_split
    from emimimic.training.submission import write_submission

    out = Path(opts.out)
    if out.exists():
        raise UserError(f"--out {out} already exists; move it away or choose another --out")
    checkpoint = resolve(str(opts.checkpoint))
    state = load_checkpoint(checkpoint)
    hparams = checkpoint_hparams(checkpoint, state)
    dims = {m: int(d) for m, d in hparams["dims"].items()}
    store = _training_store(checkpoint, state, opts.store)
    record = extraction_record(store, list(dims), checkpoint)
    settings = rebuild_settings(record, list(dims), store, opts.transcripts, dict(opts.models))
    clips = find_clips(Path(opts.clips))
    device = torch.device(opts.device)
    # the model is rebuilt before any extraction, so a checkpoint that cannot be fails first
    model = EMIModule.load_from_checkpoint(checkpoint, map_location=device)
    targets = list(model.targets)
    work = Path(opts.work) if opts.work is not None else out.parent / f"{out.stem}_work"
    _claim_work(work, _inputs_record(clips, settings))
    raw = _raw_folder(clips, Path(opts.clips), work)
    split = work / f"{SPLIT}.csv"
    _write_ids(split, list(clips))

    for line in settings.notes:
        print(line, flush=True)
    print(f"emimimic score-clips: extracting {len(clips)} clip(s) of {opts.clips} with the "
          f"settings of {store}: {_models_line(settings)}", flush=True)
    summary = extract(ExtractOptions(
        splits={SPLIT: split}, work=work, store=None, raw=raw, modalities=list(dims),
        engine=opts.engine, **settings.stages))
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_rank() != 0:
        return None  # the other processes of a multi-device extraction: rank 0 goes on
    for line in summary.lines():
        print(f"  {line}", flush=True)
    check_records(work, settings, store)

    excluded = set(summary.excluded)
    ids = [c for c in clips if c not in excluded]
    left_out = [c for c in clips if c in excluded]
    report = work / "report.csv"
    if not ids:
        raise UserError(f"none of the {len(clips)} clip(s) has data in any modality the model "
                        f"uses ({', '.join(dims)}); {report} says why")
    if left_out:
        print(f"{len(left_out)} clip(s) with no data in any modality get no row: "
              f"{', '.join(left_out[:10])}{' ...' if len(left_out) > 10 else ''} (see {report})",
              flush=True)
    folder = WorkFolder(work)
    provenance = {"created_by": "emimimic score-clips", "checkpoint": str(checkpoint),
                  "trained_on": str(store), "extract": {
                      "work": str(work.resolve()),
                      "modalities": {m: folder.provenance(m) for m in dims},
                      "asr": folder.provenance("asr") if "asr" in settings.stages else None,
                      "missing": {m: summary.missing.get(m, {}) for m in dims},
                      "excluded": left_out, "report": str(report.resolve())}}
    scored_store = _pack(work, ids, dims, targets, provenance, opts.engine.progress)

    print(f"predicting {len(ids)} clip(s) with {checkpoint} on {device}", flush=True)
    data = EMIDataModule(str(scored_store), batch_size=opts.batch_size, num_workers=0,
                         modalities=list(dims), predict_split=SPLIT)
    check_data_fits(hparams, data.dims, data.targets, str(checkpoint))
    with torch.no_grad():
        result = predict_split(model.net.to(device), data, SPLIT, device)
    preds = np.clip(result.pred.astype(np.float64), 0.0, 1.0)
    write_submission(out, targets, [(c, [float(v) for v in row])
                                    for c, row in zip(result.ids, preds, strict=True)])
    print(f"wrote {out} ({len(result.ids)} clip(s), {len(targets)} targets)", flush=True)
    return Scored(out, checkpoint, list(result.ids), left_out, scored_store, work)


def main(argv: Sequence[str]) -> None:
    """Runs ``emimimic score-clips`` with ``argv`` (the arguments after the subcommand)."""
    from emimimic.commandline import parse_command

    score_clips(ScoreClipsOptions(**parse_command(ScoreClipsOptions, argv,
                                                  "emimimic score-clips")))


__all__ = ["ScoreClipsOptions", "Scored", "Settings", "check_records", "detector_option",
           "extraction_record", "find_clips", "main", "rebuild_settings", "score_clips",
           "stage_options"]
