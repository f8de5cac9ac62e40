"""Write a model as a GGUF file (llama.cpp's format), the mirror of gguf.py.

Names, metadata keys and the q/k row permutation are the ones gguf.py reads back, so `read_gguf(save_gguf(m))`
returns m's weights (dequantized). The file is written with the `gguf` package's GGUFWriter; block formats come from
`gguf.quants.quantize`, and Q4_K / Q6_K (which it cannot write) from gguf_kquants.py. Which tensors get which type
follows llama.cpp (see `tensor_type`).

Types, named as llama.cpp names them:
  f16    every matrix float16 (convert_hf_to_gguf.py --outtype f16);
  q8_0   every matrix Q8_0 (convert_hf_to_gguf.py --outtype q8_0);
  q4_0   every matrix Q4_0, except the output head (or the tied embedding serving as the head): Q6_K, as
         llama-quantize keeps it;
  q4_k_m llama-quantize's Q4_K_M mix (llama_tensor_get_type): Q4_K, except the head Q6_K and attn_v / ffn_down Q6_K
         in the layers its `use_more_bits` picks (the first and last eighth, and every third layer between).
Vectors (norms, biases, Llama 3 RoPE factors) are always float32, as llama.cpp keeps them. A matrix whose rows are
not a whole number of blocks falls back as llama.cpp does: Q4_K -> Q5_0, Q6_K -> Q8_0 (a head whose rows are not
whole Q4_0 blocks -> Q8_0), and f16 where even that does not fit (convert_hf_to_gguf.py's choice for q8_0 / q4_0).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, RopeScalingType, TokenType
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import quantize

from jaxswift.checkpoints.gguf import PERMUTED_QK_ARCHITECTURES, gguf_tensor_name, llama3_rope_factors
from jaxswift.checkpoints.gguf_kquants import quantize_q4_k, quantize_q6_k
from jaxswift.checkpoints.gguf_tokenizer import PRE_TOKENIZER_SPLITS
from jaxswift.checkpoints.hf import hf_tensors
from jaxswift.errors import ConfigError
from jaxswift.models.config import ModelConfig

Q = GGMLQuantizationType
# --gguf_type -> (matrix type, general.file_type)
GGUF_TYPES = {
    "f16": (Q.F16, LlamaFileType.MOSTLY_F16),
    "q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "q4_k_m": (Q.Q4_K, LlamaFileType.MOSTLY_Q4_K_M),
}
LLAMA_QUANTIZE_TYPES = ("q4_0", "q4_k_m")  # llama-quantize's types (head and per-layer rules); the others convert's
# llama.cpp's tensor_type_fallback: a row that is not whole blocks of the k-quant takes this 32-value type
K_FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q6_K: Q.Q8_0}
# jaxswift family -> GGUF general.architecture. Mistral is a llama with another name in llama.cpp.
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def check_gguf_type(gguf_type: str) -> None:
    """Raises a ConfigError unless jaxswift writes `gguf_type` (checked before a model is even loaded)."""
    if gguf_type not in GGUF_TYPES:
        raise ConfigError(f"--gguf_type {gguf_type!r} is not a GGUF type jaxswift writes "
                          f"(supported: {', '.join(GGUF_TYPES)})")


def check_gguf_export(cfg: ModelConfig, gguf_type: str, tokenizer) -> None:
    """Raises a ConfigError naming what cannot be exported, before any tensor is converted."""
    check_gguf_type(gguf_type)
    if cfg.family not in ARCHITECTURES:
        moe = " (GGUF export of mixture-of-experts models is not implemented)" if cfg.is_moe else ""
        raise ConfigError(f"--to_gguf: family {cfg.family!r} has no GGUF export{moe} "
                          f"(supported: {', '.join(ARCHITECTURES)})")
    if any(cfg.window_per_layer):
        raise ConfigError(f"--to_gguf: {cfg.family} with sliding-window attention cannot be written as GGUF "
                          f"'{ARCHITECTURES[cfg.family]}', which has no sliding window (the file would attend further)")
    if cfg.rope.type not in ("default", "linear", "llama3"):
        raise ConfigError(f"--to_gguf: RoPE scaling {cfg.rope.type!r} is not exported (supported: default, "
                          "linear, llama3)")
    if cfg.rope.type == "llama3" and (cfg.rope.low_freq_factor, cfg.rope.high_freq_factor) != (1.0, 4.0):
        raise ConfigError("--to_gguf: llama3 RoPE scaling is exported only with Meta's low/high frequency factors "
                          f"(1, 4); this model has ({cfg.rope.low_freq_factor}, {cfg.rope.high_freq_factor})")
    if tokenizer is None:
        raise ConfigError("--to_gguf: the model has no tokenizer, and a GGUF file carries one")
    _tokenizer_model(tokenizer)  # raises on a tokenizer GGUF's gpt2 model cannot hold


def save_gguf(model, path: str | Path, gguf_type: str = "f16") -> Path:
    """Writes `model` (a jaxswift Model: params, config, tokenizer) as one GGUF file at `path`."""
    cfg, tokenizer = model.config, model.tokenizer
    check_gguf_export(cfg, gguf_type, tokenizer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arch = ARCHITECTURES[cfg.family]
    writer = GGUFWriter(path, arch)
    _add_hyperparameters(writer, cfg, arch, GGUF_TYPES[gguf_type][1])
    _add_tokenizer(writer, tokenizer, cfg)
    for name, array in _gguf_tensors(model.params, cfg, arch):
        qtype = tensor_type(name, array.shape, gguf_type, cfg.tie_word_embeddings, cfg.num_layers)
        writer.add_tensor(name, quantize_tensor(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tensor_type(name: str, shape: tuple[int, ...], gguf_type: str, tied: bool,
                num_layers: int) -> GGMLQuantizationType:
    """The GGUF type of one tensor (shape in torch layout, rows first) for --gguf_type (see the module doc)."""
    qtype = GGUF_TYPES[gguf_type][0]
    if len(shape) < 2:
        return Q.F32
    if gguf_type in LLAMA_QUANTIZE_TYPES:
        if name == "output.weight" or (tied and name == "token_embd.weight"):
            qtype = Q.Q6_K if shape[-1] % GGML_QUANT_SIZES[qtype][0] == 0 else Q.Q8_0
        elif gguf_type == "q4_k_m":
            qtype = _q4_k_m_layer_type(name, num_layers)
    if shape[-1] % GGML_QUANT_SIZES[qtype][0] and qtype in K_FALLBACK:
        qtype = K_FALLBACK[qtype]
    return qtype if shape[-1] % GGML_QUANT_SIZES[qtype][0] == 0 else Q.F16


def _q4_k_m_layer_type(name: str, num_layers: int) -> GGMLQuantizationType:
    """llama_tensor_get_type for LLAMA_FTYPE_MOSTLY_Q4_K_M (dense models): attn_v and ffn_down get Q6_K where
    use_more_bits says so. llama.cpp also gives a 70B model's (80 layers) other attn_v Q5_K; jaxswift cannot write
    Q5_K and gives them Q6_K (more bits, never fewer)."""
    match = re.fullmatch(r"blk\.(\d+)\.(attn_v|ffn_down)\.weight", name)
    if match is None:
        return Q.Q4_K
    layer = int(match.group(1))
    more_bits = (layer < num_layers // 8 or layer >= 7 * num_layers // 8
                 or (layer - num_layers // 8) % 3 == 2)
    if more_bits or (match.group(2) == "attn_v" and num_layers == 80):
        return Q.Q6_K
    return Q.Q4_K


def quantize_tensor(array: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """The tensor's bytes (or float16 / float32 values) in `qtype`: gguf's quantizers, and ours for Q4_K / Q6_K."""
    if qtype == Q.Q4_K:
        return quantize_q4_k(array)
    if qtype == Q.Q6_K:
        return quantize_q6_k(array)
    return quantize(array, qtype)


def _gguf_tensors(params: dict, cfg: ModelConfig, arch: str):
    """(GGUF name, float32 array) in file order: llama files get llama.cpp's interleaved q/k rows."""
    if cfg.rope.type == "llama3":
        yield "rope_freqs.weight", llama3_rope_factors(_rope_dict(cfg), cfg.rope.theta, cfg.head_dim)
    for hf_name, array in hf_tensors(params, cfg, dtype=np.float32).items():
        name = gguf_tensor_name(hf_name)
        if arch in PERMUTED_QK_ARCHITECTURES and re.search(r"\.attn_[qk]\.", name):
            heads = cfg.num_heads if ".attn_q." in name else cfg.num_kv_heads
            array = permute_rope_rows(array, heads)
        yield name, np.ascontiguousarray(array)


