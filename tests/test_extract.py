"""``emimimic extract`` in-process: features, bad inputs, transcripts, resume and the store."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from extract_support import (
    RATE,
    build_lm,
    build_vit,
    build_wavlm,
    build_whisper,
    speech_like,
    write_face_images,
    write_split,
    write_transcripts,
    write_video,
    write_wav,
)
from support.reference import torch_pool

pytest.importorskip("transformers")
pytest.importorskip("av")
pytest.importorskip("cv2")

from emimimic.data.store import FeatureStore  # noqa: E402
from emimimic.errors import UserError  # noqa: E402
from emimimic.extract import commands  # noqa: E402
from emimimic.extract.audio import FrontEnd, plan_windows  # noqa: E402


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random-weight models saved with ``save_pretrained``: vit, wavlm, whisper, lm."""
    root = tmp_path_factory.mktemp("models")
    return {"vit": build_vit(root / "vit"), "wavlm": build_wavlm(root / "wavlm"),
            "whisper": build_whisper(root / "whisper"), "lm": build_lm(root / "lm")}


def run(tmp: Path, splits: dict[str, Path], *extra: str, work: str = "work",
        store: str | None = "store") -> list[str]:
    """Runs ``emimimic extract`` in-process; returns its argv (for reruns)."""
    argv = [a for s, p in splits.items() for a in (f"--splits.{s}", str(p))]
    argv += ["--work", str(tmp / work), "--engine.num_workers", "0", "--engine.batch_size", "2",
             "--engine.progress", "false"]
    if store is not None:
        argv += ["--store", str(tmp / store)]
    commands.main(argv + list(extra))
    return argv + list(extra)


def report_rows(work: Path) -> list[dict[str, str]]:
    with open(work / "report.csv", newline="") as f:
        return list(csv.DictReader(f))


def reference_encoding(model_dir: Path, kind: str, data) -> np.ndarray:
    """Encodes one clip's input the plain transformers way, with no batching and no pipeline."""
    from transformers import AutoFeatureExtractor, AutoImageProcessor, AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        if kind == "visual":
            pixels = AutoImageProcessor.from_pretrained(model_dir)(
                images=data, return_tensors="pt")["pixel_values"]
            return model(pixel_values=pixels).last_hidden_state[:, 0].numpy()
        if kind == "audio":
            values = AutoFeatureExtractor.from_pretrained(model_dir)(
                data, sampling_rate=RATE, return_tensors="pt")["input_values"]
            return model(input_values=values).last_hidden_state[0].numpy()
        ids = AutoTokenizer.from_pretrained(model_dir)(data, return_tensors="pt")["input_ids"]
        return model(input_ids=ids).last_hidden_state[0].numpy()


def test_pooled_features_equal_independent_encoding(tmp_path: Path, models: dict) -> None:
    import cv2

    faces, audio = tmp_path / "face_images", tmp_path / "audio"
    audio.mkdir()
    crops, waves = {}, {}
    texts = {"00000": "hello world", "00001": "a great day for a walk in the park",
             "00002": "we are happy", "00003": "see you again today friends"}
    for n, clip in enumerate(texts):
        paths = write_face_images(faces / clip, count=3 + 2 * n, seed=n)
        crops[clip] = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in paths]
        waves[clip] = write_wav(audio / f"{clip}.wav", speech_like(0.5 + 0.6 * n, seed=n))
    splits = {"train": write_split(tmp_path / "train.csv", [0, 1, 2]),
              "valid": write_split(tmp_path / "valid.csv", [3], seed=1)}
    tx = write_transcripts(tmp_path / "tx.csv", texts)
    run(tmp_path, splits, "--face_images", str(faces), "--audio_files", str(audio),
        "--visual.model", str(models["vit"]), "--audio.model", str(models["wavlm"]),
        "--text.model", str(models["lm"]), "--text.transcripts", str(tx))

    store = FeatureStore(tmp_path / "store")
    for split in ("train", "valid"):
        view = store.split(split)
        for i, clip in enumerate(view.ids):
            for m, model, data in (("visual", "vit", crops[clip]), ("audio", "wavlm", waves[clip]),
                                   ("text", "lm", texts[clip])):
                raw = reference_encoding(models[model], m, data)
                assert view.raw_lengths(m)[i] == raw.shape[0], (clip, m)
                np.testing.assert_allclose(view.read(m, i).astype(np.float32),
                                           torch_pool(raw).astype(np.float32), rtol=1e-2, atol=3e-3,
                                           err_msg=f"clip {clip}, {m}")

    # the provenance of each modality is in the manifest
    extract = store.provenance["extract"]
    visual, audio_p, text = (extract["modalities"][m] for m in ("visual", "audio", "text"))
    assert visual["model"] == str(models["vit"]) and visual["source"] == "face_images"
    assert visual["layer"] == "last" and visual["token"] == "cls"
    assert audio_p["model"] == str(models["wavlm"]) and audio_p["frame_rate"] == 50.0
    assert text["transcripts"] == str(tx) and text["transcripts_sha256"]
    hashes = {p["weights_sha256"] for p in (visual, audio_p, text)}
    assert len(hashes) == 3 and all(len(h) == 64 for h in hashes)
    assert extract["splits"]["train"]["csv"] == str(splits["train"])


