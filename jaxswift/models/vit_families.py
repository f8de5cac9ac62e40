"""The ViT vision-language families (llava, idefics3, smolvlm): HF config.json <-> VLMConfig, and HF tensor names
of the tower (models/vit.py) and the connector.

llava:    model.vision_tower.* (CLIP or SigLIP), model.multi_modal_projector.linear_{1,2}, model.language_model.*
          (any text family: llama, qwen2, ...); checkpoints from before transformers 5 write
          vision_tower.vision_model.*, multi_modal_projector.*, language_model.model.*, language_model.lm_head.
idefics3 / smolvlm: model.vision_model.* (SigLIP), model.connector.modality_projection.proj, model.text_model.*
          (llama).
"""

from __future__ import annotations

import re

from jaxswift.errors import ConfigError
from jaxswift.models.config import FAMILY_ARCHITECTURE, ModelConfig, config_from_hf, config_to_hf
from jaxswift.models.families import WeightMap
from jaxswift.models.vision import VLMConfig, vlm_param_specs
from jaxswift.models.vit import ViTConfig, hidden_index

VIT_VLM_ARCHITECTURES = {"LlavaForConditionalGeneration": "llava",
                         "Idefics3ForConditionalGeneration": "idefics3",
                         "SmolVLMForConditionalGeneration": "smolvlm"}
VIT_VLM_FAMILY_ARCHITECTURE = {family: arch for arch, family in VIT_VLM_ARCHITECTURES.items()}
SELECT_STRATEGIES = ("default", "full")
# family -> (tower prefix, text prefix)
PREFIXES = {"llava": ("model.vision_tower.", "model.language_model."),
            "idefics3": ("model.vision_model.", "model.text_model."),
            "smolvlm": ("model.vision_model.", "model.text_model.")}
_LEGACY = {"llava": ((re.compile(r"^vision_tower\.vision_model\."), "model.vision_tower."),
                     (re.compile(r"^vision_tower\."), "model.vision_tower."),
                     (re.compile(r"^multi_modal_projector\."), "model.multi_modal_projector."),
                     (re.compile(r"^language_model\.model\."), "model.language_model."),
                     (re.compile(r"^language_model\.lm_head\."), "lm_head.")),
           "idefics3": (), "smolvlm": ()}


def is_vit_vlm_config(d: dict) -> bool:
    return any(a in VIT_VLM_ARCHITECTURES for a in d.get("architectures") or []) or d.get("model_type") in (
        VIT_VLM_FAMILY_ARCHITECTURE)


def canonical_vit_name(name: str, family: str) -> str:
    for pattern, prefix in _LEGACY[family]:
        if pattern.match(name):
            return pattern.sub(prefix, name, count=1)
    return name


# ---------------------------------------------------------------------------------------------------------------
# config.json


def _required(d: dict, keys, where: str):
    for key in keys:
        if key not in d:
            raise ConfigError(f"{where}: missing required field {key!r}")


def _text_config(d: dict, family: str, where: str, dtype: str | None) -> ModelConfig:
    text = dict(d.get("text_config") or {})
    model_type = text.get("model_type", "llama")
    if model_type not in FAMILY_ARCHITECTURE:
        raise ConfigError(f"{where}: text_config.model_type {model_type!r} is not a supported text family "
                          f"({', '.join(FAMILY_ARCHITECTURE)})")
    text["architectures"] = [FAMILY_ARCHITECTURE[model_type]]
    if d.get("tie_word_embeddings"):
        text["tie_word_embeddings"] = True
    text.setdefault("dtype", d.get("dtype") or d.get("torch_dtype"))
    return config_from_hf(text, where=f"{where} (text_config)", dtype=dtype)


