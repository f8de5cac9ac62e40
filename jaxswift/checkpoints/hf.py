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
from jaxswift.models.config import ARCHITECTURES, FAMILY_ARCHITECTURE, ModelConfig, config_from_hf, config_to_hf
from jaxswift.models.families import weight_maps
from jaxswift.models.heads import ClassifierHead, make_head

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
    """(config, raw dict). A sequence-classification folder gives its decoder's config (see `seq_cls_body`)."""
    path, raw = read_config_json(folder)
    if is_seq_cls_config(raw):
        return seq_cls_body(config_from_hf(_as_causal_lm(raw), where=str(path), dtype=dtype)), raw
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
    _write_tensors(out, hf_tensors(params, cfg), max_shard_bytes)
    (out / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2))
    generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_ids) or None}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def _write_tensors(out: Path, tensors: dict[str, np.ndarray], max_shard_bytes: int) -> None:
    """model.safetensors, or shards with an index past max_shard_bytes."""
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


# ------------------------------------------------------------------------------ sequence classification folders
# transformers' `XxxForSequenceClassification`: the decoder's weights (`model.*`), no lm_head, and `score.weight`
# [C, D]; config.json adds num_labels (through id2label), problem_type and pad_token_id.

SEQ_CLS_ARCHITECTURES = {arch.replace("ForCausalLM", "ForSequenceClassification"): arch for arch in ARCHITECTURES}
SCORE_WEIGHT = "score.weight"


def is_seq_cls_config(raw: dict) -> bool:
    return any(a in SEQ_CLS_ARCHITECTURES for a in raw.get("architectures") or [])


def _as_causal_lm(raw: dict) -> dict:
    return {**raw, "architectures": [SEQ_CLS_ARCHITECTURES.get(a, a) for a in raw["architectures"]]}


def seq_cls_body(cfg: ModelConfig) -> ModelConfig:
    """The decoder of a classifier: no lm_head leaf (stated as tied embeddings, so no weight map expects one)."""
    return cfg.replace(tie_word_embeddings=True)


def classifier_head_from_hf(raw: dict, where: str) -> ClassifierHead:
    """The head a sequence-classification config.json describes (transformers' defaults where a key is absent)."""
    id2label = raw.get("id2label") or {}
    num_labels = int(raw.get("num_labels") or len(id2label) or 2)
    if id2label and len(id2label) != num_labels:
        raise CheckpointError(f"{where}: num_labels {num_labels} but id2label names {len(id2label)} labels")
    try:
        labels = tuple(str(id2label[k]) for k in sorted(id2label, key=int)) if id2label else None
    except ValueError:
        raise CheckpointError(f"{where}: id2label keys must be class indices, got {sorted(id2label)}") from None
    if raw.get("pad_token_id") is None:
        raise CheckpointError(f"{where}: a sequence classifier needs pad_token_id (its logits are read at the last "
                              "token that is not padding)")
    try:
        return make_head(num_labels, raw.get("problem_type"), int(raw["pad_token_id"]), labels)
    except Exception as e:  # ConfigError from make_head: name the file
        raise CheckpointError(f"{where}: {e}") from None


def load_seq_cls_params(folder: str | Path, cfg: ModelConfig, head: ClassifierHead, shardings=None) -> dict:
    """The decoder params (cfg from `read_hf_config`) plus params["score"] [D, C] of a classification folder."""
    folder = Path(folder)
    score = []

    def body():
        for name, array, _ in iter_folder_tensors(folder):
            if name == SCORE_WEIGHT:
                score.append(np.asarray(array, np.float32))
            elif name != "lm_head.weight":  # a classifier never reads one; some converted folders keep it
                yield name, array

    params = params_from_tensors(cfg, body(), str(folder), shardings)
    if not score:
        raise CheckpointError(f"{folder}: no {SCORE_WEIGHT!r} tensor (a sequence-classification folder has one)")
    if score[0].shape != (head.num_labels, cfg.hidden_size):
        raise CheckpointError(f"{folder}: {SCORE_WEIGHT} has shape {score[0].shape}, expected "
                              f"({head.num_labels}, {cfg.hidden_size}) for num_labels {head.num_labels}")
    return {**params, "score": jnp.asarray(score[0].T, cfg.weight_dtype)}


def classifier_config(cfg: ModelConfig, head: ClassifierHead) -> dict:
    """config.json of a classifier folder: the decoder's keys with the XxxForSequenceClassification architecture."""
    d = config_to_hf(cfg)
    d.update(architectures=[FAMILY_ARCHITECTURE[cfg.family].replace("ForCausalLM", "ForSequenceClassification")],
             num_labels=head.num_labels, problem_type=head.problem_type, pad_token_id=head.pad_token_id,
             id2label={str(i): name for i, name in enumerate(head.labels)},
             label2id={name: i for i, name in enumerate(head.labels)})
    return d


def save_seq_cls(params: dict, cfg: ModelConfig, head: ClassifierHead, out_dir: str | Path, *,
                 tokenizer=None, max_shard_bytes: int = SHARD_BYTES) -> Path:
    """A folder `AutoModelForSequenceClassification.from_pretrained` loads: the decoder, `score.weight`, config."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    body_cfg = seq_cls_body(cfg)
    body = {k: v for k, v in params.items() if k not in ("score", "lm_head")}
    score_CD = np.asarray(jax.device_get(params["score"])).T
    _write_tensors(out, {**hf_tensors(body, body_cfg), SCORE_WEIGHT: np.ascontiguousarray(score_CD)},
                   max_shard_bytes)
    (out / "config.json").write_text(json.dumps(classifier_config(body_cfg, head), indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
