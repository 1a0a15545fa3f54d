"""Audio stage: 16 kHz mono -> a speech encoder's hidden states, one vector per encoder frame.

Long clips are encoded in windows so that device memory stays bounded: the clip is cut into
cores of ``chunk_seconds``; each window is a core plus ``context_seconds`` of audio on each side,
and only the core's frames are kept. Windows start on multiples of the convolutional front end's
stride, so every kept frame is the frame the whole clip would give, computed from the same
samples (the front end is exact); the transformer layers see the window instead of the whole
clip, which is why the context is there. A clip no longer than one core is encoded whole.
Models without a convolutional front end described in their config (``conv_kernel``,
``conv_stride``) are encoded whole, one clip per forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from jsonargparse.typing import NonNegativeFloat, PositiveFloat, PositiveInt

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
from emimimic.extract.media import BadClip, Failure, clip_audio
from emimimic.extract.work import Clip


@dataclass
class AudioOptions:
    """How speech becomes features (``--audio.*``).

    Attributes:
        model: Hugging Face speech encoder name or local path (needed to extract audio features).
        revision: model revision (branch, tag or commit).
        layer: last (last_hidden_state) or an index into hidden_states; checked against the
            model.
        chunk_seconds: longer clips are encoded in windows of this many seconds.
        context_seconds: audio on each side of a window that its frames can attend to.
        windows_per_step: audio windows per forward pass (bounds device memory, not the
            results).
    """

    model: str | None = None
    revision: str | None = None
    layer: str = "last"
    chunk_seconds: PositiveFloat = 30.0
    context_seconds: NonNegativeFloat = 5.0
    windows_per_step: PositiveInt = field(default=8, metadata={"provenance": False})


@dataclass(frozen=True)
class FrontEnd:
    """A convolutional front end: kernel and stride per layer (wav2vec2, HuBERT, WavLM...)."""

    kernels: tuple[int, ...]
    strides: tuple[int, ...]

    @property
    def stride(self) -> int:
        """Samples between consecutive output frames."""
        return math.prod(self.strides)

    @property
    def window(self) -> int:
        """Samples one output frame is computed from (the receptive field)."""
        field, jump = 1, 1
        for k, s in zip(self.kernels, self.strides, strict=True):
            field += (k - 1) * jump
            jump *= s
        return field

    def frames(self, samples: int) -> int:
        """Returns how many frames ``samples`` input samples give."""
        for k, s in zip(self.kernels, self.strides, strict=True):
            samples = (samples - k) // s + 1 if samples >= k else 0
        return samples


def front_end_of(config: Any) -> FrontEnd | None:
    """Returns the model's convolutional front end from its config, or None if not described."""
    kernels, strides = getattr(config, "conv_kernel", None), getattr(config, "conv_stride", None)
    if not kernels or not strides or len(kernels) != len(strides):
        return None
    return FrontEnd(tuple(int(k) for k in kernels), tuple(int(s) for s in strides))


class Window(NamedTuple):
    """One forward pass's input: samples ``[start, end)`` of a clip; frames ``[keep_from,
    keep_to)`` of its output are kept (None: all)."""

    clip: int
    start: int
    end: int
    keep_from: int
    keep_to: int | None


def plan_windows(clip: int, samples: int, front: FrontEnd | None, chunk_seconds: float,
                 context_seconds: float, rate: int) -> list[Window]:
    """Returns the windows that encode a clip of ``samples`` samples (see the module docstring)."""
    if front is None:
        return [Window(clip, 0, samples, 0, None)]
    stride = front.stride
    core = max(1, round(chunk_seconds * rate / stride)) * stride
    if samples <= core:
        return [Window(clip, 0, samples, 0, None)]
    context = round(context_seconds * rate / stride) * stride
    total = front.frames(samples)
    windows = []
    for k in range(math.ceil(samples / core)):
        first, last = k * core // stride, min((k + 1) * core // stride, total)
        if first >= last:
            break
        start = max(0, k * core - context)
        end = min(samples, (k + 1) * core + context + front.window - stride)
        offset = start // stride
        windows.append(Window(clip, start, end, first - offset, last - offset))
    return windows


@dataclass
class WaveBatch(ClipBatch):
    """Windows of a group's clips (see :func:`plan_windows`).

    Fields:
        waves: the preprocessed audio of each clip of ``ids`` (float32 [n]).
        windows: the windows to encode, in order; ``Window.clip`` indexes ``ids``.
    """

    waves: list[torch.Tensor]
    windows: list[Window]


