"""``emimimic convert-chatglm3``: a tiny checkpoint in ChatGLM3's own layout, converted and
compared with a reference forward pass written here from ChatGLM3's published architecture."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from extract_support import WORDS, write_split, write_transcripts
from support.reference import torch_pool

pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

from emimimic.data.store import FeatureStore  # noqa: E402
from emimimic.errors import UserError  # noqa: E402
from emimimic.extract import commands  # noqa: E402

CONFIG = {  # ChatGLM3-6B's config.json keys, tiny sizes
    "model_type": "chatglm", "architectures": ["ChatGLMModel"], "num_layers": 2,
    "hidden_size": 32, "ffn_hidden_size": 48, "kv_channels": 8, "num_attention_heads": 4,
    "multi_query_attention": True, "multi_query_group_num": 2, "padded_vocab_size": 320,
    "seq_length": 256, "layernorm_epsilon": 1e-5, "rmsnorm": True, "post_layer_norm": True,
    "add_bias_linear": False, "add_qkv_bias": True,
    "apply_residual_connection_post_layernorm": False, "original_rope": True,
    "pre_seq_len": None, "quantization_bit": 0, "torch_dtype": "float32",
    "eos_token_id": 2, "pad_token_id": 0,
}


def chatglm3_tensors(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under ChatGLM3's tensor names and shapes."""
    g = torch.Generator().manual_seed(seed)
    h, f, hd = cfg["hidden_size"], cfg["ffn_hidden_size"], cfg["kv_channels"]
    qkv = (cfg["num_attention_heads"] + 2 * cfg["multi_query_group_num"]) * hd

    def r(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    t = {"transformer.embedding.word_embeddings.weight": r(cfg["padded_vocab_size"], h, scale=1),
         "transformer.encoder.final_layernorm.weight": 1 + r(h, scale=0.1),
         "transformer.output_layer.weight": r(cfg["padded_vocab_size"], h),
         "transformer.rotary_pos_emb.inv_freq":
             1.0 / 10000 ** (torch.arange(0, hd // 2, 2, dtype=torch.float32) / (hd // 2))}
    for n in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{n}."
        t |= {p + "input_layernorm.weight": 1 + r(h, scale=0.1),
              p + "self_attention.query_key_value.weight": r(qkv, h),
              p + "self_attention.query_key_value.bias": r(qkv),
              p + "self_attention.dense.weight": r(h, cfg["num_attention_heads"] * hd),
              p + "post_attention_layernorm.weight": 1 + r(h, scale=0.1),
              p + "mlp.dense_h_to_4h.weight": r(2 * f, h),
              p + "mlp.dense_4h_to_h.weight": r(h, f)}
    return t


def reference_forward(w: dict[str, torch.Tensor], cfg: dict, ids: list[int]) -> torch.Tensor:
    """ChatGLM3's forward pass, from its paper and published code's description: pre-RMSNorm
    blocks; multi-query attention (heads share ``multi_query_group_num`` key/value groups, head i
    using group i // (heads / groups)) with QKV bias; rotary embedding on the first half of each
    head's dims, rotating consecutive pairs (2i, 2i+1) by position x 10000^(-2i / half);
    causal softmax attention scaled by 1/sqrt(head dim); SwiGLU MLP (silu(first half) x second
    half); a final RMSNorm. Returns the last hidden states [T, H]."""
    heads, groups, hd = cfg["num_attention_heads"], cfg["multi_query_group_num"], cfg["kv_channels"]
    eps, steps = cfg["layernorm_epsilon"], len(ids)
    half = hd // 2
    angles = torch.arange(steps, dtype=torch.float64)[:, None] * (
        10000.0 ** (-torch.arange(0, half, 2, dtype=torch.float64) / half))[None]
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]

    def rms(x: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain

    def rope(x: torch.Tensor) -> torch.Tensor:  # [T, n, hd]
        even, odd = x[..., 0:half:2], x[..., 1:half:2]
        turned = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1)
        return torch.cat([turned.flatten(-2), x[..., half:]], dim=-1)

    w = {k: v.double() for k, v in w.items()}
    x = w["transformer.embedding.word_embeddings.weight"][torch.tensor(ids)]
    causal = torch.full((steps, steps), float("-inf"), dtype=torch.float64).triu(1)
    for n in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{n}."
        h = rms(x, w[p + "input_layernorm.weight"])
        qkv = h @ w[p + "self_attention.query_key_value.weight"].T + w[
            p + "self_attention.query_key_value.bias"]
        q, k, v = qkv.split([heads * hd, groups * hd, groups * hd], dim=-1)
        q = rope(q.reshape(steps, heads, hd))
        k = rope(k.reshape(steps, groups, hd))
        v = v.reshape(steps, groups, hd)
        share = torch.tensor([i // (heads // groups) for i in range(heads)])
        k, v = k[:, share], v[:, share]
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd) + causal
        out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(steps, heads * hd)
        x = x + out @ w[p + "self_attention.dense.weight"].T
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        gate, up = (h @ w[p + "mlp.dense_h_to_4h.weight"].T).chunk(2, dim=-1)
        x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.dense_4h_to_h.weight"].T
    return rms(x, w["transformer.encoder.final_layernorm.weight"]).float()


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], cfg: dict = CONFIG) -> Path:
    """Writes config.json, two safetensors shards and a SentencePiece BPE tokenizer.model."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    names = sorted(tensors)
    for n, part in enumerate((names[::2], names[1::2])):
        save_file({k: tensors[k].contiguous() for k in part},
                  str(folder / f"model-0000{n + 1}-of-00002.safetensors"))
    rng = np.random.default_rng(0)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS, 10)) for _ in range(300)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "tokenizer"),
                                   vocab_size=300, model_type="bpe", byte_fallback=True,
                                   character_coverage=1.0, minloglevel=2)
    return folder


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, Path]:
    root = tmp_path_factory.mktemp("chatglm3")
    tensors = chatglm3_tensors(CONFIG)
    source = write_checkpoint(root / "chatglm3-tiny", tensors)
    commands.convert_chatglm3_main([str(source), str(root / "glm")])
    return root / "glm", tensors, source


def test_converted_model_matches_the_reference_forward(converted: tuple) -> None:
    from transformers import AutoModel

    dest, tensors, _ = converted
    model = AutoModel.from_pretrained(dest).eval()
    assert type(model).__name__ == "GlmModel"
    for ids in ([5, 17, 33, 2, 90, 151, 7, 64, 64, 12, 3], [42]):
        with torch.no_grad():
            got = model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        torch.testing.assert_close(got, reference_forward(tensors, CONFIG, ids),
                                   rtol=1e-4, atol=1e-4)


def test_converted_tokenizer_matches_sentencepiece(converted: tuple) -> None:
    from transformers import AutoTokenizer

    dest, _, source = converted
    sp = spm.SentencePieceProcessor(model_file=str(source / "tokenizer.model"))
    tok = AutoTokenizer.from_pretrained(dest)
    n = sp.vocab_size()
    specials = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>",
                "<|assistant|>", "<|observation|>"]
    assert tok.convert_tokens_to_ids(specials) == list(range(n, n + 9))
    for text in ("hello world", "a great day for a walk in the park", "Zebra café ☃ 42!",
                 "  we   are happy  "):
        ids = tok(text)["input_ids"]
        assert ids == [n + 1, n + 3, *sp.encode(text)], text
        assert tok.decode(ids[2:]) == sp.decode(sp.encode(text))


def test_every_tensor_is_mapped_or_the_conversion_stops(tmp_path: Path) -> None:
    tensors = chatglm3_tensors(CONFIG)
    extra = dict(tensors, **{"transformer.prefix_encoder.embedding.weight": torch.zeros(4, 32)})
    source = write_checkpoint(tmp_path / "extra", extra)
    with pytest.raises(UserError, match="prefix_encoder.embedding.weight.*no GLM counterpart"):
        commands.convert_chatglm3_main([str(source), str(tmp_path / "out1")])
    lacking = {k: v for k, v in tensors.items() if "layers.1.mlp.dense_4h_to_h" not in k}
    source = write_checkpoint(tmp_path / "lacking", lacking)
    with pytest.raises(UserError, match=r"no tensor for \['model.layers.1.mlp.down_proj"):
        commands.convert_chatglm3_main([str(source), str(tmp_path / "out2")])
    source = write_checkpoint(tmp_path / "bias", tensors, {**CONFIG, "add_bias_linear": True})
    with pytest.raises(UserError, match="add_bias_linear=True"):
        commands.convert_chatglm3_main([str(source), str(tmp_path / "out3")])
    assert not any((tmp_path / f"out{n}").exists() for n in (1, 2, 3))


def test_converted_model_extracts_text(converted: tuple, tmp_path: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    dest, _, _ = converted
    splits = {"train": write_split(tmp_path / "train.csv", [0, 1])}
    texts = {"00000": "hello world", "00001": "see you again today"}
    transcripts = write_transcripts(tmp_path / "t.csv", texts)
    commands.main(["--splits.train", str(splits["train"]), "--work", str(tmp_path / "work"),
                   "--store", str(tmp_path / "store"), "--modalities", "[text]", "--text.model",
                   str(dest), "--text.transcripts", str(transcripts),
                   "--engine.num_workers", "0", "--engine.progress", "false"])
    view = FeatureStore(tmp_path / "store").split("train")
    model, tok = AutoModel.from_pretrained(dest).eval(), AutoTokenizer.from_pretrained(dest)
    for i, clip in enumerate(view.ids):
        with torch.no_grad():
            raw = model(**tok(texts[clip], return_tensors="pt")).last_hidden_state[0]
        np.testing.assert_allclose(view.read("text", i).astype(np.float32),
                                   torch_pool(raw).astype(np.float32), rtol=1e-2, atol=3e-3)
