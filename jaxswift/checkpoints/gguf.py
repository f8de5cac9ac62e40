"""Read a GGUF file (llama.cpp's format) as a Hugging Face config, float32 tensors in HF naming, and a tokenizer.

Only numpy and `gguf` run here; weights are dequantized one tensor at a time so a model never sits in memory
twice. Everything that can be wrong with a file is checked in `read_gguf`, before any tensor is touched.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import dequantize

from jaxswift.checkpoints.gguf_tokenizer import tokenizer_from_gguf
from jaxswift.errors import CheckpointError

Q = GGMLQuantizationType
# Types `gguf.quants.dequantize` really implements (gguf 0.19 has no Q8_K/Q8_1); each one is tested.
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
                   Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)


@dataclasses.dataclass(frozen=True)
class _Family:
    architecture: str  # HF `architectures[0]`
    model_type: str
    permuted_qk: bool  # llama.cpp reorders q/k rows for its interleaved ("normal") RoPE kernel


# GGUF `general.architecture` -> HF family. Mistral-style files are written as "llama".
FAMILIES = {
    "llama": _Family("LlamaForCausalLM", "llama", permuted_qk=True),
    "qwen2": _Family("Qwen2ForCausalLM", "qwen2", permuted_qk=False),
    "qwen3": _Family("Qwen3ForCausalLM", "qwen3", permuted_qk=False),
}

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_ROPE_FREQS = "rope_freqs.weight"  # Llama 3 per-frequency RoPE factors; folded into hf_config["rope_scaling"]
PERMUTED_QK_ARCHITECTURES = tuple(arch for arch, family in FAMILIES.items() if family.permuted_qk)
_HF_TO_GGUF = {**{hf: gguf for gguf, hf in _GLOBAL_NAMES.items()},
               **{f"model.layers.{{}}.{hf}": f"blk.{{}}.{gguf}" for gguf, hf in _LAYER_NAMES.items()}}


@dataclasses.dataclass(frozen=True)
class GGUFCheckpoint:
    path: Path
    hf_config: dict
    _reader: GGUFReader = dataclasses.field(repr=False, compare=False)
    _family: _Family = dataclasses.field(repr=False)

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yields (HF name, float32 array in torch layout), dequantizing lazily, in file order."""
        for tensor in self._reader.tensors:
            hf_name = hf_tensor_name(tensor.name)
            if hf_name is not None:
                yield hf_name, self._to_hf_layout(tensor, _dequantize(tensor))

    def tokenizer(self):
        """A transformers fast tokenizer built from the file's own tokenizer metadata (vocabulary, merges, special
        and added tokens, chat template); see gguf_tokenizer.py. Needs no torch."""
        return tokenizer_from_gguf(self._reader, self.path, _meta)

    def _to_hf_layout(self, tensor, array: np.ndarray) -> np.ndarray:
        """Undoes the q/k row permutation llama.cpp applies to `llama` files (weights and biases)."""
        if self._family.permuted_qk and re.search(r"\.attn_[qk]\.", tensor.name):
            key = "num_attention_heads" if ".attn_q." in tensor.name else "num_key_value_heads"
            array = unpermute_rope_rows(array, self.hf_config[key])
        return array


def read_gguf(path) -> GGUFCheckpoint:
    """Opens and validates a GGUF file; raises a one-line CheckpointError naming the file if it cannot be used."""
    path = Path(path)
    reader = _open_reader(path)
    family = _family_of(reader, path)
    _check_tensors(reader, path)
    return GGUFCheckpoint(path, _hf_config(reader, family, path), reader, family)