@dataclass
class WavePreparer:
    """Decodes a clip's audio at the model's rate and applies its feature extractor."""

    feature_extractor: Any
    audio_dir: Path | None
    raw_dir: Path | None
    rate: int
    front: FrontEnd | None
    chunk_seconds: float
    context_seconds: float

    def prepare(self, clip: Clip) -> torch.Tensor:
        """Returns the clip's preprocessed samples, float32 [n].

        Raises:
            BadClip: no file, no audio stream, undecodable, or shorter than one encoder frame.
        """
        samples = clip_audio(clip.id, self.audio_dir, self.raw_dir, self.rate)
        minimum = self.front.window if self.front is not None else 1
        if samples.size < minimum:
            raise BadClip("empty", f"clip {clip.id}: {samples.size} audio samples, fewer than "
                                   f"the encoder's {minimum}-sample frame")
        # the whole clip is normalised at once, so windows see the values the whole clip gives
        values = self.feature_extractor(samples, sampling_rate=self.rate,
                                        return_tensors="np")["input_values"][0]
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))

    def collate(self, ids: list[str], items: list[torch.Tensor], failures: dict[str, Failure]
                ) -> WaveBatch:
        """Returns the group's clips with their windows."""
        windows = [w for n, wave in enumerate(items)
                   for w in plan_windows(n, int(wave.shape[0]), self.front, self.chunk_seconds,
                                         self.context_seconds, self.rate)]
        return WaveBatch(ids, failures, items, windows)


class SpeechEncoder(LayerEncoder):
    """Encodes audio windows with a speech model; joins each clip's kept frames.

    Args (beyond :class:`~emimimic.extract.engine.LayerEncoder`'s, for a speech ``AutoModel``):
        windows_per_step: windows per forward pass when padding is allowed.
        front: the model's front end when windows of different lengths may share a forward
            pass (zero padding with an attention mask, for models whose feature extractor asks
            for one: the front end tells each window's valid frames); None: one per pass.
    """

    def __init__(self, model: torch.nn.Module, name: str, layer: int | None,
                 windows_per_step: int, front: FrontEnd | None) -> None:
        super().__init__(model, name, layer)
        self.front = front
        self.windows_per_step = windows_per_step if front is not None else 1

    def encode(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Returns the hidden states ``[frames, D]`` of each input (padding, if any, removed)."""
        if len(inputs) == 1:
            out = self.model(input_values=inputs[0][None],
                             output_hidden_states=self.layer is not None)
            return [select_layer(out, self.layer, self.name)[0]]
        longest = max(int(x.shape[0]) for x in inputs)
        values = inputs[0].new_zeros((len(inputs), longest))
        mask = torch.zeros((len(inputs), longest), dtype=torch.long, device=values.device)
        for n, x in enumerate(inputs):
            values[n, :x.shape[0]] = x
            mask[n, :x.shape[0]] = 1
        out = self.model(input_values=values, attention_mask=mask,
                         output_hidden_states=self.layer is not None)
        hidden = select_layer(out, self.layer, self.name)
        assert self.front is not None  # windows_per_step is 1 without a front end
        return [hidden[n, :self.front.frames(int(x.shape[0]))] for n, x in enumerate(inputs)]

    def predict_step(self, batch: WaveBatch, batch_idx: int = 0) -> dict[str, np.ndarray]:
        """Returns ``{clip id: float32 [frames, D]}`` for the batch's clips."""
        pieces: list[list[torch.Tensor]] = [[] for _ in batch.ids]
        windows = batch.windows
        for i in range(0, len(windows), self.windows_per_step):
            step = windows[i:i + self.windows_per_step]
            inputs = [batch.waves[w.clip][w.start:w.end] for w in step]
            for w, hidden in zip(step, self.encode(inputs), strict=True):
                pieces[w.clip].append(hidden[w.keep_from:w.keep_to].detach().float().cpu())
        return {clip: to_numpy(torch.cat(p)) for clip, p in zip(batch.ids, pieces, strict=True)}


def audio_stage(opts: AudioOptions, audio_dir: Path | None, raw_dir: Path | None) -> Stage:
    """Returns the audio stage: loads the speech encoder and its feature extractor, and checks
    ``--audio.layer`` against the model."""
    from transformers import AutoFeatureExtractor, AutoModel

    name = opts.model or ""
    layer = parse_layer(opts.layer, "--audio.layer")
    model = load_pretrained(AutoModel, name, opts.revision, "--audio.model")
    check_layer("--audio.layer", layer, model.config, name)
    extractor = load_pretrained(AutoFeatureExtractor, name, opts.revision, "--audio.model")
    rate = int(getattr(extractor, "sampling_rate", 16000))
    front = front_end_of(model.config)
    padding = front is not None and bool(getattr(extractor, "return_attention_mask", False))
    provenance = {
        **provenance_of(opts), "weights_sha256": weights_sha256(model), "sample_rate": rate,
        "frame_rate": None if front is None else rate / front.stride,
        "source": f"audio files in {audio_dir}, else the video's audio track" if audio_dir
                  else "the video's audio track",
    }
    if front is None:  # encoded whole: no windows
        provenance.update(chunk_seconds=None, context_seconds=None)
    preparer = WavePreparer(extractor, audio_dir, raw_dir, rate, front, opts.chunk_seconds,
                            opts.context_seconds)
    module = SpeechEncoder(model, name, layer, opts.windows_per_step,
                           front if padding else None)
    return Stage("audio", module, preparer, provenance)
