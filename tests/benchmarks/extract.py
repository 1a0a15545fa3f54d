"""Extraction benchmark: clips per second of each stage, and the full-dataset estimate.

Generates ``--clips`` videos of ``--seconds`` s (``--size`` px, 25 fps, the astronaut's face,
speech-like AAC audio) in a temporary folder, then measures, one process, one clip at a time
for decoding and one batch of ``--batch-size`` clips at a time for the encoders:

* decode: PyAV video frames at 5 fps; audio as 16 kHz mono;
* detect: OpenCV's Haar cascade on the sampled frames;
* encode: the visual, audio and text encoders' ``predict_step`` (the LightningModules the
  pipeline runs), and speech recognition (``generate``, up to ``--asr-tokens`` tokens);
* end to end (tiny models only): ``emimimic extract`` on the clips, all stages, with
  ``--workers`` DataLoader workers.

Models: the tiny random-weight test models (default), or with ``--paper-sizes`` randomly
initialised models of the paper's sizes (ViT-Base, WavLM-Large, Whisper-Large-v3, a ChatGLM3-6B
sized GLM with ``--glm-layers`` of its 28 layers), in bf16 autocast on a GPU (``--device cuda``).
The estimate for the 17,246 clips of Hume-Vidmimic2 scales each stage by 7 s / ``--seconds``
(clip length; an ASR piece is 30 s whatever the clip) and assumes decoding runs in ``--workers``
parallel workers beside the encoders: a stage takes max(decode / workers, encode).

Usage: ``python tests/benchmarks/extract.py [--clips 16] [--seconds 3] [--device cpu|cuda]
[--paper-sizes] [--glm-layers 28]``. A script that prints figures, not a timed test.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extract_support import (  # noqa: E402
    WORDS,
    build_lm,
    build_vit,
    build_wavlm,
    build_whisper,
    write_split,
    write_transcripts,
    write_video,
)

from emimimic.extract.asr import SpeechPreparer, Transcriber  # noqa: E402
from emimimic.extract.audio import SpeechEncoder, WavePreparer, front_end_of  # noqa: E402
from emimimic.extract.faces import HaarFaceDetector  # noqa: E402
from emimimic.extract.media import clip_audio, decode_frames  # noqa: E402
from emimimic.extract.text import TokenEncoder, TokenPreparer  # noqa: E402
from emimimic.extract.visual import FrameEncoder, FramePreparer  # noqa: E402
from emimimic.extract.work import Clip  # noqa: E402

FULL_DATASET = 17246
MEAN_SECONDS = 7.0


def paper_models(glm_layers: int) -> dict[str, tuple]:
    """Random models of the paper's sizes with their processors (nothing downloaded)."""
    from transformers import (
        GlmConfig,
        GlmModel,
        PreTrainedTokenizerFast,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
        Wav2Vec2FeatureExtractor,
        WavLMConfig,
        WavLMModel,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
    )

    tiny = tempfile.mkdtemp()
    whisper_tiny = build_whisper(Path(tiny) / "w")
    lm_tiny = build_lm(Path(tiny) / "lm")
    from transformers import AutoProcessor, AutoTokenizer

    processor = AutoProcessor.from_pretrained(whisper_tiny)
    processor.feature_extractor = WhisperFeatureExtractor(feature_size=128)
    tokenizer: PreTrainedTokenizerFast = AutoTokenizer.from_pretrained(lm_tiny)
    vit = ViTModel(ViTConfig(), add_pooling_layer=False)
    wavlm = WavLMModel(WavLMConfig(hidden_size=1024, num_hidden_layers=24,
                                   num_attention_heads=16, intermediate_size=4096,
                                   feat_extract_norm="layer", do_stable_layer_norm=True))
    whisper = WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=51866, d_model=1280, encoder_layers=32, decoder_layers=32,
        encoder_attention_heads=20, decoder_attention_heads=20, encoder_ffn_dim=5120,
        decoder_ffn_dim=5120, num_mel_bins=128))
    whisper.generation_config = build_generation_config(len(processor.tokenizer))
    glm = GlmModel(GlmConfig(vocab_size=65024, hidden_size=4096, intermediate_size=13696,
                             num_hidden_layers=glm_layers, num_attention_heads=32,
                             num_key_value_heads=2, head_dim=128, pad_token_id=0))
    return {"vit": (vit, ViTImageProcessor()),
            "wavlm": (wavlm, Wav2Vec2FeatureExtractor(return_attention_mask=True)),
            "whisper": (whisper, processor), "lm": (glm, tokenizer)}