def hf_tensor_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None for tensors HF has no twin of."""
    if gguf_name == _ROPE_FREQS:
        return None
    stem, _, kind = gguf_name.rpartition(".")
    if kind not in ("weight", "bias"):
        return None
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{kind}"
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
    if match and match[2] in _LAYER_NAMES:
        return f"model.layers.{match[1]}.{_LAYER_NAMES[match[2]]}.{kind}"
    return None


def gguf_tensor_name(hf_name: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`: the inverse of hf_tensor_name."""
    stem, _, kind = hf_name.rpartition(".")
    layer = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", stem)
    key = f"model.layers.{{}}.{layer[2]}" if layer else stem
    if kind not in ("weight", "bias") or key not in _HF_TO_GGUF:
        raise CheckpointError(f"tensor {hf_name!r} has no GGUF name that jaxswift knows")
    return f"{_HF_TO_GGUF[key].format(layer[1]) if layer else _HF_TO_GGUF[key]}.{kind}"


def llama3_rope_factors(scaling: dict, theta: float, head_dim: int) -> np.ndarray:
    """The float32 `rope_freqs.weight` llama.cpp writes for a Llama 3 `rope_scaling` (read back by _llama3_scaling)."""
    wavelens = 2 * math.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    return _llama3_factors(scaling, wavelens).astype(np.float32)


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation.

    HF stores each head's rows as [first rotary half | second half]; llama.cpp's converter interleaves them
    (row pairs (i, i + head_dim/2) become adjacent) so its RoPE kernel can rotate neighbouring elements.
    Reading rows as (head, head_dim/2, pair) and swapping those two inner axes restores HF's order. Works for
    weights (rows, in) and biases (rows,) alike; the converter permutes both.
    """
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _open_reader(path: Path) -> GGUFReader:
    if not path.exists():
        raise CheckpointError(f"{path}: no such GGUF file")
    if not path.is_file():
        raise CheckpointError(f"{path}: is a folder, not a GGUF file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        return GGUFReader(path)
    except Exception as e:  # the reader fails with ValueError/IndexError/... on truncated or corrupt files
        raise CheckpointError(f"{path}: truncated or corrupt GGUF file ({_one_line(e)})") from e


def _family_of(reader: GGUFReader, path: Path) -> _Family:
    arch = _meta(reader, "general.architecture")
    if arch not in FAMILIES:
        raise CheckpointError(
            f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(FAMILIES)})")
    return FAMILIES[arch]


def _check_tensors(reader: GGUFReader, path: Path) -> None:
    """Fails on the first tensor jaxswift cannot dequantize or name, before any dequantization work."""
    for tensor in reader.tensors:
        if tensor.tensor_type not in SUPPORTED_TYPES:
            supported = ", ".join(t.name for t in SUPPORTED_TYPES)
            raise CheckpointError(
                f"{path}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, which jaxswift cannot "
                f"dequantize (supported: {supported})")
        if tensor.name != _ROPE_FREQS and hf_tensor_name(tensor.name) is None:
            raise CheckpointError(
                f"{path}: tensor {tensor.name!r} has no Hugging Face counterpart that jaxswift knows; "
                f"is this a {_meta(reader, 'general.architecture')} text model?")


def _hf_config(reader: GGUFReader, family: _Family, path: Path) -> dict:
    arch = _meta(reader, "general.architecture")

    def hparam(key, default=None):
        value = _meta(reader, f"{arch}.{key}", default)
        if value is None:
            raise CheckpointError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return value

    names = {t.name for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise CheckpointError(f"{path}: GGUF file has no tensor 'token_embd.weight'")
    hidden, heads = hparam("embedding_length"), hparam("attention.head_count")
    head_dim = hparam("attention.key_length", hidden // heads)
    if hparam("rope.dimension_count", head_dim) != head_dim:
        raise CheckpointError(f"{path}: partial RoPE (rope.dimension_count != head_dim) is not supported")
    rope_theta = float(hparam("rope.freq_base", 10000.0))
    config = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "vocab_size": int(_tensor_by_name(reader, "token_embd.weight").shape[1]),  # GGUF lists dims innermost first
        "hidden_size": hidden,
        "intermediate_size": hparam("feed_forward_length"),
        "num_hidden_layers": hparam("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": hparam("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": hparam("attention.layer_norm_rms_epsilon", 1e-6),
        "max_position_embeddings": hparam("context_length"),
        "rope_theta": rope_theta,
        "rope_scaling": _rope_scaling(reader, arch, rope_theta, head_dim, path),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _meta(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _meta(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _meta(reader, "tokenizer.ggml.padding_token_id"),
    }
    if family.model_type != "qwen2":  # Qwen2 always has q/k/v biases and its config has no such key
        config["attention_bias"] = "blk.0.attn_q.bias" in names
    return config


def _rope_scaling(reader: GGUFReader, arch: str, theta: float, head_dim: int, path: Path) -> dict | None:
    """HF `rope_scaling` from metadata (linear, yarn) or from Llama 3's `rope_freqs` tensor."""
    kind = _meta(reader, f"{arch}.rope.scaling.type")
    factor = _meta(reader, f"{arch}.rope.scaling.factor")
    if kind == "linear" and factor:
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn" and factor:
        original = _meta(reader, f"{arch}.rope.scaling.original_context_length")
        return {"rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": original}
    if kind not in (None, "none", "linear", "yarn"):
        raise CheckpointError(f"{path}: RoPE scaling type {kind!r} is not supported (supported: linear, yarn)")
    freqs = _tensor_by_name(reader, _ROPE_FREQS)
    return None if freqs is None else _llama3_scaling(dequantize(freqs.data, freqs.tensor_type), theta, head_dim, path)


