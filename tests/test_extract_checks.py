"""``emimimic extract``: options a model refuses fail in one line when the model is loaded.

Each case runs the real command on tiny random-weight models; a refused option ends in exit
status 2 and one stderr line naming the option and the model, before any clip is processed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from extract_support import (
    build_lm,
    build_vit,
    build_wavlm,
    build_whisper,
    speech_like,
    write_face_images,
    write_split,
    write_transcripts,
    write_wav,
)

pytest.importorskip("transformers")
pytest.importorskip("av")
pytest.importorskip("cv2")

from emimimic.__main__ import main  # noqa: E402
from emimimic.extract.engine import hidden_state_count  # noqa: E402

CLIPS = ("00000", "00001")


def _english_only(path: Path) -> Path:
    """A tiny Whisper saved English-only: ``is_multilingual`` False and no ``lang_to_id``."""
    build_whisper(path)
    saved = json.loads((path / "generation_config.json").read_text())
    saved["is_multilingual"] = False
    saved.pop("lang_to_id", None)
    (path / "generation_config.json").write_text(json.dumps(saved))
    return path


def _multilingual(path: Path) -> Path:
    """A tiny Whisper whose generation config knows one language (en) and the transcribe task."""
    from transformers import WhisperTokenizer

    build_whisper(path)
    ids = WhisperTokenizer.from_pretrained(path).convert_tokens_to_ids
    saved = json.loads((path / "generation_config.json").read_text())
    saved.update(is_multilingual=True, lang_to_id={"<|en|>": ids("<|en|>")},
                 task_to_id={"transcribe": ids("<|transcribe|>")})
    (path / "generation_config.json").write_text(json.dumps(saved))
    return path


def _vit_without_pooler(path: Path) -> Path:
    """A ViT saved without pooler weights (``AutoModel`` would give it a random pooler)."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, image_size=32, patch_size=8)
    ViTModel(config, add_pooling_layer=False).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def _resnet(path: Path) -> Path:
    """A 2-stage ResNet: its hidden states are feature maps, so it has no CLS token."""
    from transformers import ResNetConfig, ResNetModel, ViTImageProcessor

    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])
                ).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def _poolformer(path: Path) -> Path:
    """A 2-stage PoolFormer: no pooler module and no ``pooler_output`` in its outputs."""
    from transformers import PoolFormerConfig, PoolFormerModel, ViTImageProcessor

    PoolFormerModel(PoolFormerConfig(num_encoder_blocks=2, depths=[1, 1], hidden_sizes=[8, 16],
                                     patch_sizes=[7, 3], strides=[4, 2], padding=[2, 1])
                    ).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random-weight models saved with ``save_pretrained``, built once for the module."""
    root = tmp_path_factory.mktemp("check_models")
    torch.manual_seed(0)
    built = {"vit": build_vit(root / "vit"), "wavlm": build_wavlm(root / "wavlm"),
             "lm": build_lm(root / "lm"), "whisper_en": _english_only(root / "whisper_en"),
             "whisper_ml": _multilingual(root / "whisper_ml"),
             "vit_no_pooler": _vit_without_pooler(root / "vit_no_pooler"),
             "resnet": _resnet(root / "resnet"), "poolformer": _poolformer(root / "poolformer")}
    return built


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two clips with face crops, audio and transcripts, so a missing check would process them."""
    root = tmp_path_factory.mktemp("check_inputs")
    (root / "audio").mkdir()
    for n, clip in enumerate(CLIPS):
        write_face_images(root / "faces" / clip, count=2, seed=n)
        write_wav(root / "audio" / f"{clip}.wav", speech_like(0.8, seed=n))
    return {"split": write_split(root / "train.csv", [0, 1]), "faces": root / "faces",
            "audio": root / "audio",
            "transcripts": write_transcripts(root / "tx.csv", {"00000": "hello world",
                                                               "00001": "a walk in the park"})}


