"""Text stage: a transcript -> a language model's per-token hidden states (chosen layer).

A clip whose transcript is empty has no text (reason ``empty_transcript``), unless
``--empty-text placeholder=TEXT`` asks for the paper's choice of encoding TEXT instead. A clip
whose speech recognition failed (e.g. no audio stream) has no text, for that same reason.
Batches are padded on the right with an attention mask, which leaves a causal model's hidden
states of the real tokens as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jsonargparse.typing import PositiveInt

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
from emimimic.extract.media import BadClip, Failure
from emimimic.extract.work import Clip


@dataclass
class TextOptions:
    """How transcripts become features (``--text.*``).

    Attributes:
        model: Hugging Face language model name or local path (ChatGLM3: see
            ``emimimic convert-chatglm3``); needed to extract text features.
        revision: model revision (branch, tag or commit).
        layer: last (last_hidden_state) or an index into hidden_states; checked against the
            model.
        max_tokens: longest transcript, in tokens, at most the model's limit (checked); default:
            the model's limit, at most 512.
        empty_text: an empty transcript leaves the clip without text (missing), or is replaced:
            placeholder=TEXT (the paper's choice).
        transcripts: CSV Filename,transcript to use instead of speech recognition.
    """

    model: str | None = None
    revision: str | None = None
    layer: str = "last"
    max_tokens: PositiveInt | None = None
    empty_text: str = "missing"
    transcripts: Path | None = None


#: ``--text.max_tokens`` when not given, unless the model reads fewer tokens.
DEFAULT_MAX_TOKENS = 512


def parse_empty_text(text: str) -> str | None:
    """Returns the placeholder of ``--empty-text`` (None for ``missing``).

    Raises:
        UserError: neither ``missing`` nor ``placeholder=TEXT`` with a non-empty TEXT.
    """
    if text == "missing":
        return None
    key, sep, value = text.partition("=")
    if key != "placeholder" or not sep or not value.strip():
        raise UserError(f"--text.empty_text {text!r}: expected 'missing' or 'placeholder=TEXT'")
    return value


@dataclass
class TokenBatch(ClipBatch):
    """Token ids of a group's transcripts, right-padded.

    Fields:
        input_ids: int64 ``[B, L]``.
        attention_mask: int64 ``[B, L]``, 1 on real tokens.
        lengths: real tokens per clip of ``ids``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths: list[int]


@dataclass
class TokenPreparer:
    """Tokenises a clip's transcript (or says why it has none).

    ``transcripts`` maps every clip to its text, or to the failure that left it without one.
    """

    tokenizer: Any
    transcripts: dict[str, str | Failure]
    source: str
    placeholder: str | None
    max_tokens: int

    def prepare(self, clip: Clip) -> list[int]:
        """Returns the token ids of the clip's transcript.

        Raises:
            BadClip: the speech recognition's failure, or ``empty_transcript``.
        """
        entry = self.transcripts[clip.id]
        if isinstance(entry, Failure):
            raise BadClip(entry.reason, f"no transcript: {entry.detail}")
        text = entry.strip()
        if not text:
            if self.placeholder is None:
                raise BadClip("empty_transcript", f"clip {clip.id}: empty transcript in "
                                                  f"{self.source}")
            text = self.placeholder
        ids = self.tokenizer(text, truncation=True, max_length=self.max_tokens)["input_ids"]
        if not ids:
            raise BadClip("empty_transcript", f"clip {clip.id}: transcript {text!r} in "
                                              f"{self.source} gives no tokens")
        return list(ids)

    def collate(self, ids: list[str], items: list[list[int]], failures: dict[str, Failure]
                ) -> TokenBatch:
        """Returns the group's token ids, right-padded, with the attention mask."""
        lengths = [len(x) for x in items]
        longest = max(lengths, default=0)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(items), longest), 0 if pad is None else int(pad),
                               dtype=torch.long)
        mask = torch.zeros((len(items), longest), dtype=torch.long)
        for n, tokens in enumerate(items):
            input_ids[n, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[n, :len(tokens)] = 1
        return TokenBatch(ids, failures, input_ids, mask, lengths)


class TokenEncoder(LayerEncoder):
    """Runs a language model over token ids; returns each clip's real tokens' hidden states.

    Arguments as :class:`~emimimic.extract.engine.LayerEncoder`.
    """

    def predict_step(self, batch: TokenBatch, batch_idx: int = 0) -> dict[str, np.ndarray]:
        """Returns ``{clip id: float32 [tokens, D]}`` for the batch's clips."""
        if not batch.ids:
            return {}
        out = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         output_hidden_states=self.layer is not None)
        hidden = select_layer(out, self.layer, self.name)
        return {clip: to_numpy(hidden[n, :t])
                for n, (clip, t) in enumerate(zip(batch.ids, batch.lengths, strict=True))}