def build_generation_config(vocab: int):
    """A generation config for a random Whisper-Large whose tokens are random ids."""
    from transformers import GenerationConfig

    return GenerationConfig(decoder_start_token_id=1, eos_token_id=vocab + 10**6,
                            pad_token_id=0, max_length=448)


def tiny_models(root: Path) -> dict[str, Path]:
    return {"vit": build_vit(root / "vit"), "wavlm": build_wavlm(root / "wavlm"),
            "whisper": build_whisper(root / "whisper"), "lm": build_lm(root / "lm")}


def load(paths: dict[str, Path]) -> dict[str, tuple]:
    from transformers import (
        AutoFeatureExtractor,
        AutoImageProcessor,
        AutoModel,
        AutoModelForSpeechSeq2Seq,
        AutoProcessor,
        AutoTokenizer,
    )

    return {"vit": (AutoModel.from_pretrained(paths["vit"]),
                    AutoImageProcessor.from_pretrained(paths["vit"])),
            "wavlm": (AutoModel.from_pretrained(paths["wavlm"]),
                      AutoFeatureExtractor.from_pretrained(paths["wavlm"])),
            "whisper": (AutoModelForSpeechSeq2Seq.from_pretrained(paths["whisper"]),
                        AutoProcessor.from_pretrained(paths["whisper"])),
            "lm": (AutoModel.from_pretrained(paths["lm"]),
                   AutoTokenizer.from_pretrained(paths["lm"]))}