def _argv(work: Path, inputs: dict[str, Path], models: dict[str, Path],
          args: list[str]) -> list[str]:
    """Returns ``emimimic extract`` arguments; ``{name}`` in ``args`` becomes a model's path and
    ``{faces}``, ``{audio}``, ``{transcripts}`` the inputs."""
    paths = {k: str(v) for k, v in {**models, **inputs}.items()}
    return ["extract", "--splits.train", str(inputs["split"]), "--work", str(work),
            "--face_images", paths["faces"], "--audio_files", paths["audio"],
            "--engine.num_workers", "0", "--engine.progress", "false",
            *(a.format(**paths) for a in args)]


TEXT = ["--modalities", "[text]", "--text.model", "{lm}", "--text.transcripts", "{transcripts}"]
ASR = ["--modalities", "[text]", "--text.model", "{lm}"]

# (the model the message names, the options, the message after "emimimic extract: error: ")
REFUSED = {
    "asr-language-on-english-only": (
        "whisper_en", [*ASR, "--asr.model", "{whisper_en}", "--asr.language", "en"],
        "--asr.language 'en': model {} is English-only and takes no language; drop the option"),
    "asr-language-unknown": (
        "whisper_ml", [*ASR, "--asr.model", "{whisper_ml}", "--asr.language", "fr"],
        "--asr.language 'fr': model {} does not know this language; it takes 1 language: en "
        "(a code or a name such as english)"),
    "asr-max-tokens": (
        "whisper_en", [*ASR, "--asr.model", "{whisper_en}", "--asr.max_tokens", "63"],
        "--asr.max_tokens 63: model {} writes at most 62 tokens per piece (max_target_positions "
        "64 less its 2-token prompt); use at most 62"),
    "asr-max-tokens-with-language": (
        "whisper_ml", [*ASR, "--asr.model", "{whisper_ml}", "--asr.language", "en",
                       "--asr.max_tokens", "61"],
        "--asr.max_tokens 61: model {} writes at most 60 tokens per piece (max_target_positions "
        "64 less its 4-token prompt); use at most 60"),
    "text-max-tokens": (
        "lm", [*TEXT, "--text.max_tokens", "4096"],
        "--text.max_tokens 4096: model {} reads at most 256 tokens (max_position_embeddings); "
        "use at most 256"),
    "text-layer": (
        "lm", [*TEXT, "--text.layer", "3"],
        "--text.layer 3: model {} has 3 hidden states (num_hidden_layers 2 + the embeddings); "
        "use last or an index from -3 to 2"),
    "visual-layer": (
        "vit", ["--modalities", "[visual]", "--visual.model", "{vit}", "--visual.layer", "-4"],
        "--visual.layer -4: model {} has 3 hidden states (num_hidden_layers 2 + the "
        "embeddings); use last or an index from -3 to 2"),
    "visual-pooler-not-in-checkpoint": (
        "vit_no_pooler", ["--modalities", "[visual]", "--visual.model", "{vit_no_pooler}",
                          "--visual.token", "pooler"],
        "--visual.token pooler: model {} has no pooler weights in its checkpoint "
        "(pooler.dense.bias, pooler.dense.weight: transformers would initialise them at "
        "random); use --visual.token cls or mean"),
    "visual-pooler-without-pooler-output": (
        "poolformer", ["--modalities", "[visual]", "--visual.model", "{poolformer}",
                       "--visual.token", "pooler"],
        "--visual.token pooler: model {} returns no pooler_output (PoolFormerModel returns "
        "BaseModelOutputWithNoAttention); use --visual.token mean"),
    "visual-cls-on-convolutional": (
        "resnet", ["--modalities", "[visual]", "--visual.model", "{resnet}"],
        "--visual.token cls: model {} is convolutional and has no CLS token (ResNetModel "
        "returns BaseModelOutputWithPoolingAndNoAttention: feature maps); use --visual.token "
        "mean or pooler"),
    "audio-layer": (
        "wavlm", ["--modalities", "[audio]", "--audio.model", "{wavlm}", "--audio.layer", "3"],
        "--audio.layer 3: model {} has 3 hidden states (num_hidden_layers 2 + the embeddings); "
        "use last or an index from -3 to 2"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_an_option_the_model_refuses_fails_in_one_line_before_any_clip(
        case: str, tmp_path: Path, models: dict[str, Path], inputs: dict[str, Path],
        capsys: pytest.CaptureFixture) -> None:
    model, args, message = REFUSED[case]
    work = tmp_path / "work"
    with pytest.raises(SystemExit) as exit_info:
        main(_argv(work, inputs, models, args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"emimimic extract: error: {message.format(models[model])}"]
    # refused when the model was loaded: no clip processed, no provenance recorded
    assert not [p for p in work.rglob("*") if p.is_file()]


@pytest.mark.parametrize("model, language, max_tokens", [
    ("whisper_ml", "en", 60), ("whisper_ml", "English", 60), ("whisper_en", None, 62)])
def test_options_at_the_models_limits_pass(model: str, language: str | None, max_tokens: int,
                                           tmp_path: Path, models: dict[str, Path],
                                           inputs: dict[str, Path]) -> None:
    """A language the model knows (code or name) and the limits themselves run through."""
    work = tmp_path / "work"
    args = [*ASR, "--asr.model", "{" + model + "}", "--asr.max_tokens", str(max_tokens),
            "--text.max_tokens", "256", "--text.layer", "-3",
            *(["--asr.language", language] if language else [])]
    main(_argv(work, inputs, models, args))
    assert sorted(p.stem for p in (work / "asr").glob("*.txt")) == list(CLIPS)
    asr = json.loads((work / "provenance" / "asr.json").read_text())
    assert (asr["language"], asr["max_tokens"]) == (language, max_tokens)
    done = {p.stem for p in (work / "text").glob("*.npy")}
    failed = {p.stem for p in (work / "failures" / "text").glob("*.json")}
    assert done | failed == set(CLIPS) and done  # random weights may write an empty transcript


def test_visual_and_audio_options_in_range_pass(tmp_path: Path, models: dict[str, Path],
                                                inputs: dict[str, Path]) -> None:
    work = tmp_path / "work"
    main(_argv(work, inputs, models, [
        "--modalities", "[visual, audio]", "--visual.model", "{vit}", "--visual.layer", "-3",
        "--visual.token", "pooler", "--audio.model", "{wavlm}", "--audio.layer", "2"]))
    for modality in ("visual", "audio"):
        assert sorted(p.stem for p in (work / modality).glob("*.npy")) == list(CLIPS)


def _tiny_models() -> dict[str, torch.nn.Module]:
    import transformers as T

    small = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64}
    return {
        "vit": T.ViTModel(T.ViTConfig(**small, image_size=32, patch_size=8)),
        "resnet": T.ResNetModel(T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16],
                                               depths=[1, 1])),
        "convnext": T.ConvNextModel(T.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1],
                                                     num_stages=2)),
        "swin": T.SwinModel(T.SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1],
                                         num_heads=[1, 2], window_size=2)),
        "poolformer": T.PoolFormerModel(T.PoolFormerConfig(
            num_encoder_blocks=2, depths=[1, 1], hidden_sizes=[8, 16], patch_sizes=[7, 3],
            strides=[4, 2], padding=[2, 1])),
        "wavlm": T.WavLMModel(T.WavLMConfig(**small, conv_dim=(16,) * 7,
                                            num_conv_pos_embeddings=16,
                                            num_conv_pos_embedding_groups=2)),
        "llama": T.LlamaModel(T.LlamaConfig(**small, num_key_value_heads=2, vocab_size=64)),
        "gpt2": T.GPT2Model(T.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64)),
    }


def test_the_configs_count_never_refuses_a_layer_the_model_has() -> None:
    """The layer check's count is exact, or too high (PoolFormer): never lower than the number
    of hidden states the model returns."""
    counts = {}
    for name, model in _tiny_models().items():
        inputs = ({"input_ids": torch.tensor([[1, 2, 3]])} if name in ("llama", "gpt2") else
                  {"input_values": torch.zeros(1, 4000)} if name == "wavlm" else
                  {"pixel_values": torch.zeros(1, 3, 32, 32)})
        with torch.no_grad():
            states = len(model.eval()(**inputs, output_hidden_states=True).hidden_states)
        counted = hidden_state_count(model.config)
        assert counted is not None and counted[0] >= states, name
        counts[name] = (counted[0], states)
    assert all(c == s for name, (c, s) in counts.items() if name != "poolformer"), counts