@pytest.fixture(scope="session")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Clips 0-1 good (face, speech), 2 no face, 3 no audio stream, 4 corrupt, 5 zero-length,
    6 no file at all."""
    raw = tmp_path_factory.mktemp("raw")
    write_video(raw / "00000.mp4", 2.0, seed=0)
    write_video(raw / "00001.mp4", 1.2, seed=1)
    write_video(raw / "00002.mp4", 1.0, face=False, seed=2)
    write_video(raw / "00003.mp4", 1.0, audio=None, seed=3)
    (raw / "00004.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 8)
    write_video(raw / "00005.mp4", 0.0, seed=5)
    return raw


def test_bad_inputs_are_recorded_with_reasons(tmp_path: Path, models: dict, videos: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    splits = {"train": write_split(tmp_path / "train.csv", [0, 1, 2, 3]),
              "valid": write_split(tmp_path / "valid.csv", [4, 5, 6], seed=1)}
    tx = write_transcripts(tmp_path / "tx.csv", {"00000": "hello world", "00001": "",
                                                 "00002": "what a day", "00003": "hello",
                                                 "00004": "", "00005": "", "00006": "friends"})
    run(tmp_path, splits, "--raw", str(videos), "--visual.model", str(models["vit"]),
        "--audio.model", str(models["wavlm"]), "--text.model", str(models["lm"]),
        "--text.transcripts", str(tx))
    printed = capsys.readouterr().out
    reasons = {(r["Filename"], r["modality"]): r["reason"] for r in report_rows(tmp_path / "work")}
    assert reasons == {
        ("00002", "visual"): "no_face", ("00003", "audio"): "no_audio",
        ("00004", "visual"): "corrupt", ("00004", "audio"): "corrupt",
        ("00005", "visual"): "empty", ("00005", "audio"): "empty",
        ("00006", "visual"): "missing_file", ("00006", "audio"): "missing_file",
        ("00001", "text"): "empty_transcript", ("00004", "text"): "empty_transcript",
        ("00005", "text"): "empty_transcript",
    }
    assert "visual: 3 with results, 4 missing (corrupt 1, empty 1, missing_file 1, no_face 1)" \
        in printed
    assert "text: 4 with results, 3 missing (empty_transcript 3)" in printed
    # clips 4 and 5 have no data at all: left out of the store, and said so
    assert "00004, 00005" in printed
    store = FeatureStore(tmp_path / "store")
    train, valid = store.split("train"), store.split("valid")
    assert train.ids == ["00000", "00001", "00002", "00003"] and valid.ids == ["00006"]
    assert train.present("visual").tolist() == [True, True, False, True]
    assert train.present("audio").tolist() == [True, True, True, False]
    assert train.present("text").tolist() == [True, False, True, True]
    assert store.provenance["extract"]["excluded"] == ["00004", "00005"]
    assert store.provenance["extract"]["missing"]["visual"] == {
        "no_face": 1, "corrupt": 1, "empty": 1, "missing_file": 1}
    # 2.0 s at 5 fps, a face in every frame; WavLM: 50 frames/s (AAC pads the end a little)
    assert train.raw_lengths("visual")[0] == 10
    assert 99 <= train.raw_lengths("audio")[0] <= 105
    # the empty transcript left text missing, not a placeholder embedding
    assert not (tmp_path / "work" / "text" / "00001.npy").exists()

    # the same inputs under --bad-input error stop at the first bad clip, naming it
    with pytest.raises(UserError, match=r"clip 00002 \(visual\): no_face: .*00002\.mp4"):
        run(tmp_path, splits, "--raw", str(videos), "--visual.model", str(models["vit"]),
            "--modalities", "[visual]", "--bad_input", "error", work="work2", store=None)
    with pytest.raises(UserError, match=r"clip 00003 \(audio\): no_audio"):
        run(tmp_path, splits, "--raw", str(videos), "--audio.model", str(models["wavlm"]),
            "--modalities", "[audio]", "--bad_input", "error", work="work3", store=None)


def test_placeholder_replaces_empty_transcripts(tmp_path: Path, models: dict) -> None:
    splits = {"train": write_split(tmp_path / "train.csv", [0, 1])}
    tx = write_transcripts(tmp_path / "tx.csv", {"00000": "hello world", "00001": "  "})
    run(tmp_path, splits, "--modalities", "[text]", "--text.model", str(models["lm"]),
        "--text.transcripts", str(tx), "--text.empty_text", "placeholder=the park", store=None)
    got = np.load(tmp_path / "work" / "text" / "00001.npy")
    np.testing.assert_allclose(got, reference_encoding(models["lm"], "text", "the park"),
                               rtol=1e-4, atol=1e-5)
    assert json.loads((tmp_path / "work" / "provenance" / "text.json").read_text())[
        "empty_text"] == "placeholder=the park"


def test_chunked_audio_matches_unchunked(tmp_path: Path, models: dict) -> None:
    audio = tmp_path / "audio"
    audio.mkdir()
    write_wav(audio / "00000.wav", speech_like(7.3, seed=4))
    splits = {"train": write_split(tmp_path / "train.csv", [0])}
    common = ("--modalities", "[audio]", "--audio_files", str(audio), "--audio.model",
              str(models["wavlm"]))
    run(tmp_path, splits, *common, "--audio.chunk_seconds", "60", work="whole", store=None)
    run(tmp_path, splits, *common, "--audio.chunk_seconds", "2", "--audio.context_seconds", "1.5",
        work="chunked", store=None)
    whole = np.load(tmp_path / "whole" / "audio" / "00000.npy")
    chunked = np.load(tmp_path / "chunked" / "audio" / "00000.npy")
    assert whole.shape == chunked.shape == (7.3 * 50 - 1, 32)
    # the transformer layers see 1.5 s of context instead of the whole clip: close, not equal
    # (measured: max 2.2e-3, mean 5e-4 with 1.5 s of context; max 0.66 with none)
    np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-2)
    assert np.abs(chunked - whole).mean() < 1e-3


@pytest.mark.parametrize("samples", [400, 32000, 32319, 32320, 32721, 100_000, 16000 * 61 + 7])
def test_audio_windows_cover_every_frame_once(samples: int) -> None:
    front = FrontEnd((10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2))
    windows = plan_windows(0, samples, front, chunk_seconds=2.0, context_seconds=0.5, rate=16000)
    covered = []
    for w in windows:
        local = front.frames(w.end - w.start)
        keep_to = local if w.keep_to is None else w.keep_to
        assert 0 <= w.keep_from <= keep_to <= local  # the window computes every kept frame
        assert w.start % front.stride == 0  # so its frames are the clip's frames
        covered += range(w.start // front.stride + w.keep_from, w.start // front.stride + keep_to)
    assert covered == list(range(front.frames(samples)))


def test_speech_recognition_writes_correctable_transcripts(tmp_path: Path, models: dict) -> None:
    from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor

    audio = tmp_path / "audio"
    audio.mkdir()
    waves = {c: write_wav(audio / f"{c}.wav", speech_like(1.0 + n, seed=n))
             for n, c in enumerate(("00000", "00001", "00002"))}
    splits = {"train": write_split(tmp_path / "train.csv", [0, 1, 2])}
    common = ["--modalities", "[text]", "--audio_files", str(audio), "--text.model",
              str(models["lm"])]
    run(tmp_path, splits, *common, "--asr.model", str(models["whisper"]),
        "--asr.max_tokens", "12")

    model = AutoModelForSpeechSeq2Seq.from_pretrained(models["whisper"]).eval()
    processor = AutoProcessor.from_pretrained(models["whisper"])
    path = tmp_path / "work" / "transcripts.csv"
    with open(path, newline="") as f:
        written = {r["Filename"]: r["transcript"] for r in csv.DictReader(f)}
    for clip, wave in waves.items():
        features = processor(wave, sampling_rate=RATE, return_tensors="pt").input_features
        expected = processor.batch_decode(model.generate(features, max_new_tokens=12),
                                          skip_special_tokens=True)[0].strip()
        assert expected and written[clip] == expected
    store = FeatureStore(tmp_path / "store")
    asr = store.provenance["extract"]["asr"]
    assert asr["model"] == str(models["whisper"]) and asr["max_tokens"] == 12
    assert store.provenance["extract"]["modalities"]["text"]["transcripts"] == str(path)

    # the user corrects a transcript and feeds the file back: ASR is skipped, text is redone
    corrected = write_transcripts(tmp_path / "corrected.csv",
                                  {**written, "00001": "hello world"})
    with pytest.raises(UserError, match=r"--redo \[text\]"):
        run(tmp_path, splits, *common, "--text.transcripts", str(corrected))
    run(tmp_path, splits, *common, "--text.transcripts", str(corrected), "--redo", "[text]")
    np.testing.assert_allclose(np.load(tmp_path / "work" / "text" / "00001.npy"),
                               reference_encoding(models["lm"], "text", "hello world"),
                               rtol=1e-4, atol=1e-5)
    text = FeatureStore(tmp_path / "store").provenance["extract"]["modalities"]["text"]
    assert text["transcripts"] == str(corrected) and text["asr"] is None


def test_store_gains_a_modality_and_a_finished_run_does_nothing(
        tmp_path: Path, models: dict, videos: Path, capsys: pytest.CaptureFixture) -> None:
    splits = {"train": write_split(tmp_path / "train.csv", [0, 1]),
              "valid": write_split(tmp_path / "valid.csv", [3], seed=1)}
    base = ["--raw", str(videos), "--visual.model", str(models["vit"]),
            "--audio.model", str(models["wavlm"])]
    run(tmp_path, splits, *base, "--modalities", "[visual]")
    assert set(FeatureStore(tmp_path / "store").dims) == {"visual"}
    visual = FeatureStore(tmp_path / "store").split("train").read("visual", 1)

    argv = run(tmp_path, splits, *base, "--modalities", "[audio]")
    store = FeatureStore(tmp_path / "store")
    assert set(store.dims) == {"visual", "audio"}
    np.testing.assert_array_equal(store.split("train").read("visual", 1), visual)
    assert not list(tmp_path.glob("store.*"))  # no leftovers of the re-pack

    manifest = tmp_path / "store" / "manifest.json"
    before = (manifest.stat().st_mtime_ns, sorted(p.name for p in (tmp_path / "work").rglob("*")))
    capsys.readouterr()
    commands.main(argv)
    assert "up to date" in capsys.readouterr().out
    assert (manifest.stat().st_mtime_ns,
            sorted(p.name for p in (tmp_path / "work").rglob("*"))) == before


def test_a_resume_redoes_clips_whose_source_files_changed(
        tmp_path: Path, models: dict, videos: Path, capsys: pytest.CaptureFixture) -> None:
    """Class 4 of the hardening issue for extract: a clip whose video was replaced after its
    features were made is redone, and the store equals a fresh extraction of today's files."""
    import shutil

    raw = tmp_path / "raw"
    raw.mkdir()
    for clip in ("00000", "00001"):
        shutil.copy(videos / f"{clip}.mp4", raw / f"{clip}.mp4")
    splits = {"train": write_split(tmp_path / "train.csv", [0, 1])}
    argv = run(tmp_path, splits, "--raw", str(raw), "--visual.model", str(models["vit"]),
               "--audio.model", str(models["wavlm"]), "--modalities", "[visual, audio]")
    first = FeatureStore(tmp_path / "store").split("train")
    old = {m: first.read(m, 0) for m in ("visual", "audio")}

    write_video(raw / "00000.mp4", 1.6, seed=7)  # the user replaces clip 0's video
    capsys.readouterr()
    commands.main(argv)
    out = capsys.readouterr().out
    assert "visual: 1 clip(s) whose source files changed" in out and "(00000)" in out
    assert "audio: 1 clip(s) whose source files changed" in out

    fresh_dir = tmp_path / "fresh"
    fresh_dir.mkdir()
    run(fresh_dir, splits, "--raw", str(raw), "--visual.model", str(models["vit"]),
        "--audio.model", str(models["wavlm"]), "--modalities", "[visual, audio]")
    resumed = FeatureStore(tmp_path / "store").split("train")
    fresh = FeatureStore(fresh_dir / "store").split("train")
    for modality in ("visual", "audio"):
        for index in (0, 1):
            np.testing.assert_array_equal(resumed.read(modality, index),
                                          fresh.read(modality, index))
        assert not np.array_equal(resumed.read(modality, 0), old[modality])  # it did change
    capsys.readouterr()
    commands.main(argv)  # nothing changed since: nothing redone, the store up to date
    out = capsys.readouterr().out
    assert "changed since" not in out and "up to date" in out


