"""Visual stage: frames (or given face crops) -> face crops -> one image-model vector per frame."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jsonargparse.typing import NonNegativeFloat, PositiveFloat, PositiveInt

from emimimic.errors import UserError
from emimimic.extract.engine import (
    ClipBatch,
    LayerEncoder,
    Stage,
    check_layer,
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
        layer: last (last_hidden_state) or an index into hidden_states; checked against the
            model.
        token: one vector per face crop: the CLS token, the token mean or pooler_output (cls
            needs a model with a token sequence, pooler one with a trained pooler).
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
            pooled = getattr(out, "pooler_output", None)
            if pooled is None:  # what check_visual_options could not tell from the model
                raise UserError(f"--visual.token pooler: model {self.name} gives no "
                                "pooler_output; use --visual.token cls or mean")
            return pooled.flatten(1)
        hidden = select_layer(out, self.layer, self.name)
        if hidden.ndim == 4:  # convolutional models: [N, C, H, W]
            if self.token == "cls":
                raise UserError(f"--visual.token cls: model {self.name} is convolutional and "
                                "has no CLS token; use --visual.token mean or pooler")
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


def output_classes(model: torch.nn.Module) -> list[type]:
    """Returns the output classes the model's ``forward`` is annotated to return (a union gives
    several; tuples are left out); [] when the annotation cannot be read."""
    try:
        annotation = inspect.signature(model.forward).return_annotation
        if isinstance(annotation, str):
            annotation = typing.get_type_hints(model.forward).get("return")
    except (AttributeError, NameError, TypeError, ValueError):
        return []
    found, todo = [], [annotation]
    while todo:
        item = todo.pop(0)
        if isinstance(item, type) and dataclasses.is_dataclass(item):
            found.append(item)
        else:
            todo += typing.get_args(item)
    return found


#: Transformers' outputs of models whose hidden states are feature maps ``[N, C, H, W]`` (their
#: documented ``last_hidden_state`` shape): ResNet, ConvNeXt, RegNet, EfficientNet, PoolFormer...
FEATURE_MAP_OUTPUTS = ("BaseModelOutputWithNoAttention", "BaseModelOutputWithPoolingAndNoAttention")


def _pooler_problem(model: torch.nn.Module, missing: set[str]) -> str | None:
    """Returns why the model has no trained pooler, or None when it has one (or cannot tell)."""
    kind = type(model).__name__
    try:
        pooler = model.pooler
    except AttributeError:  # a model with no pooler module, e.g. DINOv2: its outputs say
        classes = output_classes(model)
        if classes and not any("pooler_output" in {f.name for f in dataclasses.fields(c)}
                               for c in classes):
            return (f"returns no pooler_output ({kind} returns "
                    f"{' or '.join(c.__name__ for c in classes)})")
        return None
    if pooler is None:
        return f"has no pooler ({kind}.pooler is None)"
    untrained = sorted(k for k in missing if k.startswith("pooler."))
    if untrained and any(p.numel() for p in pooler.parameters()):
        return (f"has no pooler weights in its checkpoint ({', '.join(untrained)}: "
                "transformers would initialise them at random)")
    return None


def check_visual_options(opts: VisualOptions, layer: int | None, model: torch.nn.Module,
                         missing: set[str]) -> None:
    """Checks ``--visual.layer`` and ``--visual.token`` against the loaded model.

    Args:
        missing: the checkpoint's missing weights (``output_loading_info``'s ``missing_keys``).

    Raises:
        UserError: naming the option, the model and the values it takes.
    """
    name = opts.model or ""
    check_layer("--visual.layer", layer, model.config, name)
    feature_maps = [c.__name__ for c in output_classes(model)
                    if any(base.__name__ in FEATURE_MAP_OUTPUTS for base in c.__mro__)]
    pooler = _pooler_problem(model, missing)
    allowed = [t for t, bad in (("cls", feature_maps), ("mean", None), ("pooler", pooler))
               if not bad]
    use = f"use --visual.token {' or '.join(allowed)}"
    if opts.token == "cls" and feature_maps:
        raise UserError(f"--visual.token cls: model {name} is convolutional and has no CLS token "
                        f"({type(model).__name__} returns {feature_maps[0]}: feature maps); {use}")
    if opts.token == "pooler" and pooler:
        raise UserError(f"--visual.token pooler: model {name} {pooler}; {use}")


def visual_stage(opts: VisualOptions, raw_dir: Path | None, face_dir: Path | None) -> Stage:
    """Returns the visual stage: loads the image model and its processor, and checks the options
    against the model."""
    from transformers import AutoImageProcessor, AutoModel

    index = parse_layer(opts.layer, "--visual.layer")
    model, loading = load_pretrained(AutoModel, opts.model or "", opts.revision, "--visual.model",
                                     output_loading_info=True)
    check_visual_options(opts, index, model, set(loading.get("missing_keys", ())))
    processor = load_pretrained(AutoImageProcessor, opts.model or "", opts.revision,
                                "--visual.model")
    face_detector = load_detector(opts.detector)
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
