"""Visual stage: frames (or given face crops) -> face crops -> one image-model vector per frame."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jsonargparse.typing import NonNegativeFloat, PositiveFloat, PositiveInt

from emimimic.extract.engine import (
    ClipBatch,
    LayerEncoder,
    Stage,
    load_pretrained,
    parse_layer,
    provenance_of,
    select_layer,
    to_numpy,
    weights_sha256,
)
from emimimic.extract.faces import FaceDetector, crop_face, detector_name, load_detector
from emimimic.extract.media import (
    VIDEO_SUFFIXES,
    BadClip,
    Failure,
    decode_frames,
    find_media,
    read_face_images,
)
from emimimic.extract.work import Clip

#: How a frame's token sequence becomes one vector: the first (CLS) token, the token mean, or the
#: model's own ``pooler_output``.
TokenPooling = Literal["cls", "mean", "pooler"]


@dataclass
class VisualOptions:
    """How faces become features (``--visual.*``).

    Attributes:
        model: Hugging Face image model name or local path (needed to extract visual features).
        revision: model revision (branch, tag or commit).
        layer: last (last_hidden_state) or an index into hidden_states.
        token: one vector per face crop: the CLS token, the token mean or pooler_output.
        fps: frames sampled per second of video.
        detector: face detector: haar (OpenCV's, offline), none (the whole frame) or
            package.module:Class.
        face_margin: crop side = face box side x (1 + margin).
        frames_per_step: face crops per forward pass (bounds device memory, not the results).
    """

    model: str | None = None
    revision: str | None = None
    layer: str = "last"
    token: TokenPooling = "cls"
    fps: PositiveFloat = 5.0
    detector: str = "haar"
    face_margin: NonNegativeFloat = 0.2
    frames_per_step: PositiveInt = field(default=64, metadata={"provenance": False})


@dataclass
class FrameBatch(ClipBatch):
    """Face crops of a group's clips, back to back.

    Fields:
        counts: crops per clip of ``ids``.
        pixel_values: float32 ``[sum(counts), C, H, W]``, the image processor's output.
    """

    counts: list[int]
    pixel_values: torch.Tensor


@dataclass
class FramePreparer:
    """Decodes a clip's frames (or reads its face crops), crops the face and preprocesses it."""

    processor: Any
    raw_dir: Path | None
    face_dir: Path | None
    fps: float
    detector: FaceDetector
    margin: float

    def crops(self, clip: Clip) -> list[np.ndarray]:
        """Returns a clip's RGB face crops.

        Raises:
            BadClip: no file, undecodable video, no frames, or no face in any frame.
        """
        if self.face_dir is not None:
            folder = self.face_dir / clip.id
            if not folder.is_dir():
                raise BadClip("missing_file", f"{folder}: no face-image folder for clip {clip.id}")
            return read_face_images(folder)
        video = find_media(self.raw_dir, clip.id, VIDEO_SUFFIXES)
        if video is None:
            raise BadClip("missing_file", f"{self.raw_dir}/{clip.id}.mp4: no video for clip "
                                          f"{clip.id} (looked for {'/'.join(VIDEO_SUFFIXES)})")
        frames = decode_frames(video, self.fps)
        crops = []
        for frame in frames:
            box = self.detector(frame)
            if box is not None:
                crops.append(crop_face(frame, box, self.margin))
        if not crops:
            raise BadClip("no_face", f"{video}: no face in any of {len(frames)} frames sampled "
                                     f"at {self.fps:g} fps ({detector_name(self.detector)})")
        return crops

    def prepare(self, clip: Clip) -> torch.Tensor:
        """Returns the clip's preprocessed crops ``[F, C, H, W]``."""
        return self.processor(images=self.crops(clip), return_tensors="pt")["pixel_values"]

    def collate(self, ids: list[str], items: list[torch.Tensor], failures: dict[str, Failure]
                ) -> FrameBatch:
        """Returns the crops of a group back to back."""
        counts = [int(x.shape[0]) for x in items]
        pixels = torch.cat(items) if items else torch.zeros(0)
        return FrameBatch(ids, failures, counts, pixels)


class FrameEncoder(LayerEncoder):
    """Encodes face crops with an image model (``AutoModel``); one vector per crop.

    Args (beyond :class:`~emimimic.extract.engine.LayerEncoder`'s):
        token: how a crop's tokens become one vector (see :data:`TokenPooling`).
        frames_per_step: crops per forward pass (bounds device memory whatever the clip length).
    """

    def __init__(self, model: torch.nn.Module, name: str, layer: int | None,
                 token: TokenPooling, frames_per_step: int) -> None:
        super().__init__(model, name, layer)
        self.token = token
        self.frames_per_step = frames_per_step

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Returns ``[N, D]``: one vector per crop."""
        out = self.model(pixel_values=pixel_values, output_hidden_states=self.layer is not None)
        if self.token == "pooler":
            return out.pooler_output.flatten(1)
        hidden = select_layer(out, self.layer, self.name)
        if hidden.ndim == 4:  # convolutional models: [N, C, H, W]
            if self.token == "cls":
                raise ValueError(f"{self.name}: a convolutional model has no CLS token; "
                                 "use --visual.token mean or pooler")
            return hidden.flatten(2).mean(-1)
        return hidden[:, 0] if self.token == "cls" else hidden.mean(1)

    def predict_step(self, batch: FrameBatch, batch_idx: int = 0) -> dict[str, np.ndarray]:
        """Returns ``{clip id: float32 [frames, D]}`` for the batch's clips."""
        if not batch.ids:
            return {}
        # each chunk leaves the device as it is done, so device memory holds one chunk
        vectors = torch.cat([self.encode(chunk).detach().float().cpu()
                             for chunk in batch.pixel_values.split(self.frames_per_step)])
        return {clip: to_numpy(v) for clip, v in zip(batch.ids, vectors.split(batch.counts),
                                                      strict=True)}


def visual_stage(opts: VisualOptions, raw_dir: Path | None, face_dir: Path | None) -> Stage:
    """Returns the visual stage: loads the image model and its processor."""
    from transformers import AutoImageProcessor, AutoModel

    model = load_pretrained(AutoModel, opts.model or "", opts.revision, "--visual.model")
    processor = load_pretrained(AutoImageProcessor, opts.model or "", opts.revision,
                                "--visual.model")
    face_detector = load_detector(opts.detector)
    index = parse_layer(opts.layer)
    provenance = {**provenance_of(opts), "weights_sha256": weights_sha256(model),
                  "detector": detector_name(face_detector),
                  "source": "face_images" if face_dir is not None else "video",
                  "frames_from": str(face_dir if face_dir is not None else raw_dir)}
    if face_dir is not None:  # given crops: no frames sampled, no faces detected
        provenance.update(fps=None, detector=None, face_margin=None)
    preparer = FramePreparer(processor, raw_dir, face_dir, opts.fps, face_detector,
                             opts.face_margin)
    module = FrameEncoder(model, opts.model or "", index, opts.token, opts.frames_per_step)
    return Stage("visual", module, preparer, provenance)