def _vit_config(v: dict, kind: str, where: str) -> ViTConfig:
    _required(v, ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                  "patch_size"), where)
    if kind == "siglip" and v.get("vision_use_head", v.get("model_type") == "siglip_vision_model"):
        raise ConfigError(f"{where}: a SigLIP tower with its attention-pooling head (vision_use_head=true) is not "
                          f"supported; llava never uses the head: set vision_use_head to false")
    return ViTConfig(kind=kind, depth=int(v["num_hidden_layers"]), embed_dim=int(v["hidden_size"]),
                     num_heads=int(v["num_attention_heads"]), mlp_dim=int(v["intermediate_size"]),
                     image_size=int(v["image_size"]), patch_size=int(v["patch_size"]),
                     in_channels=int(v.get("num_channels", 3)),
                     hidden_act=v.get("hidden_act", "quick_gelu" if kind == "clip" else "gelu_pytorch_tanh"),
                     norm_eps=float(v.get("layer_norm_eps", 1e-5 if kind == "clip" else 1e-6)))


def vit_vlm_config_from_hf(d: dict, *, where: str = "config.json", dtype: str | None = None) -> VLMConfig:
    archs = d.get("architectures") or []
    family = next((VIT_VLM_ARCHITECTURES[a] for a in archs if a in VIT_VLM_ARCHITECTURES), d.get("model_type"))
    text = _text_config(d, family, where, dtype)
    v = d.get("vision_config") or {}
    vwhere = f"{where} (vision_config)"
    if family == "llava":
        vtype = v.get("model_type", "clip_vision_model")
        kinds = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
        if vtype not in kinds:
            raise ConfigError(f"{vwhere}: llava vision tower {vtype!r} is not supported ({', '.join(kinds)})")
        vision = _vit_config(v, kinds[vtype], vwhere)
        layers = d.get("vision_feature_layer", -2)
        layers = tuple(int(i) for i in layers) if isinstance(layers, (list, tuple)) else (int(layers),)
        for i in layers:
            hidden_index(i, vision.depth)  # range check, with a clear message
        select = d.get("vision_feature_select_strategy", "default")
        if select not in SELECT_STRATEGIES:
            raise ConfigError(f"{where}: vision_feature_select_strategy must be one of {SELECT_STRATEGIES}, "
                              f"got {select!r}")
        image_token = d.get("image_token_index", d.get("image_token_id"))
        if image_token is None:
            raise ConfigError(f"{where}: missing required field 'image_token_index'")
        return VLMConfig(family=family, text=text, vision=vision, image_token_id=int(image_token),
                         tie_word_embeddings=text.tie_word_embeddings, feature_layers=layers,
                         feature_select=select, projector_act=d.get("projector_hidden_act", "gelu"),
                         projector_bias=bool(d.get("multimodal_projector_bias", True)))
    if family not in ("idefics3", "smolvlm"):
        raise ConfigError(f"{where}: unknown vision-language architecture {archs or family!r}")
    vision = _vit_config({"model_type": "idefics3_vision", **v}, "siglip", vwhere)
    scale = int(d.get("scale_factor", 2))
    if vision.patches_per_side % scale:
        raise ConfigError(f"{where}: scale_factor {scale} must divide the {vision.patches_per_side} patches per "
                          f"side of the tower")
    if "image_token_id" not in d:
        raise ConfigError(f"{where}: missing required field 'image_token_id'")
    return VLMConfig(family=family, text=text, vision=vision, image_token_id=int(d["image_token_id"]),
                     tie_word_embeddings=text.tie_word_embeddings, scale_factor=scale)


def vit_vlm_config_to_hf(cfg: VLMConfig) -> dict:
    v = cfg.vision
    text = config_to_hf(cfg.text)
    text.pop("architectures")
    text["model_type"] = cfg.text.family
    vision = {"hidden_size": v.embed_dim, "intermediate_size": v.mlp_dim, "num_hidden_layers": v.depth,
              "num_attention_heads": v.num_heads, "image_size": v.image_size, "patch_size": v.patch_size,
              "num_channels": v.in_channels, "hidden_act": v.hidden_act, "layer_norm_eps": v.norm_eps}
    out = {"architectures": [VIT_VLM_FAMILY_ARCHITECTURE[cfg.family]], "model_type": cfg.family,
           "dtype": cfg.text.param_dtype, "tie_word_embeddings": cfg.tie_word_embeddings, "text_config": text}
    if cfg.family == "llava":
        vision["model_type"] = f"{v.kind}_vision_model"
        if v.kind == "siglip":
            vision["vision_use_head"] = False
        layers = cfg.feature_layers[0] if len(cfg.feature_layers) == 1 else list(cfg.feature_layers)
        return {**out, "vision_config": vision, "image_token_index": cfg.image_token_id,
                "vision_feature_layer": layers, "vision_feature_select_strategy": cfg.feature_select,
                "projector_hidden_act": cfg.projector_act, "multimodal_projector_bias": cfg.projector_bias,
                "image_seq_length": cfg.tokens_per_image}
    vision["model_type"] = f"{cfg.family}_vision"
    return {**out, "vision_config": vision, "image_token_id": cfg.image_token_id, "scale_factor": cfg.scale_factor}


