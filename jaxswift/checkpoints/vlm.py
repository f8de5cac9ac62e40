"""Vision-language HF folders (config.json + safetensors + processor files) in and out.

The LLM's tensors go through the text loader (checkpoints/hf.py) under their text names; the tower's and the
aligner's through models/vlm_families.py. Processor files (preprocessor_config.json, chat_template, tokenizer)
are copied on save, so transformers' AutoProcessor loads the written folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxswift.checkpoints.hf import hf_tensors, params_from_tensors, read_config_json, set_path
from jaxswift.checkpoints.safetensors_io import iter_folder_tensors, write_safetensors
from jaxswift.errors import CheckpointError
from jaxswift.models.vision import VLMConfig
from jaxswift.models.vlm_families import (any_vlm_config_from_hf, any_vlm_config_to_hf, canonical_name,
                                          is_any_vlm_config, text_name, vlm_text_prefix, vlm_weight_maps)

PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
                   "chat_template.json", "chat_template.jinja", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "generation_config.json")


def read_vlm_config(folder: str | Path, dtype: str | None = None) -> VLMConfig | None:
    """The folder's VLMConfig, or None when config.json describes a text-only model."""
    path, raw = read_config_json(folder)
    return any_vlm_config_from_hf(raw, where=str(path), dtype=dtype) if is_any_vlm_config(raw) else None


def _vision_names(cfg: VLMConfig):
    """{hf name: (WeightMap, layer index or None)}."""
    out = {}
    for m in vlm_weight_maps(cfg):
        for i in (range(cfg.vision.depth) if m.per_layer else [None]):
            out[m.hf_name.format(i=i)] = (m, i)
    return out


def load_vlm_params(folder: str | Path, cfg: VLMConfig) -> dict:
    folder = Path(folder)
    by_name = _vision_names(cfg)
    vision: dict = {}
    prefix = vlm_text_prefix(cfg)

    def text_tensors():
        for raw_name, array, _ in iter_folder_tensors(folder):
            name = canonical_name(raw_name, cfg.family)
            if name in by_name:
                m, i = by_name[name]
                value = m.to_ours(np.asarray(array, np.float32))
                vision.setdefault(m.path, {})[i] = value
            elif text_name(name, prefix) is not None:
                yield text_name(name, prefix), array
            else:
                raise CheckpointError(f"{folder}: unexpected tensor {raw_name!r} for a {cfg.family} model")

    llm = params_from_tensors(cfg.text, text_tensors(), str(folder))
    params = {"llm": llm}
    missing = [name for name, (m, i) in by_name.items() if i not in vision.get(m.path, {})]
    if missing:
        raise CheckpointError(f"{folder}: missing tensor {missing[0]!r}" + (
            f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    for path, parts in vision.items():
        value = np.stack([parts[i] for i in range(cfg.vision.depth)]) if None not in parts else parts[None]
        set_path(params, path, jnp.asarray(value, cfg.text.weight_dtype))
    return params


def vlm_hf_tensors(params: dict, cfg: VLMConfig) -> dict[str, np.ndarray]:
    prefix = vlm_text_prefix(cfg)
    out = {(prefix + n[len("model."):] if n.startswith("model.") else n): a
           for n, a in hf_tensors(params["llm"], cfg.text).items()}
    return out | part_hf_tensors(params, cfg, ("vision", "aligner"))


def part_hf_tensors(params: dict, cfg: VLMConfig, parts: tuple[str, ...]) -> dict[str, np.ndarray]:
    """{HF name: torch-layout array} of the tower's / the aligner's tensors (`parts` of "vision", "aligner")."""
    out = {}
    for name, (m, i) in _vision_names(cfg).items():
        if m.path[0] in parts:
            node = params
            for key in m.path:
                node = node[key]
            array = np.asarray(jax.device_get(node))
            out[name] = np.ascontiguousarray(m.to_hf(array if i is None else array[i]))
    return out


def vision_weight_of(name: str, cfg: VLMConfig):
    """(WeightMap, layer index or None) of a tower / aligner tensor's HF name; None for any other name."""
    return _vision_names(cfg).get(canonical_name(name, cfg.family))


def save_vlm(params: dict, cfg: VLMConfig, out_dir: str | Path, *, source: str | Path | None = None) -> Path:
    """config.json + model.safetensors that transformers loads; processor and tokenizer files copied from source."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "model.safetensors", vlm_hf_tensors(params, cfg), {"format": "pt"})
    (out / "config.json").write_text(json.dumps(any_vlm_config_to_hf(cfg), indent=2))
    if source is not None and Path(source).resolve() != out.resolve():
        for name in PROCESSOR_FILES:
            if (Path(source) / name).is_file():
                shutil.copy(Path(source) / name, out / name)
    return out
