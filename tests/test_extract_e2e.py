"""End to end in subprocesses: kill -9 mid-extraction, resume, and ``emimimic fit`` on the store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from extract_support import (
    build_lm,
    build_vit,
    build_wavlm,
    build_whisper,
    write_split,
    write_video,
)
from support.reference import REPO

pytest.importorskip("transformers")
pytest.importorskip("av")
pytest.importorskip("cv2")

from emimimic.extract import commands  # noqa: E402

TRAIN, VALID = list(range(0, 6)), list(range(6, 10))


def extract_argv(root: Path, work: str, store: str) -> list[str]:
    """The argv of a full extraction (all modalities, speech recognition included)."""
    m = root / "models"
    return ["--splits.train", str(root / "train.csv"), "--splits.valid",
            str(root / "valid.csv"),
            "--raw", str(root / "raw"), "--work", str(root / work), "--store", str(root / store),
            "--visual.model", str(m / "vit"), "--audio.model", str(m / "wavlm"),
            "--asr.model", str(m / "whisper"), "--asr.max_tokens", "8",
            "--text.model", str(m / "lm"), "--engine.batch_size", "2", "--engine.num_workers", "0",
            "--engine.progress", "false"]


def start(argv: list[str]) -> subprocess.Popen:
    code = f"from emimimic.extract.commands import main; main({argv!r})"
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 clips of 1-2 s (one without a face, one without audio), labelled train and valid
    splits, and the tiny models."""
    root = tmp_path_factory.mktemp("e2e")
    (root / "raw").mkdir()
    for clip in TRAIN + VALID:
        write_video(root / "raw" / f"{clip:05d}.mp4", 1.0 + (clip % 3) * 0.5,
                    face=clip != 3, audio=None if clip == 7 else "speech", seed=clip)
    write_split(root / "train.csv", TRAIN)
    write_split(root / "valid.csv", VALID, seed=1)
    for name, build in (("vit", build_vit), ("wavlm", build_wavlm), ("whisper", build_whisper),
                        ("lm", build_lm)):
        build(root / "models" / name)
    return root


@pytest.fixture(scope="module")
def reference(clips: Path) -> Path:
    """The store of an uninterrupted in-process extraction of the clips."""
    commands.main(extract_argv(clips, "work_ref", "store_ref"))
    return clips / "store_ref"


def store_files(store: Path) -> dict[str, bytes]:
    """The bytes of a store's data files (the manifest names its work folder, so is left out)."""
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


@pytest.mark.slow
def test_kill_9_then_rerun_gives_the_uninterrupted_store(clips: Path, reference: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    proc = start(extract_argv(clips, "work", "store"))
    audio = clips / "work" / "audio"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if audio.is_dir() and len(list(audio.glob("*.npy"))) >= 3:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stdout.read()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (clips / "store").exists()
    done = len(list(audio.glob("*.npy")))
    assert 3 <= done < len(TRAIN + VALID)

    proc = start(extract_argv(clips, "work", "store"))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "audio: 9 with results, 1 missing (no_audio 1)" in out
    assert store_files(clips / "store") == store_files(reference)
    # leftovers of the killed run (temporary files) are never taken for results
    assert all(not p.name.startswith(".") for p in (clips / "store").rglob("*"))

    capsys.readouterr()
    commands.main(extract_argv(clips, "work", "store"))
    assert "up to date" in capsys.readouterr().out


@pytest.mark.slow
def test_fit_one_epoch_on_an_extracted_store(reference: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "emimimic", "fit", "-c", "configs/quickstart.yaml",
           "--data.store", str(reference), "--trainer.default_root_dir", str(tmp_path),
           "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert list(tmp_path.rglob("*.ckpt")), "fit wrote no checkpoint"