def permute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order: each head's rows (i, i + head_dim/2) become neighbours. The inverse of
    gguf.unpermute_rope_rows (weights and biases alike)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_dict(cfg: ModelConfig) -> dict:
    return {"factor": cfg.rope.factor, "low_freq_factor": cfg.rope.low_freq_factor,
            "high_freq_factor": cfg.rope.high_freq_factor,
            "original_max_position_embeddings": cfg.rope.original_max_position_embeddings}


def _add_hyperparameters(writer: GGUFWriter, cfg: ModelConfig, arch: str, file_type: LlamaFileType) -> None:
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(2)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_key_length(cfg.head_dim)  # needed where head_dim != hidden / heads (Qwen3)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope.theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    if cfg.rope.type == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(cfg.rope.factor)


# ------------------------------------------------------------------------------------------------ tokenizer


def _tokenizer_model(tokenizer) -> dict:
    """The tokenizer's backend as tokenizer.json's dict, checked to be byte-level BPE (GGUF's `gpt2` model)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = json.loads(backend.to_str()) if backend is not None else {}
    model = state.get("model") or {}
    byte_level = "ByteLevel" in json.dumps(state.get("pre_tokenizer"))
    if model.get("type") != "BPE" or not byte_level:
        raise ConfigError("--to_gguf: only byte-level BPE tokenizers (Llama 3, SmolLM2, Qwen2/3; GGUF model "
                          f"'gpt2') are exported; this one is {model.get('type', type(tokenizer).__name__)!r} "
                          f"{'byte-level' if byte_level else 'without a byte-level pre-tokenizer'}")
    return state


def _pre_type(state: dict) -> str:
    """tokenizer.ggml.pre: the llama.cpp name of the regex that cuts text into words (gpt2's own if none)."""
    text = json.dumps(state.get("pre_tokenizer"))
    names = {"llama-bpe": PRE_TOKENIZER_SPLITS["llama-bpe"], "qwen2": PRE_TOKENIZER_SPLITS["qwen2"]}
    for name, split in names.items():
        if json.dumps(split)[1:-1] in text:
            return name
    return "gpt2"


def _add_tokenizer(writer: GGUFWriter, tokenizer, cfg: ModelConfig) -> None:
    """tokenizer.ggml.*: tokens by id, their types (control = special added, user-defined = other added, unused =
    padding rows of the embedding), merges, special ids, add_bos/eos, and the chat template."""
    state = _tokenizer_model(tokenizer)
    n = len(tokenizer)
    if n > cfg.vocab_size:
        raise ConfigError(f"--to_gguf: the tokenizer has {n} tokens but the embedding only {cfg.vocab_size} rows")
    added = {a["id"]: a for a in state.get("added_tokens", [])}
    tokens, types = [], []
    for index, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(n)))):
        kind = TokenType.NORMAL
        if index in added:
            kind = TokenType.CONTROL if added[index]["special"] else TokenType.USER_DEFINED
        tokens.append(token if token is not None else f"[PAD{index}]")
        types.append(kind if token is not None else TokenType.UNUSED)
    for index in range(n, cfg.vocab_size):  # llama.cpp names the embedding's spare rows the same way
        tokens.append(f"[PAD{index}]")
        types.append(TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_type(state))
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)
    _add_special_ids(writer, tokenizer, cfg)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _add_special_ids(writer: GGUFWriter, tokenizer, cfg: ModelConfig) -> None:
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else cfg.bos_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else (
        cfg.eos_token_ids[0] if cfg.eos_token_ids else None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else cfg.pad_token_id
    for add, token_id in ((writer.add_bos_token_id, bos), (writer.add_eos_token_id, eos),
                          (writer.add_unk_token_id, tokenizer.unk_token_id), (writer.add_pad_token_id, pad)):
        if token_id is not None:
            add(int(token_id))
    # What the tokenizer really does to a text, rather than a flag it may not have: ids it adds around "a".
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    marked = tokenizer("a", add_special_tokens=True)["input_ids"]
    writer.add_add_bos_token(bool(len(marked) > len(plain) and bos is not None and marked[0] == bos))
    writer.add_add_eos_token(bool(len(marked) > len(plain) and eos is not None and marked[-1] == eos))
