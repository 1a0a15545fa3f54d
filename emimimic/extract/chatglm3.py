"""ChatGLM3 checkpoints -> transformers' built-in GLM classes and a standard fast tokenizer.

The published ``THUDM/chatglm3-6b`` needs ``trust_remote_code`` with code that current
transformers versions no longer run. Its architecture is the one transformers' ``GlmModel``
implements (GLM-4 is its successor): RMSNorm, multi-query attention with ``multi_query_group_num``
key/value groups and a bias on the fused QKV projection, rotary embedding on the first half of each
head's dims with interleaved pairs, SwiGLU with fused gate/up projections, no other biases. So the
conversion is a renaming plus a split of the fused QKV matrix; every tensor of the checkpoint is
mapped or, for the rotary frequencies, checked against what the GLM classes compute, and anything
else is an error.

The tokenizer is ChatGLM3's SentencePiece BPE model rebuilt as a ``tokenizers`` BPE (byte
fallback, the model's own normalisation), with ChatGLM3's special tokens at the ids its code gives
them (after the SentencePiece vocabulary) and its ``[gMASK] sop`` prefix as the post-processor.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch

from emimimic.errors import UserError
from emimimic.files import atomic_path

#: ChatGLM3's special tokens, in the order its tokenizer numbers them after the SentencePiece ids.
SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>",
                  "<|assistant|>", "<|observation|>")
#: Every input starts with these (ChatGLM3's ``get_prefix_tokens``).
PREFIX = ("[gMASK]", "sop")
#: Config values the GLM classes implement; another value means another architecture.
REQUIRED = {"rmsnorm": True, "post_layer_norm": True, "add_bias_linear": False,
            "add_qkv_bias": True, "apply_residual_connection_post_layernorm": False,
            "original_rope": True}
#: Config keys that must be unset or zero (features the conversion does not carry over).
UNSUPPORTED = ("pre_seq_len", "quantization_bit")

_LAYER = re.compile(r"transformer\.encoder\.layers\.(\d+)\.(.+)")


def glm_config(source: dict[str, Any]) -> Any:
    """Returns the ``GlmConfig`` equivalent to a ChatGLM3 ``config.json``.

    Raises:
        UserError: the config describes something the GLM classes do not implement.
    """
    from transformers import GlmConfig

    for key, value in REQUIRED.items():
        if source.get(key, value) != value:
            raise UserError(f"ChatGLM3 config: {key}={source.get(key)!r}; the conversion needs "
                            f"{value!r}")
    for key in UNSUPPORTED:
        if source.get(key):
            raise UserError(f"ChatGLM3 config: {key}={source[key]!r} is not supported")
    heads = int(source["num_attention_heads"])
    head_dim = int(source.get("kv_channels", int(source["hidden_size"]) // heads))
    groups = int(source["multi_query_group_num"]) if source.get("multi_query_attention") else heads
    theta = 10000.0 * float(source.get("rope_ratio", 1.0))
    return GlmConfig(
        vocab_size=int(source["padded_vocab_size"]), hidden_size=int(source["hidden_size"]),
        intermediate_size=int(source["ffn_hidden_size"]),
        num_hidden_layers=int(source["num_layers"]), num_attention_heads=heads,
        num_key_value_heads=groups, head_dim=head_dim,
        max_position_embeddings=int(source.get("seq_length", 8192)),
        rms_norm_eps=float(source.get("layernorm_epsilon", 1e-5)), attention_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": theta,
                         "partial_rotary_factor": 0.5},
        pad_token_id=source.get("pad_token_id", 0), eos_token_id=source.get("eos_token_id", 2),
        bos_token_id=None, tie_word_embeddings=False, hidden_act="silu",
        dtype=source.get("torch_dtype", "float16"))


def _shards(folder: Path) -> list[Path]:
    found = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not found:
        raise UserError(f"{folder}: no weight files (*.safetensors or pytorch_model*.bin)")
    return found


def iter_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (name, tensor) of every weight shard of a checkpoint folder, one shard at a time."""
    for shard in _shards(folder):
        if shard.suffix == ".safetensors":
            from safetensors.torch import load_file

            yield from load_file(str(shard)).items()
        else:
            # weights_only: a checkpoint is data; refuse pickled code
            yield from torch.load(shard, map_location="cpu", weights_only=True).items()


