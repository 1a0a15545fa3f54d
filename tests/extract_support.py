"""Test inputs for ``emimimic extract``: generated clips and tiny random-weight models.

Every model is built with random weights, saved with ``save_pretrained`` into a folder and loaded
by the pipeline through the same ``from_pretrained(path)`` a user's model name takes.
"""

from __future__ import annotations

import csv
import wave
from collections.abc import Sequence
from pathlib import Path

import av
import numpy as np
import torch

from emimimic.constants import EMOTIONS

RATE = 16000
WORDS = ("hello world this is a test of the speech model we are happy to see you again today "
         "what a great day for a walk in the park with friends and family").split()


# ----------------------------------------------------------------------------------------------
# Clips
# ----------------------------------------------------------------------------------------------


def face_image(size: int) -> np.ndarray:
    """Returns scikit-image's astronaut photo (a frontal face) resized to ``size`` x ``size``."""
    import cv2
    from skimage import data

    return cv2.resize(data.astronaut(), (size, size), interpolation=cv2.INTER_AREA)


def speech_like(seconds: float, seed: int) -> np.ndarray:
    """Returns float32 mono audio: tones with a syllable-rate envelope plus a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * RATE)) / RATE
    pitch = 120 + 40 * seed % 80
    tone = np.sin(2 * np.pi * pitch * t) + 0.5 * np.sin(2 * np.pi * 2.7 * pitch * t)
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4.0 * t + seed)
    return (0.2 * tone * envelope + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def write_video(path: Path, seconds: float, *, face: bool = True, audio: str | None = "speech",
                fps: int = 10, size: int = 160, seed: int = 0) -> Path:
    """Writes an H.264 + AAC mp4: the astronaut's face moving a little (or no face), and
    speech-like audio, silence, or no audio stream (``audio`` None). 0 seconds: no frames."""
    rng = np.random.default_rng(seed)
    base = face_image(size) if face else None
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width = video.height = size
        video.pix_fmt = "yuv420p"
        sound = None
        if audio is not None:
            sound = container.add_stream("aac", rate=RATE)
            sound.layout = "mono"
        container.start_encoding()  # a clip of 0 s still gets a file
        for n in range(round(seconds * fps)):
            if base is not None:
                frame = np.roll(base, (n % 5) - 2, axis=1)
            else:
                frame = np.clip(rng.normal(128, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            for packet in video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        if sound is not None:
            samples = (speech_like(seconds, seed) if audio == "speech"
                       else np.zeros(round(seconds * RATE), np.float32))
            for start in range(0, samples.size, 1024):
                chunk = samples[start:start + 1024]
                if chunk.size < 1024:
                    chunk = np.pad(chunk, (0, 1024 - chunk.size))
                frame = av.AudioFrame.from_ndarray(chunk[None], format="fltp", layout="mono")
                frame.sample_rate = RATE
                frame.pts = start
                for packet in sound.encode(frame):
                    container.mux(packet)
            for packet in sound.encode():
                container.mux(packet)
    return path


def write_wav(path: Path, samples: np.ndarray) -> np.ndarray:
    """Writes 16-bit mono WAV at 16 kHz; returns the float32 samples a decoder gives back."""
    pcm = np.clip(np.round(samples * 32767), -32768, 32767).astype(np.int16)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(RATE)
        f.writeframes(pcm.tobytes())
    return pcm.astype(np.float32) / 32768.0


def write_face_images(folder: Path, count: int, seed: int) -> list[Path]:
    """Writes ``count`` face crops ``{k}.png`` (lossless, so a reader gets the same pixels)."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = face_image(48)
    paths = []
    for k in range(count):
        img = np.clip(base.astype(int) + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)
        paths.append(folder / f"{k}.png")
        cv2.imwrite(str(paths[-1]), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return paths


def write_split(path: Path, ids: Sequence[int], labelled: bool = True, seed: int = 0) -> Path:
    """Writes an ABAW split CSV with integer Filename and random labels k/3."""
    rng = np.random.default_rng(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Filename", *EMOTIONS] if labelled else ["Filename"])
        for clip in ids:
            w.writerow([clip, *([f"{v:.6g}" for v in rng.integers(0, 4, 6) / 3]
                                if labelled else [])])
    return path


def write_transcripts(path: Path, texts: dict[str, str]) -> Path:
    """Writes a ``Filename,transcript`` CSV."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Filename", "transcript"])
        for clip, text in texts.items():
            w.writerow([clip, text])
    return path


# ----------------------------------------------------------------------------------------------
# Tiny models
# ----------------------------------------------------------------------------------------------


def build_vit(path: Path) -> Path:
    """Saves a random 2-layer ViT (32-d, 32 x 32 images) with its image processor."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, image_size=32, patch_size=8)).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def build_wavlm(path: Path) -> Path:
    """Saves a random 2-layer WavLM (32-d, WavLM-Large's front end and layer norms)."""
    from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMModel

    torch.manual_seed(0)
    config = WavLMConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, conv_dim=(16,) * 7, num_conv_pos_embeddings=16,
                         num_conv_pos_embedding_groups=2, feat_extract_norm="layer",
                         do_stable_layer_norm=True, num_buckets=32, max_bucket_distance=100)
    WavLMModel(config).save_pretrained(path)
    Wav2Vec2FeatureExtractor(return_attention_mask=True, do_normalize=True).save_pretrained(path)
    return path


def _bpe(vocab_size: int, specials: list[str], byte_level: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None if byte_level else "[UNK]"))
    if byte_level:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials)
    rng = np.random.default_rng(0)
    corpus = [" ".join(rng.choice(WORDS, 12)) for _ in range(200)]
    tok.train_from_iterator(corpus, trainer)
    return tok


def build_whisper(path: Path) -> Path:
    """Saves a random 1-layer Whisper with a byte-level BPE tokenizer trained on the fly.

    Special tokens are suppressed during generation, so the random model writes words.
    """
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    folder = path / "bpe"
    folder.mkdir(parents=True)
    _bpe(300, [], byte_level=True).model.save(str(folder))
    end = "<|endoftext|>"
    tokenizer = WhisperTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                 unk_token=end, bos_token=end, eos_token=end, pad_token=end)
    specials = ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in [end, *specials]}
    torch.manual_seed(0)
    config = WhisperConfig(vocab_size=len(tokenizer), d_model=32, encoder_layers=1,
                           decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                           encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80,
                           max_source_positions=1500, max_target_positions=64,
                           pad_token_id=ids[end], bos_token_id=ids[end], eos_token_id=ids[end],
                           decoder_start_token_id=ids["<|startoftranscript|>"])
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"], eos_token_id=ids[end],
        pad_token_id=ids[end], no_timestamps_token_id=ids["<|notimestamps|>"],
        suppress_tokens=[ids[t] for t in specials], begin_suppress_tokens=[ids[end]],
        is_multilingual=False, max_length=64)
    model.save_pretrained(path)
    WhisperProcessor(WhisperFeatureExtractor(), tokenizer).save_pretrained(path)
    return path


def build_lm(path: Path) -> Path:
    """Saves a random 2-layer Llama-style causal LM (32-d) with a BPE tokenizer trained on the
    fly (pad token included)."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = _bpe(200, ["[PAD]", "[UNK]", "[BOS]"], byte_level=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]",
                                        unk_token="[UNK]", bos_token="[BOS]")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path

