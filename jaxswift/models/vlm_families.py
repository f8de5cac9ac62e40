"""Hugging Face weight names <-> the vision-language params tree ({"vision", "aligner", "llm"}; models/vision.py).

The LLM part reuses the text families' map (models/families.py) under the VLM's prefix; the tower and the aligner
have their own entries here, each with its layout change (torch Linear (out, in) -> ours (in, out)).
The `any_*` / `vlm_*` functions at the end dispatch between Qwen2-VL / Qwen2.5-VL (here and models/vision.py) and
the ViT families llava / idefics3 / smolvlm (models/vit_families.py).
"""

from __future__ import annotations

import re

from jaxswift.models.families import WeightMap
from jaxswift.models.vision import (VisionConfig, VLMConfig, aligner_specs, is_vlm_config, vision_specs,
                                    vlm_config_from_hf, vlm_config_to_hf)
from jaxswift.models.vit import ViTConfig
from jaxswift.models.vit_families import (PREFIXES, canonical_vit_name, is_vit_vlm_config, vit_vlm_config_from_hf,
                                          vit_vlm_config_to_hf, vit_weight_maps)

# transformers >= 5 writes model.language_model.* / model.visual.*; checkpoints from before write model.* / visual.*
TEXT_PREFIX, VISION_PREFIX = "model.language_model.", "model.visual."
_LEGACY = ((re.compile(r"^visual\."), VISION_PREFIX),
           (re.compile(r"^model\.(?!language_model\.|visual\.)"), TEXT_PREFIX))


def canonical_name(name: str, family: str | None = None) -> str:
    if family in PREFIXES:
        return canonical_vit_name(name, family)
    for pattern, prefix in _LEGACY:
        if pattern.match(name):
            return pattern.sub(prefix, name, count=1)
    return name


def text_name(name: str, prefix: str = TEXT_PREFIX) -> str | None:
    """The text-family name (model.layers.0...) of a canonical VLM tensor name; None for vision tensors."""
    if name.startswith(prefix):
        return "model." + name[len(prefix):]
    if name == "lm_head.weight":
        return name
    return None


def _t(w):
    return w.T


def vision_weight_maps(v: VisionConfig) -> list[WeightMap]:
    E, N, H = v.embed_dim, v.num_heads, v.head_dim
    block = VISION_PREFIX + "blocks.{i}."
    patch_shape = (E, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    table = [
        (("vision", "patch_embed"), VISION_PREFIX + "patch_embed.proj.weight",
         lambda w: w.reshape(E, -1).T, lambda w: w.T.reshape(patch_shape)),
        (("vision", "layers", "norm1"), block + "norm1.weight", None, None),
        (("vision", "layers", "norm1_bias"), block + "norm1.bias", None, None),
        (("vision", "layers", "norm2"), block + "norm2.weight", None, None),
        (("vision", "layers", "norm2_bias"), block + "norm2.bias", None, None),
        (("vision", "layers", "wqkv"), block + "attn.qkv.weight",
         lambda w: w.T.reshape(E, 3, N, H), lambda w: w.reshape(E, -1).T),
        (("vision", "layers", "bqkv"), block + "attn.qkv.bias", lambda b: b.reshape(3, N, H), lambda b: b.reshape(-1)),
        (("vision", "layers", "wo"), block + "attn.proj.weight",
         lambda w: w.T.reshape(N, H, E), lambda w: w.reshape(N * H, E).T),
        (("vision", "layers", "bo"), block + "attn.proj.bias", None, None),
        (("vision", "layers", "fc1"), block + "mlp.fc1.weight", _t, _t),
        (("vision", "layers", "fc1_bias"), block + "mlp.fc1.bias", None, None),
        (("vision", "layers", "fc2"), block + "mlp.fc2.weight", _t, _t),
        (("vision", "layers", "fc2_bias"), block + "mlp.fc2.bias", None, None),
        (("vision", "layers", "w_gate"), block + "mlp.gate_proj.weight", _t, _t),
        (("vision", "layers", "w_gate_bias"), block + "mlp.gate_proj.bias", None, None),
        (("vision", "layers", "w_up"), block + "mlp.up_proj.weight", _t, _t),
        (("vision", "layers", "w_up_bias"), block + "mlp.up_proj.bias", None, None),
        (("vision", "layers", "w_down"), block + "mlp.down_proj.weight", _t, _t),
        (("vision", "layers", "w_down_bias"), block + "mlp.down_proj.bias", None, None),
        (("aligner", "norm"), VISION_PREFIX + "merger.ln_q.weight", None, None),
        (("aligner", "norm_bias"), VISION_PREFIX + "merger.ln_q.bias", None, None),
        (("aligner", "fc1"), VISION_PREFIX + "merger.mlp.0.weight", _t, _t),
        (("aligner", "fc1_bias"), VISION_PREFIX + "merger.mlp.0.bias", None, None),
        (("aligner", "fc2"), VISION_PREFIX + "merger.mlp.2.weight", _t, _t),
        (("aligner", "fc2_bias"), VISION_PREFIX + "merger.mlp.2.bias", None, None),
    ]
    same = lambda w: w  # noqa: E731
    specs = {"vision": vision_specs(v), "aligner": aligner_specs(v)}

    def in_specs(path):
        node = specs
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        return node is not None

    return [WeightMap(path, name, to_ours or same, to_hf or same) for path, name, to_ours, to_hf in table
            if in_specs(path)]


# PEFT target_modules names of the tower's and the aligner's linears (ms-swift's vit / aligner parts).
VISION_MODULE_NAMES = {"wqkv": "qkv", "wo": "proj", "fc1": "fc1", "fc2": "fc2", "w_gate": "gate_proj",
                       "w_up": "up_proj", "w_down": "down_proj"}
ALIGNER_MODULE_NAMES = {"fc1": "mlp.0", "fc2": "mlp.2"}


def vlm_depths(cfg: VLMConfig) -> dict[str, int]:
    return {"vision": cfg.vision.depth}


# ---------------------------------------------------------------------------------------------------------------
# Family dispatch: Qwen2-VL / Qwen2.5-VL (models/vision.py) and the ViT families (models/vit_families.py)


def is_any_vlm_config(d: dict) -> bool:
    return is_vlm_config(d) or is_vit_vlm_config(d)


def any_vlm_config_from_hf(d: dict, *, where: str = "config.json", dtype: str | None = None) -> VLMConfig:
    if is_vit_vlm_config(d):
        return vit_vlm_config_from_hf(d, where=where, dtype=dtype)
    return vlm_config_from_hf(d, where=where, dtype=dtype)


def any_vlm_config_to_hf(cfg: VLMConfig) -> dict:
    return vit_vlm_config_to_hf(cfg) if isinstance(cfg.vision, ViTConfig) else vlm_config_to_hf(cfg)


def vlm_weight_maps(cfg: VLMConfig) -> list[WeightMap]:
    """The tower's and the aligner's tensors of any VLM family."""
    return vit_weight_maps(cfg) if isinstance(cfg.vision, ViTConfig) else vision_weight_maps(cfg.vision)


def vlm_text_prefix(cfg: VLMConfig) -> str:
    """Where the LLM's tensors live in the family's checkpoints (model.language_model. / model.text_model.)."""
    return PREFIXES[cfg.family][1] if cfg.family in PREFIXES else TEXT_PREFIX