def test_changed_settings_are_refused(tmp_path: Path, models: dict, videos: Path) -> None:
    splits = {"train": write_split(tmp_path / "train.csv", [0])}
    base = ["--raw", str(videos), "--visual.model", str(models["vit"]), "--modalities", "[visual]"]
    run(tmp_path, splits, *base, store=None)
    with pytest.raises(UserError, match=r"differing: fps.*--redo \[visual\]"):
        run(tmp_path, splits, *base, "--visual.fps", "2", store=None)
    run(tmp_path, splits, *base, "--visual.fps", "2", "--redo", "[visual]", store=None)
    assert np.load(tmp_path / "work" / "visual" / "00000.npy").shape[0] == 4


def test_without_the_extra_it_says_which_to_install(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "av" else real(name, *a))
    with pytest.raises(UserError, match=r"missing: av\); install it with pip install -e "
                                        r"\"\.\[extract\]\""):
        commands.main(["--splits.train", str(tmp_path / "t.csv"), "--work", str(tmp_path)])


def test_options_are_checked_before_any_model_loads(tmp_path: Path) -> None:
    splits = {"train": write_split(tmp_path / "train.csv", [0])}
    with pytest.raises(UserError,
                       match="--modalities text needs --asr.model or --text.transcripts"):
        run(tmp_path, splits, "--modalities", "[text]", "--text.model", "x", store=None)
    with pytest.raises(UserError, match="--modalities visual needs --raw"):
        run(tmp_path, splits, "--modalities", "[visual]", "--visual.model", "x", store=None)
    with pytest.raises(UserError, match="--text.empty_text 'blank'"):
        run(tmp_path, splits, "--modalities", "[text]", "--text.model", "x", "--text.transcripts",
            str(write_transcripts(tmp_path / "t.csv", {"00000": "hi"})), "--text.empty_text",
            "blank", store=None)
    assert not os.path.exists(tmp_path / "work" / "provenance")