def map_tensor(name: str, tensor: torch.Tensor, config: Any) -> dict[str, torch.Tensor]:
    """Returns the GLM tensors one ChatGLM3 tensor becomes (empty for the checked rotary buffer).

    Raises:
        UserError: an unknown tensor, a wrong shape, or rotary frequencies that differ from the
            GLM classes' (another rope base).
    """
    hidden, head_dim = config.hidden_size, config.head_dim
    q_dim = config.num_attention_heads * head_dim
    kv_dim = config.num_key_value_heads * head_dim
    direct = {"transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
              "transformer.encoder.final_layernorm.weight": "model.norm.weight",
              "transformer.output_layer.weight": "lm_head.weight"}
    if name in direct:
        return {direct[name]: tensor}
    if name == "transformer.rotary_pos_emb.inv_freq":
        dim = int(head_dim * 0.5)
        theta = config.rope_parameters["rope_theta"]
        expected = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        if tensor.shape != expected.shape or not torch.allclose(tensor.float(), expected,
                                                                rtol=1e-3):
            raise UserError(f"{name}: rotary frequencies differ from base {theta:g} over "
                            f"{dim} dims; set rope_ratio in config.json to the model's")
        return {}
    match = _LAYER.fullmatch(name)
    if match is None:
        raise UserError(f"ChatGLM3 checkpoint: tensor {name!r} {tuple(tensor.shape)} has no "
                        "GLM counterpart; the conversion would lose it")
    layer, rest = int(match.group(1)), match.group(2)
    prefix = f"model.layers.{layer}."
    simple = {"input_layernorm.weight": "input_layernorm.weight",
              "post_attention_layernorm.weight": "post_attention_layernorm.weight",
              "self_attention.dense.weight": "self_attn.o_proj.weight",
              "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
              "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight"}
    if rest in simple:
        return {prefix + simple[rest]: tensor}
    if rest in ("self_attention.query_key_value.weight", "self_attention.query_key_value.bias"):
        kind = rest.rsplit(".", 1)[1]
        rows = q_dim + 2 * kv_dim
        expected_shape = (rows, hidden) if kind == "weight" else (rows,)
        if tuple(tensor.shape) != expected_shape:
            raise UserError(f"{name}: shape {tuple(tensor.shape)}, expected {expected_shape} "
                            f"(query {q_dim} + key and value {kv_dim} each)")
        q, k, v = tensor.split([q_dim, kv_dim, kv_dim])
        return {f"{prefix}self_attn.{p}_proj.{kind}": t.clone()
                for p, t in (("q", q), ("k", k), ("v", v))}
    raise UserError(f"ChatGLM3 checkpoint: tensor {name!r} {tuple(tensor.shape)} has no GLM "
                    "counterpart; the conversion would lose it")


def convert_weights(source: Path, config: Any, dtype: torch.dtype | None) -> Any:
    """Returns a ``GlmForCausalLM`` holding a ChatGLM3 checkpoint's weights.

    Raises:
        UserError: a tensor without a counterpart, or a GLM tensor the checkpoint does not fill.
    """
    from transformers import GlmForCausalLM

    with torch.device("meta"):
        model = GlmForCausalLM(config)
    expected = dict(model.state_dict())
    state: dict[str, torch.Tensor] = {}
    for name, tensor in iter_tensors(source):
        for target, value in map_tensor(name, tensor, config).items():
            if target not in expected or expected[target].shape != value.shape:
                shape = None if target not in expected else tuple(expected[target].shape)
                raise UserError(f"{name} -> {target}: shape {tuple(value.shape)}, the GLM model "
                                f"expects {shape}")
            state[target] = value if dtype is None else value.to(dtype)
    unfilled = sorted(set(expected) - set(state))
    if unfilled:
        raise UserError(f"{source}: the checkpoint has no tensor for {unfilled[:5]}"
                        f"{' ...' if len(unfilled) > 5 else ''}")
    model.load_state_dict(state, strict=True, assign=True)
    # the rotary frequencies are computed, not stored: rebuild that module off the meta device
    model.model.rotary_emb = type(model.model.rotary_emb)(config)
    return model