# ---------------------------------------------------------------------------------------------------------------
# Tensor names


def _t(w):
    return w.T


def vit_weight_maps(cfg: VLMConfig) -> list[WeightMap]:
    """Tower and connector tensors (the LLM's go through models/families.py under the text prefix)."""
    v: ViTConfig = cfg.vision
    E, N, H, C, p = v.embed_dim, v.num_heads, v.head_dim, v.in_channels, v.patch_size
    tower = PREFIXES[cfg.family][0]
    block = tower + "encoder.layers.{i}."
    heads_in = (lambda w: w.T.reshape(E, N, H), lambda w: w.reshape(E, N * H).T)
    heads_bias = (lambda b: b.reshape(N, H), lambda b: b.reshape(-1))
    table = [
        (("vision", "patch_embed"), tower + "embeddings.patch_embedding.weight",
         lambda w: w.reshape(E, -1).T, lambda w: w.T.reshape(E, C, p, p)),
        (("vision", "patch_bias"), tower + "embeddings.patch_embedding.bias", None, None),
        (("vision", "class_embed"), tower + "embeddings.class_embedding", None, None),
        (("vision", "pos_embed"), tower + "embeddings.position_embedding.weight", None, None),
        (("vision", "pre_norm"), tower + "pre_layrnorm.weight", None, None),
        (("vision", "pre_norm_bias"), tower + "pre_layrnorm.bias", None, None),
        (("vision", "post_norm"), tower + "post_layernorm.weight", None, None),
        (("vision", "post_norm_bias"), tower + "post_layernorm.bias", None, None),
        (("vision", "layers", "norm1"), block + "layer_norm1.weight", None, None),
        (("vision", "layers", "norm1_bias"), block + "layer_norm1.bias", None, None),
        (("vision", "layers", "norm2"), block + "layer_norm2.weight", None, None),
        (("vision", "layers", "norm2_bias"), block + "layer_norm2.bias", None, None),
        *[(("vision", "layers", "w" + x), block + f"self_attn.{x}_proj.weight", *heads_in) for x in "qkv"],
        *[(("vision", "layers", "b" + x), block + f"self_attn.{x}_proj.bias", *heads_bias) for x in "qkv"],
        (("vision", "layers", "wo"), block + "self_attn.out_proj.weight",
         lambda w: w.T.reshape(N, H, E), lambda w: w.reshape(N * H, E).T),
        (("vision", "layers", "bo"), block + "self_attn.out_proj.bias", None, None),
        (("vision", "layers", "fc1"), block + "mlp.fc1.weight", _t, _t),
        (("vision", "layers", "fc1_bias"), block + "mlp.fc1.bias", None, None),
        (("vision", "layers", "fc2"), block + "mlp.fc2.weight", _t, _t),
        (("vision", "layers", "fc2_bias"), block + "mlp.fc2.bias", None, None),
        (("aligner", "fc1"), "model.multi_modal_projector.linear_1.weight", _t, _t),
        (("aligner", "fc1_bias"), "model.multi_modal_projector.linear_1.bias", None, None),
        (("aligner", "fc2"), "model.multi_modal_projector.linear_2.weight", _t, _t),
        (("aligner", "fc2_bias"), "model.multi_modal_projector.linear_2.bias", None, None),
        (("aligner", "proj"), "model.connector.modality_projection.proj.weight", _t, _t),
    ]
    specs = vlm_param_specs(cfg)

    def in_specs(path):
        node = specs
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        return node is not None

    same = lambda w: w  # noqa: E731
    return [WeightMap(path, name, to_ours or same, to_hf or same) for path, name, to_ours, to_hf in table
            if in_specs(path)]
