"""``emimimic score-clips``: raw clips -> a trained model's challenge CSV, in one command.

A tiny store is extracted from raw clips with tiny random-weight models (speech recognition
included), a model is fitted on it for one epoch, and new clips are scored: the CSV must equal
an independent computation (``emimimic extract`` of the same clips with the same settings, then
the checkpoint's network over that store), and what cannot be scored faithfully is refused.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from extract_support import (
    build_lm,
    build_vit,
    build_wavlm,
    build_whisper,
    write_split,
    write_transcripts,
    write_video,
)
from support.reference import QUICKSTART

pytest.importorskip("transformers")
pytest.importorskip("av")
pytest.importorskip("cv2")

from emimimic.cli import cli_main  # noqa: E402
from emimimic.constants import EMOTIONS  # noqa: E402
from emimimic.data import EMIDataModule  # noqa: E402
from emimimic.data.store import FeatureStore  # noqa: E402
from emimimic.data.synth import synth  # noqa: E402
from emimimic.errors import UserError  # noqa: E402
from emimimic.experiments.ensemble import resolve  # noqa: E402
from emimimic.extract import commands, score  # noqa: E402
from emimimic.training import EMIModule  # noqa: E402
from emimimic.training.dashboard import predict_split  # noqa: E402

#: How every extraction here runs: in this process, batches of 2 clips, no progress bars.
ENGINE = ["--engine.num_workers", "0", "--engine.batch_size", "2", "--engine.progress", "false"]
#: New clips to score: file name -> (seconds, face, audio). ``12.mp4`` is clip 00012; 00011 has
#: no face, 00012 no audio track and an empty transcript, and 00013 (written below) is a corrupt
#: file with an empty transcript: no data in any modality, so it gets no row.
NEW = {"00010.mp4": (1.0, True, "speech"), "00011.mp4": (1.2, False, "speech"),
       "12.mp4": (0.8, True, None)}
NEW_IDS = ["00010", "00011", "00012"]
TRANSCRIPTS = {"00010": "hello world", "00011": "a great day in the park", "00012": "",
               "00013": ""}


def model_args(models: Path) -> list[str]:
    return ["--visual.model", str(models / "vit"), "--audio.model", str(models / "wavlm"),
            "--text.model", str(models / "lm"), "--text.max_tokens", "64"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny models, 4 clips extracted into a labelled store (ASR for text), a 1-epoch fit on it,
    and a folder of new clips with their transcripts."""
    root = tmp_path_factory.mktemp("score")
    models = root / "models"
    for name, build in (("vit", build_vit), ("wavlm", build_wavlm), ("whisper", build_whisper),
                        ("lm", build_lm)):
        build(models / name)
    (root / "raw").mkdir()
    for clip in range(4):
        write_video(root / "raw" / f"{clip:05d}.mp4", 1.0, face=clip != 1, seed=clip)
    train = write_split(root / "train.csv", [0, 1])
    valid = write_split(root / "valid.csv", [2, 3], seed=1)
    commands.main(["--splits.train", str(train), "--splits.valid", str(valid),
                   "--raw", str(root / "raw"), "--work", str(root / "work"),
                   "--store", str(root / "store"), *model_args(models),
                   "--asr.model", str(models / "whisper"), "--asr.max_tokens", "8", *ENGINE])
    cli_main(["fit", "-c", str(QUICKSTART), "--data.store", str(root / "store"),
              "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(root / "run"),
              "--trainer.enable_progress_bar", "false", "--data.batch_size", "2"])
    new = root / "new"
    new.mkdir()
    for n, (name, (seconds, face, audio)) in enumerate(NEW.items()):
        write_video(new / name, seconds, face=face, audio=audio, seed=10 + n)
    (new / "00013.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 8)
    (new / "notes.txt").write_text("not a clip")
    return {"root": root, "models": models, "store": root / "store", "run": root / "run",
            "new": new, "tx": write_transcripts(root / "tx.csv", TRANSCRIPTS)}


def read_scores(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], [r[0] for r in rows[1:]], np.array([[float(v) for v in r[1:]]
                                                         for r in rows[1:]])


def parse(argv: list[str]) -> dict:
    from emimimic.commandline import parse_command

    return parse_command(score.ScoreClipsOptions, argv, "emimimic score-clips")


def test_scores_equal_extract_then_predict(trained: dict[str, Path],
                                           capsys: pytest.CaptureFixture) -> None:
    root = trained["root"]
    out = root / "scores.csv"
    capsys.readouterr()
    score.main(["--checkpoint", str(trained["run"]), "--clips", str(trained["new"]),
                "--out", str(out), "--transcripts", str(trained["tx"]), *ENGINE])
    printed = capsys.readouterr().out
    assert "extracting 4 clip(s)" in printed and str(trained["models"] / "vit") in printed
    assert "1 clip(s) with no data in any modality get no row: 00013" in printed
    assert f"wrote {out}" in printed

    header, ids, values = read_scores(out)
    assert header == ["Filename", *EMOTIONS]
    assert ids == NEW_IDS
    assert values.shape == (3, 6) and ((values >= 0) & (values <= 1)).all()

    # the independent computation: emimimic extract of the same clips with the same settings
    # (named as their ids, in a labelled split: extract packs only stores with targets), then
    # the checkpoint's network over that store
    raw = root / "ref_raw"
    raw.mkdir()
    for name in (*NEW, "00013.mp4"):
        shutil.copy(trained["new"] / name, raw / f"{int(Path(name).stem):05d}.mp4")
    split = write_split(root / "ref.csv", [10, 11, 12, 13])
    commands.main(["--splits.new", str(split), "--raw", str(raw), "--work", str(root / "ref_w"),
                   "--store", str(root / "ref_store"), *model_args(trained["models"]),
                   "--text.transcripts", str(trained["tx"]), *ENGINE])
    checkpoint = resolve(str(trained["run"]))
    model = EMIModule.load_from_checkpoint(checkpoint, map_location="cpu")
    data = EMIDataModule(str(root / "ref_store"), batch_size=2, predict_split="new")
    expected = predict_split(model.net, data, "new")
    assert expected.ids == ids
    np.testing.assert_allclose(values, expected.pred, rtol=0, atol=1e-5)

    # the clips' store records the weights it was made with: the training store's
    work = root / "scores_work"
    made = FeatureStore(work / "store").provenance["extract"]["modalities"]
    trained_with = FeatureStore(trained["store"]).provenance["extract"]["modalities"]
    for m in ("visual", "audio", "text"):
        assert made[m]["weights_sha256"] == trained_with[m]["weights_sha256"]
    assert FeatureStore(work / "store").split("clips").present("visual").tolist() == [
        True, False, True]
    with open(work / "report.csv", newline="") as f:
        assert {(r["Filename"], r["modality"]) for r in csv.DictReader(f)} >= {
            ("00011", "visual"), ("00012", "audio"), ("00013", "visual"), ("00013", "audio")}

    with pytest.raises(UserError, match="already exists"):
        score.main(["--checkpoint", str(checkpoint), "--clips", str(trained["new"]),
                    "--out", str(out), *ENGINE])


def test_speech_recognition_path(trained: dict[str, Path],
                                 capsys: pytest.CaptureFixture) -> None:
    """Without --transcripts the recorded speech recogniser transcribes the clips; the scores
    equal those of a run given its transcripts."""
    root = trained["root"]
    capsys.readouterr()
    done = score.score_clips(score.ScoreClipsOptions(
        **parse(["--checkpoint", str(trained["run"]), "--clips", str(trained["new"]),
                 "--out", str(root / "asr.csv"), "--work", str(root / "asr_work"), *ENGINE])))
    printed = capsys.readouterr().out
    assert f"(speech recognition {trained['models'] / 'whisper'})" in printed
    assert done is not None and done.ids == NEW_IDS and done.excluded == ["00013"]
    made = FeatureStore(done.store).provenance["extract"]
    trained_with = FeatureStore(trained["store"]).provenance["extract"]
    assert made["asr"]["weights_sha256"] == trained_with["asr"]["weights_sha256"]
    assert made["asr"]["max_tokens"] == 8
    transcripts = root / "asr_work" / "transcripts.csv"
    # the recogniser's transcripts, fed back as a file, give the same features and scores
    score.main(["--checkpoint", str(trained["run"]), "--clips", str(trained["new"]),
                "--out", str(root / "asr_tx.csv"), "--transcripts", str(transcripts), *ENGINE])
    header, ids, values = read_scores(root / "asr.csv")
    assert header == ["Filename", *EMOTIONS] and ids == NEW_IDS
    assert ((values >= 0) & (values <= 1)).all()
    np.testing.assert_allclose(values, read_scores(root / "asr_tx.csv")[2], rtol=0, atol=1e-6)



def test_what_cannot_be_scored_faithfully_is_refused(trained: dict[str, Path],
                                                      tmp_path: Path) -> None:
    models, new = trained["models"], trained["new"]
    checkpoint = resolve(str(trained["run"]))

    def run(*argv: str, out: str = "out.csv", clips: Path = new) -> None:
        score.main(["--clips", str(clips), "--out", str(tmp_path / out), *ENGINE, *argv])

    # a checkpoint trained on emimimic synth data: its features come from no model
    synth(tmp_path / "synth", counts={"train": 8, "valid": 4}, dims={"visual": 8, "audio": 8})
    cli_main(["fit", "-c", str(QUICKSTART), "--data.store", str(tmp_path / "synth"),
              "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path / "run"),
              "--trainer.enable_progress_bar", "false", "--data.batch_size", "4",
              "--trainer.enable_model_summary", "false"])
    with pytest.raises(UserError, match=r"a SYNTHETIC store .*come from no model"):
        run("--checkpoint", str(tmp_path / "run"))
    # the store the checkpoint was trained on is gone: --store points at a copy
    moved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    moved["datamodule_hyper_parameters"]["store"] = str(tmp_path / "gone")
    torch.save(moved, tmp_path / "moved.ckpt")
    with pytest.raises(UserError, match=r"gone.*pass --store to point at a copy"):
        run("--checkpoint", str(tmp_path / "moved.ckpt"))
    # ... and a store not made by emimimic extract records no extraction settings
    with pytest.raises(UserError, match=r"SYNTHETIC"):
        run("--checkpoint", str(tmp_path / "moved.ckpt"), "--store", str(tmp_path / "synth"))
    # ... nor does one packed from features made elsewhere
    from emimimic.data.pack import pack

    (tmp_path / "features").mkdir()
    for clip in ("00000", "00001"):
        np.save(tmp_path / "features" / f"{clip}.npy", np.ones((3, 4), np.float32))
    pack(tmp_path / "packed", {"train": write_split(tmp_path / "p.csv", [0, 1])},
         {"visual": tmp_path / "features"}, progress=False)
    with pytest.raises(UserError, match=r"made by emimimic pack, not by `emimimic extract`: "
                                        r"the models and settings .* are unknown"):
        score.extraction_record(tmp_path / "packed", ["visual"], checkpoint)
    # text from a transcripts file needs transcripts; a stage that does not run; an odd detector
    record = FeatureStore(trained["store"]).provenance["extract"]
    no_asr = {**record, "asr": None,
              "modalities": {**record["modalities"],
                             "text": {**record["modalities"]["text"], "asr": None}}}
    with pytest.raises(UserError, match=r"came from a transcripts file .*pass --transcripts"):
        score.rebuild_settings(no_asr, ["visual", "text"], trained["store"], None, {})
    with pytest.raises(UserError, match=r"--models \['asr'\]: no such stage"):
        score.rebuild_settings(record, ["visual", "text"], trained["store"], trained["tx"],
                               {"asr": "x"})
    assert [score.detector_option(name, tmp_path) for name in (
        "opencv-haar-frontalface-default", "whole-frame", "my.module:Finder")] == [
        "haar", "none", "my.module:Finder"]
    with pytest.raises(UserError, match="'my-finder'"):
        score.detector_option("my-finder", tmp_path)

    # a model whose weights differ from the recorded ones (features would be silently wrong)
    from transformers import ViTModel

    from emimimic.extract.engine import weights_sha256

    other = ViTModel.from_pretrained(models / "vit")
    with torch.no_grad():
        other.pooler.dense.bias += 0.01
    other.save_pretrained(tmp_path / "vit2")
    shutil.copy(models / "vit" / "preprocessor_config.json", tmp_path / "vit2")
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(new / "00010.mp4", one)
    recorded = record["modalities"]["visual"]["weights_sha256"]
    with pytest.raises(UserError, match=rf"visual model {tmp_path / 'vit2'}: weights sha256 "
                                        rf"{weights_sha256(other)}, but .*{recorded}"):
        run("--checkpoint", str(checkpoint), "--transcripts", str(trained["tx"]),
            "--models.visual", str(tmp_path / "vit2"), "--work", str(tmp_path / "w"), clips=one)
    assert not (tmp_path / "out.csv").exists()
    # the work folder refuses other inputs than it was made for, and a folder of other things
    with pytest.raises(UserError, match=r"another run \(differing: visual settings\)"):
        run("--checkpoint", str(checkpoint), "--transcripts", str(trained["tx"]),
            "--work", str(tmp_path / "w"), clips=one)
    with pytest.raises(UserError, match="not empty and was not made by emimimic score-clips"):
        run("--checkpoint", str(checkpoint), "--transcripts", str(trained["tx"]),
            "--work", str(trained["root"] / "work"), clips=one)