def test_a_config_file_gives_the_same_run_as_the_flags(tmp_path: Path, models: dict,
                                                      capsys: pytest.CaptureFixture) -> None:
    """``--print_config`` writes the flags' options; ``-c`` reads them back into the same run:
    the flags then find every result done and the store up to date (the provenance, which
    records every option that changes results, is equal)."""
    splits = {"train": write_split(tmp_path / "train.csv", [0, 1, 2])}
    tx = write_transcripts(tmp_path / "tx.csv", {"00000": "hi there", "00001": "a dog",
                                                 "00002": ""})
    flags = [a for s, p in splits.items() for a in (f"--splits.{s}", str(p))]
    flags += ["--work", str(tmp_path / "work"), "--store", str(tmp_path / "store"),
              "--engine.num_workers", "0", "--engine.batch_size", "2", "--engine.progress",
              "false", "--modalities", "[text]", "--text.model", str(models["lm"]),
              "--text.transcripts", str(tx), "--text.max_tokens", "16", "--text.layer", "-2"]
    with pytest.raises(SystemExit):
        commands.main([*flags, "--print_config"])
    config = tmp_path / "extract.yaml"
    config.write_text(capsys.readouterr().out)
    assert "max_tokens: 16" in config.read_text() and "layer: '-2'" in config.read_text()
    assert not (tmp_path / "work").exists()  # printing did nothing else
    commands.main(["-c", str(config)])
    assert "store" in capsys.readouterr().out
    first = (tmp_path / "store" / "manifest.json").read_bytes()
    commands.main(flags)
    assert f"store {tmp_path / 'store'}: up to date" in capsys.readouterr().out
    assert (tmp_path / "store" / "manifest.json").read_bytes() == first
    # and a flag that differs is a different run, refused against the same work folder
    with pytest.raises(UserError, match="differing: max_tokens"):
        commands.main([*flags[:-4], "--text.max_tokens", "8", "--text.layer", "-2"])