def token_limit(config: Any, tokenizer: Any) -> tuple[int, str] | None:
    """Returns the most tokens the model reads, and the attribute that says so; None if unknown.

    The limits are the config's ``max_position_embeddings`` and the tokenizer's
    ``model_max_length`` when that is a real limit (transformers sets ``VERY_LARGE_INTEGER``,
    1e30, when a tokenizer has none); the smaller wins (RoBERTa: 514 positions, 512 tokens).
    """
    try:
        from transformers.tokenization_utils_base import LARGE_INTEGER as no_limit
    except ImportError:  # pragma: no cover - moved in another transformers version
        no_limit = int(1e20)
    limits = []
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limits.append((positions, "max_position_embeddings"))
    length = getattr(tokenizer, "model_max_length", None)
    if isinstance(length, int) and 0 < length < no_limit:
        limits.append((length, "the tokenizer's model_max_length"))
    return min(limits, key=lambda limit: limit[0], default=None)


def check_text_options(opts: TextOptions, layer: int | None, config: Any, tokenizer: Any,
                       name: str) -> int:
    """Checks ``--text.max_tokens`` and ``--text.layer`` against the loaded model; returns the
    most tokens to read (the option, or by default the model's limit, at most 512).

    Raises:
        UserError: naming the option, the model and the values it takes.
    """
    limit = token_limit(config, tokenizer)
    if limit is not None and opts.max_tokens is not None and opts.max_tokens > limit[0]:
        most, source = limit
        raise UserError(f"--text.max_tokens {opts.max_tokens}: model {name} reads at most {most} "
                        f"tokens ({source}); use at most {most}")
    check_layer("--text.layer", layer, config, name)
    if opts.max_tokens is not None:
        return opts.max_tokens
    return min(DEFAULT_MAX_TOKENS, limit[0]) if limit is not None else DEFAULT_MAX_TOKENS


def text_stage(opts: TextOptions, transcripts: dict[str, str | Failure], source: str,
               source_sha256: str | None, asr: dict[str, Any] | None) -> Stage:
    """Returns the text stage: loads the language model and its tokenizer, and checks the
    options against them."""
    from transformers import AutoModel, AutoTokenizer

    name = opts.model or ""
    placeholder = parse_empty_text(opts.empty_text)
    layer = parse_layer(opts.layer, "--text.layer")
    model = load_pretrained(AutoModel, name, opts.revision, "--text.model")
    tokenizer = load_pretrained(AutoTokenizer, name, opts.revision, "--text.model")
    config = model.config
    if hasattr(config, "get_text_config"):  # a multimodal model's language part
        config = config.get_text_config()
    max_tokens = check_text_options(opts, layer, config, tokenizer, name)
    opts = replace(opts, max_tokens=max_tokens)  # a default is recorded as the number used
    provenance = {**provenance_of(opts), "weights_sha256": weights_sha256(model),
                  "transcripts": source, "transcripts_sha256": source_sha256, "asr": asr}
    preparer = TokenPreparer(tokenizer, transcripts, source, placeholder, max_tokens)
    return Stage("text", TokenEncoder(model, name, layer), preparer, provenance)
