"""Decoding of raw clips with PyAV: video frames at a chosen rate, audio as 16 kHz mono.

A clip that cannot give the data asked for raises :class:`BadClip` with one of the
:data:`REASONS`; the pipeline records it (the modality is missing for that clip) or turns it into
an error, per ``--bad-input``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np

#: Why a clip has no data for a modality, as written in the report file.
REASONS: dict[str, str] = {
    "missing_file": "no media file for the clip",
    "corrupt": "the file could not be opened or decoded",
    "no_video": "the file has no video stream",
    "no_audio": "the file has no audio stream",
    "empty": "zero-length: no frames, no face images or too few audio samples",
    "no_face": "no face found in any sampled frame",
    "empty_transcript": "the transcript is empty (a silent clip) and --empty-text is 'missing'",
}
#: Reasons that are expected outcomes, recorded even under ``--bad-input error``.
EXPECTED_REASONS = ("empty_transcript",)

VIDEO_SUFFIXES = (".mp4", ".mkv", ".avi", ".webm", ".mov")
AUDIO_SUFFIXES = (".wav", ".mp3", ".flac", ".m4a", ".ogg", ".aac")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


@dataclass
class Failure:
    """Why one clip has no data for one modality: a key of :data:`REASONS` and the details.

    Not frozen: it travels inside batches, which Lightning rebuilds field by field.
    """

    reason: str
    detail: str


class BadClip(Exception):
    """A clip cannot give the data asked for; ``failure`` says why (file, clip and reason)."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown reason {reason!r}; expected one of {sorted(REASONS)}")
        super().__init__(reason, detail)
        self.failure = Failure(reason, detail)

    def __str__(self) -> str:
        return f"{self.failure.reason}: {self.failure.detail}"


def find_media(folder: Path | None, clip: str, suffixes: tuple[str, ...]) -> Path | None:
    """Returns ``folder/{clip}{suffix}`` for the first suffix that exists, or None."""
    if folder is None:
        return None
    for suffix in suffixes:
        path = folder / f"{clip}{suffix}"
        if path.is_file():
            return path
    return None


def _check_not_empty(path: Path) -> None:
    if path.stat().st_size == 0:
        raise BadClip("empty", f"{path}: zero-byte file")


def _first_stream(path: Path, container: Any, kind: str) -> Any:
    """Returns the container's first ``kind`` ("video" or "audio") stream, or raises BadClip."""
    # a video muxed with no frames (a zero-length clip) keeps no streams at all
    if not container.streams:
        raise BadClip("empty", f"{path}: no streams (a zero-length clip)")
    streams = getattr(container.streams, kind)
    if not streams:
        raise BadClip(f"no_{kind}", f"{path}: no {kind} stream "
                                    f"(streams: {[s.type for s in container.streams]})")
    return streams[0]


def audio_source(clip: str, audio_dir: Path | None, raw_dir: Path | None) -> Path | None:
    """Returns the file a clip's audio is read from: ``audio_dir/{clip}.*`` if there, else the
    video ``raw_dir/{clip}.*``; None for neither."""
    return find_media(audio_dir, clip, AUDIO_SUFFIXES) or find_media(raw_dir, clip, VIDEO_SUFFIXES)


def clip_audio(clip: str, audio_dir: Path | None, raw_dir: Path | None,
               rate: int = 16000) -> np.ndarray:
    """Returns a clip's mono audio at ``rate`` Hz: from ``audio_dir/{clip}.*`` if there, else
    from the audio track of ``raw_dir/{clip}.mp4`` (or another video suffix).

    Raises:
        BadClip: ``missing_file`` (neither exists) or a decoding failure of :func:`decode_audio`.
    """
    path = audio_source(clip, audio_dir, raw_dir)
    if path is None:
        looked = [str(d) for d in (audio_dir, raw_dir) if d is not None]
        raise BadClip("missing_file", f"clip {clip}: no audio or video file in {looked}")
    return decode_audio(path, rate)


def decode_frames(path: Path, fps: float | None) -> list[np.ndarray]:
    """Returns the RGB frames ([H, W, 3] uint8) of a video, sampled at ``fps`` (None: all).

    Sampling keeps the first frame at or after each time k / fps, so a clip's frame count is
    about its duration times ``fps`` whatever the video's own rate.

    Raises:
        BadClip: ``corrupt`` (not a readable media file), ``no_video``, or ``empty`` (a
            zero-byte file, no streams or no frames).
    """
    frames: list[np.ndarray] = []
    _check_not_empty(path)
    try:
        with av.open(str(path)) as container:
            stream = _first_stream(path, container, "video")
            stream.thread_type = "AUTO"
            next_time = 0.0
            for n, frame in enumerate(container.decode(stream)):
                t = frame.time if frame.time is not None else n / float(stream.average_rate or 25)
                if fps is not None and t + 1e-6 < next_time:
                    continue
                frames.append(frame.to_ndarray(format="rgb24"))
                if fps is not None:
                    next_time = (math.floor(t * fps + 1e-6) + 1) / fps
    except av.FFmpegError as err:
        raise BadClip("corrupt", f"{path}: cannot decode video ({err})") from None
    if not frames:
        raise BadClip("empty", f"{path}: the video stream has no frames")
    return frames


def decode_audio(path: Path, rate: int = 16000) -> np.ndarray:
    """Returns a file's first audio stream as float32 mono samples at ``rate`` Hz ([n]).

    Raises:
        BadClip: ``corrupt`` (not a readable media file), ``no_audio`` (no audio stream), or
            ``empty`` (a zero-byte file, no streams or no samples).
    """
    chunks: list[np.ndarray] = []
    _check_not_empty(path)
    try:
        with av.open(str(path)) as container:
            stream = _first_stream(path, container, "audio")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            for frame in container.decode(stream):
                chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(frame))
            chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(None))
    except av.FFmpegError as err:
        raise BadClip("corrupt", f"{path}: cannot decode audio ({err})") from None
    samples = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    if samples.size == 0:
        raise BadClip("empty", f"{path}: the audio stream has no samples")
    return samples


def face_image_files(folder: Path) -> list[Path]:
    """Returns the face crops ``folder/{k}.*`` (any image suffix), in order of ``k``."""
    def order(p: Path) -> tuple[int, int | str]:
        return (0, int(p.stem)) if p.stem.isdigit() else (1, p.stem)

    return sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=order)


def read_face_images(folder: Path) -> list[np.ndarray]:
    """Returns the RGB face crops ``folder/{k}.jpg`` (any image suffix), in order of ``k``.

    Raises:
        BadClip: ``empty`` (no images), ``corrupt`` (an image that cannot be read).
    """
    files = face_image_files(folder)
    if not files:
        raise BadClip("empty", f"{folder}: no face images ({'/'.join(IMAGE_SUFFIXES)})")
    images = []
    for path in files:
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise BadClip("corrupt", f"{path}: cannot read the face image")
        images.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    return images