def timed(fn: Callable[[], object], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def to_device(batch, device: str):
    from lightning.fabric.utilities.apply_func import move_data_to_device

    return move_data_to_device(batch, torch.device(device))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--size", type=int, default=320)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--asr-tokens", type=int, default=24)
    p.add_argument("--device", default="cpu")
    p.add_argument("--paper-sizes", action="store_true")
    p.add_argument("--glm-layers", type=int, default=28)
    args = p.parse_args()
    device = args.device
    root = Path(tempfile.mkdtemp(prefix="extract-bench-"))
    (root / "raw").mkdir()
    clips = [Clip(f"{n:05d}", "train") for n in range(args.clips)]
    for n, clip in enumerate(clips):
        write_video(root / "raw" / f"{clip.id}.mp4", args.seconds, fps=25, size=args.size, seed=n)
    paths = tiny_models(root / "models")
    models = paper_models(args.glm_layers) if args.paper_sizes else load(paths)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda"
                else contextlib.nullcontext())
    for model, _ in models.values():
        model.to(device).eval()
    rates: dict[str, float] = {}

    # decoding and detection, one clip at a time, one process
    videos = [root / "raw" / f"{c.id}.mp4" for c in clips]
    frames = {}
    t = time.perf_counter()
    for clip, video in zip(clips, videos, strict=True):
        frames[clip.id] = decode_frames(video, 5.0)
    rates["decode video (5 fps)"] = len(clips) / (time.perf_counter() - t)
    detector = HaarFaceDetector()
    t = time.perf_counter()
    for clip in clips:
        [detector(f) for f in frames[clip.id]]
    rates["detect faces (Haar)"] = len(clips) / (time.perf_counter() - t)
    t = time.perf_counter()
    for clip in clips:
        clip_audio(clip.id, None, root / "raw")
    rates["decode audio (16 kHz)"] = len(clips) / (time.perf_counter() - t)

    groups = [clips[i:i + args.batch_size] for i in range(0, len(clips), args.batch_size)]

    def encoder_rate(preparer, module) -> float:
        batches = []
        for g in groups:
            items = [preparer.prepare(c) for c in g]
            batches.append(to_device(preparer.collate([c.id for c in g], items, {}), device))
        module.to(device)
        with torch.inference_mode(), autocast:
            module.predict_step(batches[0])  # warm-up
            seconds = sum(timed(lambda b=b: module.predict_step(b), device) for b in batches)
        return len(clips) / seconds

    vit, image_processor = models["vit"]
    visual = FramePreparer(image_processor, root / "raw", None, 5.0, detector, 0.2)
    rates["encode visual"] = encoder_rate(visual, FrameEncoder(vit, "vit", None, "cls", 256))
    wavlm, extractor = models["wavlm"]
    front = front_end_of(wavlm.config)
    audio = WavePreparer(extractor, None, root / "raw", 16000, front, 30.0, 5.0)
    rates["encode audio"] = encoder_rate(audio, SpeechEncoder(wavlm, "wavlm", None, 8, front))
    whisper, processor = models["whisper"]
    speech = SpeechPreparer(processor, None, root / "raw", 16000, 480000)
    rates["speech recognition"] = encoder_rate(
        speech, Transcriber(whisper, processor, {"max_new_tokens": args.asr_tokens,
                                                 "min_new_tokens": args.asr_tokens}))
    lm, tokenizer = models["lm"]
    rng = np.random.default_rng(0)
    transcripts = {c.id: " ".join(rng.choice(WORDS, 20)) for c in clips}
    text = TokenPreparer(tokenizer, transcripts, "bench", None, 512)
    rates["encode text"] = encoder_rate(text, TokenEncoder(lm, "lm", None))

    print(f"{len(clips)} clips of {args.seconds:g} s, {args.size}x{args.size} px, device "
          f"{device}, {'paper-size' if args.paper_sizes else 'tiny'} models, "
          f"batch {args.batch_size}, torch threads {torch.get_num_threads()}")
    for name, rate in rates.items():
        print(f"  {name:24s} {rate:9.2f} clips/s")

    if not args.paper_sizes:
        from emimimic.extract import commands

        write_split(root / "train.csv", [int(c.id) for c in clips])
        tx = write_transcripts(root / "tx.csv", transcripts)
        argv = ["--splits.train", str(root / "train.csv"), "--raw", str(root / "raw"),
                "--work", str(root / "work"), "--store", str(root / "store"),
                "--visual.model", str(paths["vit"]), "--audio.model", str(paths["wavlm"]),
                "--text.model", str(paths["lm"]), "--text.transcripts", str(tx),
                "--engine.progress", "false", "--engine.batch_size", str(args.batch_size),
                "--engine.num_workers", str(args.workers)]
        t = time.perf_counter()
        commands.main(argv)
        print(f"  end to end (visual, audio, text from transcripts; {args.workers} workers): "
              f"{len(clips) / (time.perf_counter() - t):.2f} clips/s")

    scale = MEAN_SECONDS / args.seconds
    stages = {"visual": max(scale / rates["decode video (5 fps)"] / args.workers
                            + scale / rates["detect faces (Haar)"] / args.workers,
                            scale / rates["encode visual"]),
              "audio": max(scale / rates["decode audio (16 kHz)"] / args.workers,
                           scale / rates["encode audio"]),
              "asr": max(scale / rates["decode audio (16 kHz)"] / args.workers,
                         1 / rates["speech recognition"]),
              "text": 1 / rates["encode text"]}
    total = sum(stages.values()) * FULL_DATASET
    print(f"estimated full dataset ({FULL_DATASET} clips of {MEAN_SECONDS:g} s, "
          f"{args.workers} decoding workers): "
          + ", ".join(f"{k} {v * FULL_DATASET / 3600:.2f} h" for k, v in stages.items())
          + f"; total {total / 3600:.2f} h")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