def _llama3_scaling(factors: np.ndarray, theta: float, head_dim: int, path: Path) -> dict | None:
    """Recovers Llama 3 `rope_scaling` from llama.cpp's per-frequency divisors.

    The converter stores only the divisors. Assuming Meta's low/high frequency factors (1, 4), the blend region
    pins `original_max_position_embeddings`; the result is accepted only if it regenerates the stored divisors,
    so whatever we return gives the same rotary frequencies.
    """
    factors = np.asarray(factors, dtype=np.float64).reshape(-1)
    if np.allclose(factors, 1.0):
        return None
    factor = float(factors.max())
    wavelens = 2 * math.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    blended = (factors > 1.0 + 1e-6) & (factors < factor - 1e-6)
    original = 8192.0  # what llama.cpp's converter assumes when the HF config does not say
    if blended.any():  # divisor 1/((1-s)/factor + s), s = (original/wavelen - 1)/3
        smooth = (1 / factors[blended] - 1 / factor) / (1 - 1 / factor)
        original = float(np.median((3 * smooth + 1) * wavelens[blended]))
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": int(round(original))}
    if factors.shape != wavelens.shape or not np.allclose(_llama3_factors(scaling, wavelens), factors, rtol=1e-4):
        raise CheckpointError(f"{path}: tensor 'rope_freqs.weight' does not match Llama 3 RoPE scaling")
    return scaling


def _llama3_factors(scaling: dict, wavelens: np.ndarray) -> np.ndarray:
    """The divisors llama.cpp's converter writes for a Llama 3 `rope_scaling`."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    smooth = np.clip((original / wavelens - low) / (high - low), 0.0, 1.0)
    return 1 / ((1 - smooth) / factor + smooth)


def _dequantize(tensor) -> np.ndarray:
    """Dequantizes one tensor to a fresh float32 array in torch layout (GGUF lists dims innermost first)."""
    shape = tuple(int(d) for d in reversed(tensor.shape))
    return np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)


def _tensor_by_name(reader: GGUFReader, name: str):
    return next((t for t in reader.tensors if t.name == name), None)


def _meta(reader: GGUFReader, key: str, default: Any = None) -> Any:
    """A metadata value as a Python scalar/str/list; float32 values are widened to their shortest decimal,
    so an epsilon written as 1e-5 reads back as 1e-5 and not 9.999999747e-06."""
    field = reader.get_field(key)
    if field is None:
        return default
    value = field.contents()
    if field.types and field.types[0] == GGUFValueType.FLOAT32:
        value = float(str(np.float32(value)))
    return value


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__