def convert_tokenizer(model_file: Path, max_length: int) -> Any:
    """Returns ChatGLM3's tokenizer as a ``PreTrainedTokenizerFast`` (no remote code).

    Raises:
        UserError: the SentencePiece model is not BPE (ChatGLM3's is).
    """
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        raise UserError(f"{model_file}: a SentencePiece model of type "
                        f"{proto.trainer_spec.model_type}, expected BPE (ChatGLM3's)")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    normal = {p.piece for p in proto.pieces
              if p.type == sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL}
    # BPE merges in SentencePiece's order: a pair merges as early as the piece it makes ranks
    ranked = sorted((vocab[piece], vocab[piece[:k]], vocab[piece[k:]], piece[:k], piece[k:])
                    for piece in normal for k in range(1, len(piece))
                    if piece[:k] in normal and piece[k:] in normal)
    unk = proto.pieces[proto.trainer_spec.unk_id].piece
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in ranked],
                               unk_token=unk, fuse_unk=True,
                               byte_fallback=proto.trainer_spec.byte_fallback))
    spec = proto.normalizer_spec
    steps: list[Any] = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(steps)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if spec.add_dummy_prefix
                                       else []))
    controls = [p.piece for p in proto.pieces
                if p.type == sentencepiece_model_pb2.ModelProto.SentencePiece.CONTROL]
    tok.add_special_tokens(controls + list(SPECIAL_TOKENS))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    if [ids[t] for t in SPECIAL_TOKENS] != list(range(len(vocab), len(vocab) + len(ids))):
        raise UserError(f"{model_file}: special tokens did not land after the vocabulary")
    tok.post_processor = processors.TemplateProcessing(
        single=" ".join([*PREFIX, "$A"]), pair=" ".join([*PREFIX, "$A", "$B"]),
        special_tokens=[(t, ids[t]) for t in PREFIX])
    eos = proto.pieces[proto.trainer_spec.eos_id].piece if proto.trainer_spec.eos_id >= 0 else None
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk, pad_token=unk,
                                   eos_token=eos, padding_side="left",
                                   model_max_length=max_length,
                                   additional_special_tokens=list(SPECIAL_TOKENS))


def convert_chatglm3(source: Path, dest: Path,
                     dtype: Literal["float16", "bfloat16", "float32"] | None = None) -> Path:
    """Convert a ChatGLM3 checkpoint (THUDM/chatglm3-6b layout, which needs remote code) into
    transformers' built-in GLM classes and a standard fast tokenizer; returns ``dest``.

    ``AutoModel.from_pretrained(dest)`` then loads it with no remote code, and
    ``emimimic extract --text.model dest`` uses it.

    Args:
        source: folder of the ChatGLM3 checkpoint: config.json, the weight shards (*.safetensors
            or pytorch_model-*.bin) and tokenizer.model.
        dest: folder to write (must not exist).
        dtype: dtype of the written weights (default: the checkpoint's).

    Raises:
        UserError: a missing file, an existing ``dest``, or a checkpoint that does not map.
    """
    source, dest = Path(source), Path(dest)
    if dest.exists():
        raise UserError(f"{dest}: already exists; choose a new folder")
    config_file, spm = source / "config.json", source / "tokenizer.model"
    for path in (config_file, spm):
        if not path.is_file():
            raise UserError(f"{path}: not found; expected a ChatGLM3 checkpoint folder")
    raw = json.loads(config_file.read_text(encoding="utf-8"))
    config = glm_config(raw)
    torch_dtype = None if dtype is None else getattr(torch, dtype)
    model = convert_weights(source, config, torch_dtype)
    if torch_dtype is not None:
        model.config.dtype = torch_dtype
    tokenizer = convert_tokenizer(spm, int(raw.get("seq_length", 8192)))
    with atomic_path(dest) as partial:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
    return dest
