"""Hugging Face model folders (config.json + safetensors) in and out."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxswift.checkpoints.safetensors_io import iter_folder_tensors, write_safetensors
from jaxswift.errors import CheckpointError
from jaxswift.models.config import ModelConfig, config_from_hf, config_to_hf
from jaxswift.models.families import weight_maps

# Tensors some checkpoints carry that the math does not need.
_IGNORED = re.compile(r"(.*rotary_emb\.inv_freq$)")
SHARD_BYTES = 4 * 1024**3


_QUANTIZED_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx", "weight_scale", "absmax")  # GPTQ, AWQ, ...

def read_config_json(folder: str | Path) -> tuple[Path, dict]:
    """(path, parsed dict) of a Hugging Face folder's config.json, with a clear error when absent or malformed."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        return path, json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None


def read_hf_config(folder: str | Path, dtype: str | None = None) -> tuple[ModelConfig, dict]:
    path, raw = read_config_json(folder)
    return config_from_hf(raw, where=str(path), dtype=dtype), raw


def set_path(tree: dict, path: tuple[str, ...], value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def dense_leaf(tensors: dict, names: list[str], m, cfg: ModelConfig, source: str):
    """One params leaf from plain float tensors (one per layer when `m.per_layer`), in our layout and dtype; for
    loaders whose other leaves are quantized."""
    missing = [n for n in names if n not in tensors]
    if missing:
        raise CheckpointError(f"{source}: missing tensor {missing[0]!r}")
    arrays = [m.to_ours(np.asarray(tensors[n], np.float32)) for n in names]
    stacked = ((cfg.num_layers,) if m.per_layer else ()) + ((cfg.num_experts,) if m.per_expert else ())
    return jnp.asarray(np.stack(arrays).reshape(stacked + arrays[0].shape), cfg.weight_dtype)


def params_from_tensors(cfg: ModelConfig, tensors: Iterable[tuple[str, np.ndarray]], source: str,
                        shardings=None) -> dict:
    """Builds the params tree from (hf_name, array) pairs, converting one tensor at a time.

    Per-layer weights are written into one preallocated [L, ...] buffer per parameter, so peak host memory is the
    model once (in the target dtype) plus one tensor.
    """
    maps = weight_maps(cfg)
    by_name = {name: (m, index) for m in maps for name, index in m.names(cfg)}
    buffers, seen = {}, set()
    np_dtype = np.dtype(cfg.weight_dtype)
    for name, array in tensors:
        if name not in by_name:
            if _IGNORED.match(name) or (name == "lm_head.weight" and cfg.tie_word_embeddings):
                continue
            hint = (" (a quantized weight: config.json needs the quantization_config it was written with)"
                    if name.rsplit(".", 1)[-1] in _QUANTIZED_SUFFIXES else "")
            raise CheckpointError(f"{source}: unexpected tensor {name!r} for a {cfg.family} model{hint}")
        m, index = by_name[name]
        value = m.to_ours(np.asarray(array, dtype=np.float32))
        if m.path not in buffers:
            stacked = ((cfg.num_layers,) if m.per_layer else ()) + ((cfg.num_experts,) if m.per_expert else ())
            buffers[m.path] = np.empty(stacked + value.shape, np_dtype)
        target = buffers[m.path][index]
        if target.shape != value.shape:
            raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(array.shape)}, which does not fit "
                                  f"the config (expected {tuple(m.to_hf(np.zeros(target.shape)).shape)})")
        target[...] = value
        seen.add(name)
    missing = sorted(set(by_name) - seen)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{source}: missing tensors {', '.join(missing[:3])}{more}")
    params = {}
    for path, buffer in buffers.items():
        set_path(params, path, buffer)
    if shardings is None:
        return jax.tree.map(jnp.asarray, params)
    return jax.tree.map(jax.device_put, params, shardings)


def load_hf_params(folder: str | Path, cfg: ModelConfig, shardings=None) -> dict:
    folder = Path(folder)
    tensors = ((name, arr) for name, arr, _ in iter_folder_tensors(folder))
    return params_from_tensors(cfg, tensors, str(folder), shardings)


def hf_tensors(params: dict, cfg: ModelConfig, dtype=None) -> dict[str, np.ndarray]:
    """params -> {hf_name: numpy array in torch layout}."""
    out = {}
    for m in weight_maps(cfg):
        node = params
        for key in m.path:
            node = node[key]
        array = np.asarray(jax.device_get(node))
        if dtype is not None:
            array = array.astype(dtype)
        for name, index in m.names(cfg):
            out[name] = np.ascontiguousarray(m.to_hf(array[index]))
    return out


def _shards(tensors: dict[str, np.ndarray], max_bytes: int) -> list[dict[str, np.ndarray]]:
    shards, current, size = [], {}, 0
    for name, arr in tensors.items():
        if current and size + arr.nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = arr
        size += arr.nbytes
    return shards + [current]


def save_hf(params: dict, cfg: ModelConfig, out_dir: str | Path, *, tokenizer=None,
            max_shard_bytes: int = SHARD_BYTES) -> Path:
    """Writes config.json, safetensors (sharded with an index past max_shard_bytes) and the tokenizer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = hf_tensors(params, cfg)
    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        write_safetensors(out / "model.safetensors", shards[0], {"format": "pt"})
    else:
        weight_map = {}
        for k, shard in enumerate(shards):
            name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(out / name, shard, {"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2))
    generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_ids) or None}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
