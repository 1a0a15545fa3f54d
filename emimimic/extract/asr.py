"""Speech recognition stage: a Hugging Face speech-to-text model's transcript of each clip.

Clips longer than the model's input window (Whisper: 30 s) are cut into consecutive pieces whose
transcripts are joined with a space.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import numpy as np
import torch
from jsonargparse.typing import PositiveInt

from emimimic.extract.engine import (
    ClipBatch,
    Stage,
    load_pretrained,
    provenance_of,
    weights_sha256,
)
from emimimic.extract.media import Failure, clip_audio
from emimimic.extract.work import Clip


@dataclass
class ASROptions:
    """How speech becomes transcripts (``--asr.*``), when no transcripts file is given.

    Attributes:
        model: Hugging Face speech-to-text model (e.g. openai/whisper-large-v3).
        revision: model revision (branch, tag or commit).
        language: language code passed to generate (Whisper: en); checked against the model.
        max_tokens: most tokens generated per piece (Whisper: per 30 s).
    """

    model: str | None = None
    revision: str | None = None
    language: str | None = None
    max_tokens: PositiveInt = 128


@dataclass
class SpeechBatch(ClipBatch):
    """The processor's inputs for every piece of a group's clips.

    Fields:
        inputs: processor output (e.g. Whisper's ``input_features`` [P, 80, 3000]).
        pieces: pieces per clip of ``ids``, in order.
    """

    inputs: dict[str, torch.Tensor]
    pieces: list[int]


@dataclass
class SpeechPreparer:
    """Decodes a clip's audio, cuts it into model-sized pieces and runs the processor."""

    processor: Any
    audio_dir: Path | None
    raw_dir: Path | None
    rate: int
    piece_samples: int | None

    def prepare(self, clip: Clip) -> list[np.ndarray]:
        """Returns the clip's audio pieces (float32 mono at the model's rate)."""
        samples = clip_audio(clip.id, self.audio_dir, self.raw_dir, self.rate)
        if self.piece_samples is None:
            return [samples]
        step = self.piece_samples
        return [samples[i:i + step] for i in range(0, samples.size, step)]

    def collate(self, ids: list[str], items: list[list[np.ndarray]],
                failures: dict[str, Failure]) -> SpeechBatch:
        """Returns the processor's batch of all pieces."""
        pieces = [p for item in items for p in item]
        inputs = dict(self.processor(pieces, sampling_rate=self.rate, return_tensors="pt")
                      ) if pieces else {}
        return SpeechBatch(ids, failures, inputs, [len(item) for item in items])


class Transcriber(L.LightningModule):
    """Transcribes audio pieces with ``model.generate`` and decodes them with the processor.

    Args:
        model: a Hugging Face speech-to-text model (``AutoModelForSpeechSeq2Seq``).
        processor: its processor (tokenizer included).
        generate_kwargs: extra arguments of ``generate`` (``max_new_tokens``, ``language``...).
    """

    def __init__(self, model: torch.nn.Module, processor: Any,
                 generate_kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.model = model.eval()
        self.processor = processor
        self.generate_kwargs = dict(generate_kwargs)

    def predict_step(self, batch: SpeechBatch, batch_idx: int = 0) -> dict[str, str]:
        """Returns ``{clip id: transcript}`` for the batch's clips."""
        if not batch.ids:
            return {}
        tokens = self.model.generate(**batch.inputs, **self.generate_kwargs)
        texts = [t.strip() for t in self.processor.batch_decode(tokens, skip_special_tokens=True)]
        out, n = {}, 0
        for clip, count in zip(batch.ids, batch.pieces, strict=True):
            out[clip] = " ".join(t for t in texts[n:n + count] if t)
            n += count
        return out


def asr_stage(opts: ASROptions, audio_dir: Path | None, raw_dir: Path | None) -> Stage:
    """Returns the speech recognition stage: loads the model and its processor."""
    from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor

    name = opts.model or ""
    model = load_pretrained(AutoModelForSpeechSeq2Seq, name, opts.revision, "--asr.model")
    processor = load_pretrained(AutoProcessor, name, opts.revision, "--asr.model")
    extractor = getattr(processor, "feature_extractor", processor)
    rate = int(getattr(extractor, "sampling_rate", 16000))
    piece = getattr(extractor, "n_samples", None)
    kwargs: dict[str, Any] = {"max_new_tokens": opts.max_tokens}
    if opts.language is not None:
        kwargs.update(language=opts.language, task="transcribe")
    provenance = {**provenance_of(opts), "weights_sha256": weights_sha256(model),
                  "sample_rate": rate, "piece_seconds": None if piece is None else piece / rate}
    preparer = SpeechPreparer(processor, audio_dir, raw_dir, rate,
                              None if piece is None else int(piece))
    return Stage("asr", Transcriber(model, processor, kwargs), preparer, provenance)
