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

from emimimic.errors import UserError
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
        language: language code (or name) passed to generate (Whisper: en); checked against the
            model (an English-only model takes none).
        max_tokens: most tokens generated per piece (Whisper: per 30 s); checked against the
            model.
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


def _whisper_languages() -> dict[str, str]:
    """Returns Whisper's language names -> codes (``english`` -> ``en``), as generate reads them."""
    try:
        from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE
    except ImportError:  # pragma: no cover - moved in another transformers version
        return {}
    return dict(TO_LANGUAGE_CODE)


def language_token(language: str, lang_to_id: dict[str, int]) -> str | None:
    """Returns the token Whisper's ``generate`` uses for ``language`` (a code, a name or the token
    itself, any case), or None when it knows no such language. ``generate`` refuses a token that
    is not in the model's ``lang_to_id``."""
    lowered = language.lower()
    names = _whisper_languages()
    if lowered in lang_to_id:
        return lowered
    if lowered in names:
        return f"<|{names[lowered]}|>"
    if lowered in names.values():
        return f"<|{lowered}|>"
    return None


def prompt_length(model: Any, language: str | None) -> int:
    """Returns how many tokens ``generate`` puts before the first one it writes.

    Whisper's prompt (as transformers' ``WhisperGenerationMixin._retrieve_init_tokens`` builds
    it): the start token, the language (given, or detected by a multilingual model), the task
    (given with the language; else from an old config's ``forced_decoder_ids``) and
    ``<|notimestamps|>``. Other models start from ``decoder_start_token_id`` alone.
    """
    config, generation = model.config, model.generation_config
    if getattr(config, "model_type", None) != "whisper":
        return 1
    tokens: list[Any] = [generation.decoder_start_token_id]
    if language is None:
        forced = (getattr(generation, "forced_decoder_ids", None)
                  or getattr(config, "forced_decoder_ids", None) or [])
        for position, token in forced:
            if position != len(tokens):
                break
            tokens.append(token)
    if language is not None or (hasattr(generation, "lang_to_id")
                                and (len(tokens) <= 1 or tokens[1] is None)):
        tokens[1:2] = ["language"]
    if language is not None:
        tokens.append("transcribe")
    stop = getattr(generation, "no_timestamps_token_id", None)
    if (stop is not None and not getattr(generation, "return_timestamps", False)
            and tokens[-1] != stop):
        tokens.append(stop)
    return sum(t is not None for t in tokens)


def check_asr_options(opts: ASROptions, model: Any) -> None:
    """Checks ``--asr.language`` and ``--asr.max_tokens`` against the loaded model.

    The language needs a multilingual model (``generation_config.is_multilingual`` not False)
    whose ``lang_to_id`` has it and whose ``task_to_id`` has ``transcribe``; the prompt and the
    tokens written fit the decoder's ``max_target_positions``.

    Raises:
        UserError: naming the option, the model and the values it takes.
    """
    name = opts.model or ""
    generation = model.generation_config
    if opts.language is not None:
        option = f"--asr.language {opts.language!r}"
        lang_to_id = getattr(generation, "lang_to_id", None) or {}
        if getattr(generation, "is_multilingual", None) is False:
            raise UserError(f"{option}: model {name} is English-only and takes no language; "
                            "drop the option")
        if not lang_to_id:
            raise UserError(f"{option}: model {name} takes no language (its generation config "
                            "has no lang_to_id); drop the option")
        if "transcribe" not in (getattr(generation, "task_to_id", None) or {}):
            raise UserError(f"{option}: model {name} cannot be told a language (its generation "
                            "config's task_to_id has no 'transcribe'); drop the option")
        if language_token(opts.language, lang_to_id) not in lang_to_id:
            codes = [t.removeprefix("<|").removesuffix("|>") for t in lang_to_id]
            names = {code: n for n, code in reversed(_whisper_languages().items())}
            example = f" or a name such as {names[codes[0]]}" if codes[0] in names else ""
            raise UserError(f"{option}: model {name} does not know this language; it takes "
                            f"{len(codes)} language{'s' if len(codes) > 1 else ''}: "
                            f"{', '.join(codes[:10])}{' ...' if len(codes) > 10 else ''} "
                            f"(a code{example})")
    limit = getattr(model.config, "max_target_positions", None)
    if isinstance(limit, int):
        prompt = prompt_length(model, opts.language)
        most = limit - prompt
        if opts.max_tokens > most:
            raise UserError(f"--asr.max_tokens {opts.max_tokens}: model {name} writes at most "
                            f"{most} tokens per piece (max_target_positions {limit} less its "
                            f"{prompt}-token prompt); use at most {most}")


def asr_stage(opts: ASROptions, audio_dir: Path | None, raw_dir: Path | None) -> Stage:
    """Returns the speech recognition stage: loads the model and its processor, and checks the
    options against the model."""
    from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor

    name = opts.model or ""
    model = load_pretrained(AutoModelForSpeechSeq2Seq, name, opts.revision, "--asr.model")
    check_asr_options(opts, model)
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
