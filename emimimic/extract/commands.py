"""The ``emimimic extract`` and ``emimimic convert-chatglm3`` subcommands.

Usage::

    emimimic extract --split train=train_split.csv --split valid=valid_split.csv \\
        --raw raw/ --work work/ --store store/ \\
        --visual-model VIT --audio-model microsoft/wavlm-large \\
        --asr-model openai/whisper-large-v3 --text-model chatglm3-6b-glm
    emimimic convert-chatglm3 THUDM/chatglm3-6b-folder chatglm3-6b-glm
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from emimimic.constants import MODALITIES
from emimimic.data.commands import parse_pairs
from emimimic.errors import UserError

#: Import names of what only extraction needs, with the distribution that provides each.
EXTRA_MODULES = {"transformers": "transformers", "av": "av", "cv2": "opencv-python-headless"}
INSTALL_HINT = 'pip install -e ".[extract]"'


def require_extra() -> None:
    """Checks that the ``extract`` extra is installed.

    Raises:
        UserError: naming what is missing and the install command.
    """
    lacking = [dist for module, dist in EXTRA_MODULES.items()
               if importlib.util.find_spec(module) is None]
    if lacking:
        raise UserError(f"emimimic extract needs the 'extract' extra (missing: "
                        f"{', '.join(lacking)}); install it with {INSTALL_HINT}")


def _pairs(values: list[str], option: str) -> dict[str, Path]:
    return {k: Path(v) for k, v in parse_pairs(values, option).items()}


def build_parser() -> argparse.ArgumentParser:
    """Returns the parser of ``emimimic extract``."""
    p = argparse.ArgumentParser(
        prog="emimimic extract",
        description="Extract per-clip features from raw clips with Hugging Face models and pack "
                    "them into a feature store. Interrupted runs resume; finished clips are "
                    "skipped.")
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--split", action="append", required=True, metavar="NAME=CSV",
                    help="split CSV (Filename + targets, or Filename only); repeat per split")
    io.add_argument("--raw", type=Path, help="folder of videos {id}.mp4 (frames and audio)")
    io.add_argument("--audio", type=Path,
                    help="folder of audio files {id}.wav|mp3 used instead of the video's track")
    io.add_argument("--face-images", type=Path,
                    help="folder of face crops {id}/{k}.jpg used instead of detecting faces")
    io.add_argument("--work", type=Path, required=True,
                    help="work folder of per-clip results (resume, report.csv, transcripts.csv)")
    io.add_argument("--store", type=Path,
                    help="feature store to write (re-packed when the work folder gains data)")
    io.add_argument("--modality", action="append", choices=MODALITIES,
                    help="extract only this modality; repeat (default: all three)")
    io.add_argument("--redo", action="append", default=[],
                    choices=("visual", "audio", "asr", "text"),
                    help="discard a stage's results in the work folder and extract it again")
    io.add_argument("--bad-input", choices=("record", "error"), default="record",
                    help="a corrupt or missing file, a clip with no audio track, no face or no "
                         "frames is recorded as missing in WORK/report.csv and the run goes on "
                         "(record, default), or stops the run with an error naming the clip")

    v = p.add_argument_group("visual")
    v.add_argument("--visual-model", help="Hugging Face image model name or local path")
    v.add_argument("--visual-revision", help="model revision (branch, tag or commit)")
    v.add_argument("--visual-layer", default="last",
                   help="'last' (last_hidden_state) or an index into hidden_states")
    v.add_argument("--visual-token", choices=("cls", "mean", "pooler"), default="cls",
                   help="one vector per frame: the CLS token, the token mean or pooler_output")
    v.add_argument("--fps", type=float, default=5.0, help="frames sampled per second of video")
    v.add_argument("--detector", default="haar",
                   help="face detector: haar (OpenCV, default), none (whole frame) or "
                        "package.module:Class")
    v.add_argument("--face-margin", type=float, default=0.2,
                   help="crop side = face box side x (1 + margin)")
    v.add_argument("--frames-per-step", type=int, default=64,
                   help="face crops per forward pass")

    a = p.add_argument_group("audio")
    a.add_argument("--audio-model", help="Hugging Face speech encoder name or local path")
    a.add_argument("--audio-revision")
    a.add_argument("--audio-layer", default="last",
                   help="'last' (last_hidden_state) or an index into hidden_states")
    a.add_argument("--chunk-seconds", type=float, default=30.0,
                   help="longer clips are encoded in windows of this many seconds")
    a.add_argument("--context-seconds", type=float, default=5.0,
                   help="audio on each side of a window that its frames can attend to")
    a.add_argument("--windows-per-step", type=int, default=8,
                   help="audio windows per forward pass")

    t = p.add_argument_group("text")
    t.add_argument("--transcripts", type=Path,
                   help="CSV Filename,transcript to use instead of speech recognition")
    t.add_argument("--asr-model", help="Hugging Face speech-to-text model (e.g. Whisper)")
    t.add_argument("--asr-revision")
    t.add_argument("--asr-language", help="language code passed to generate (Whisper: en)")
    t.add_argument("--asr-max-tokens", type=int, default=128,
                   help="most tokens generated per 30 s piece")
    t.add_argument("--text-model", help="Hugging Face language model name or local path "
                                        "(ChatGLM3: see emimimic convert-chatglm3)")
    t.add_argument("--text-revision")
    t.add_argument("--text-layer", default="last",
                   help="'last' (last_hidden_state) or an index into hidden_states")
    t.add_argument("--max-tokens", type=int, default=512, help="longest transcript, in tokens")
    t.add_argument("--empty-text", default="missing",
                   help="an empty transcript leaves the clip without text (missing, default) "
                        "or is replaced: placeholder=TEXT (the paper's choice)")

    e = p.add_argument_group("engine (Lightning Trainer)")
    e.add_argument("--batch-size", type=int, default=8, help="clips per batch")
    e.add_argument("--num-workers", type=int, default=2, help="DataLoader workers (decoding)")
    e.add_argument("--accelerator", default="auto")
    e.add_argument("--devices", default="auto")
    e.add_argument("--num-nodes", type=int, default=1)
    e.add_argument("--strategy", default="auto", help="e.g. ddp for several GPUs")
    e.add_argument("--precision", default="auto",
                   help="auto (bf16-mixed on GPU, 32-true on CPU), 16-mixed, bf16-true, ...")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str]) -> None:
    """Runs ``emimimic extract`` with ``argv`` (the arguments after the subcommand)."""
    args = build_parser().parse_args(argv)
    require_extra()
    from emimimic.extract.engine import EngineOptions
    from emimimic.extract.pipeline import ExtractOptions, extract

    for option, value in (("--batch-size", args.batch_size), ("--frames-per-step",
                          args.frames_per_step), ("--windows-per-step", args.windows_per_step),
                          ("--max-tokens", args.max_tokens), ("--asr-max-tokens",
                          args.asr_max_tokens)):
        if value < 1:
            raise UserError(f"{option} {value}: expected >= 1")
    if args.fps <= 0 or args.chunk_seconds <= 0 or args.context_seconds < 0:
        raise UserError("--fps and --chunk-seconds must be > 0, --context-seconds >= 0")
    devices: str | int = int(args.devices) if args.devices.isdigit() else args.devices
    engine = EngineOptions(args.batch_size, args.num_workers, args.accelerator,
                           devices, args.num_nodes, args.strategy,  # type: ignore[arg-type]
                           args.precision, not args.quiet)
    opts = ExtractOptions(
        splits=_pairs(args.split, "--split"), work=args.work, store=args.store, raw=args.raw,
        audio=args.audio, face_images=args.face_images,
        modalities=tuple(dict.fromkeys(args.modality or MODALITIES)),
        visual_model=args.visual_model, visual_revision=args.visual_revision,
        visual_layer=args.visual_layer, visual_token=args.visual_token, fps=args.fps,
        detector=args.detector, face_margin=args.face_margin,
        frames_per_step=args.frames_per_step, audio_model=args.audio_model,
        audio_revision=args.audio_revision, audio_layer=args.audio_layer,
        chunk_seconds=args.chunk_seconds, context_seconds=args.context_seconds,
        windows_per_step=args.windows_per_step, asr_model=args.asr_model,
        asr_revision=args.asr_revision, asr_language=args.asr_language,
        asr_max_tokens=args.asr_max_tokens, transcripts=args.transcripts,
        text_model=args.text_model, text_revision=args.text_revision,
        text_layer=args.text_layer, max_tokens=args.max_tokens, empty_text=args.empty_text,
        bad_input=args.bad_input, redo=tuple(args.redo), engine=engine)
    summary = extract(opts)
    for line in summary.lines():
        print(line)


def build_convert_parser() -> argparse.ArgumentParser:
    """Returns the parser of ``emimimic convert-chatglm3``."""
    p = argparse.ArgumentParser(
        prog="emimimic convert-chatglm3",
        description="Convert a ChatGLM3 checkpoint (THUDM/chatglm3-6b layout, which needs remote "
                    "code) into transformers' built-in GLM classes and a standard fast "
                    "tokenizer, loadable with AutoModel / AutoTokenizer and no remote code.")
    p.add_argument("source", type=Path,
                   help="folder of the ChatGLM3 checkpoint: config.json, the weight shards "
                        "(*.safetensors or pytorch_model-*.bin) and tokenizer.model")
    p.add_argument("dest", type=Path, help="folder to write (must not exist)")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None,
                   help="dtype of the written weights (default: the checkpoint's)")
    return p


def convert_chatglm3_main(argv: list[str]) -> None:
    """Runs ``emimimic convert-chatglm3`` with ``argv``."""
    args = build_convert_parser().parse_args(argv)
    require_extra()
    from emimimic.extract.chatglm3 import convert_chatglm3

    out = convert_chatglm3(args.source, args.dest, dtype=args.dtype)
    print(f"converted {args.source} -> {out} (load it with AutoModel.from_pretrained)")
