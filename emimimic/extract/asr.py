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

from emimimic.extract.engine import ClipBatch, Stage, load_pretrained, weights_sha256
from emimimic.extract.media import Failure, clip_audio
from emimimic.extract.work import Clip


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


def asr_stage(model_name: str, revision: str | None, language: str | None, max_new_tokens: int,
              audio_dir: Path | None, raw_dir: Path | None) -> Stage:
    """Returns the speech recognition stage: loads the model and its processor."""
    from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor

    model = load_pretrained(AutoModelForSpeechSeq2Seq, model_name, revision, "--asr-model")
    processor = load_pretrained(AutoProcessor, model_name, revision, "--asr-model")
    extractor = getattr(processor, "feature_extractor", processor)
    rate = int(getattr(extractor, "sampling_rate", 16000))
    piece = getattr(extractor, "n_samples", None)
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens}
    if language is not None:
        kwargs.update(language=language, task="transcribe")
    provenance = {"model": model_name, "revision": revision,
                  "weights_sha256": weights_sha256(model), "language": language,
                  "max_new_tokens": max_new_tokens, "sample_rate": rate,
                  "piece_seconds": None if piece is None else piece / rate}
    preparer = SpeechPreparer(processor, audio_dir, raw_dir, rate,
                              None if piece is None else int(piece))
    return Stage("asr", Transcriber(model, processor, kwargs), preparer, provenance)
