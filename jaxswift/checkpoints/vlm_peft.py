"""PEFT adapters of vision-language models: the transformers model's module names for the tower
(`model.visual.blocks.{i}.attn.qkv`), the aligner (`model.visual.merger.mlp.0`) and the LLM
(`model.language_model.layers.{i}.self_attn.q_proj`), under peft's `base_model.model.` prefix.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import numpy as np

from jaxswift.checkpoints.safetensors_io import write_safetensors
from jaxswift.errors import ConfigError
from jaxswift.models.vision import VLMConfig
from jaxswift.models.vlm_families import vlm_text_prefix, vlm_weight_maps
from jaxswift.tuners.lora import LoraConfig, LoraWeight, is_lora, module_names
from jaxswift.tuners.vlm_lora import ALIGNER_LINEARS, VISION_LINEARS

PEFT_PREFIX = "base_model.model."


def _module_templates(cfg: VLMConfig) -> dict[tuple[str, ...], str]:
    """Our path -> HF module path ("{i}" for the layer) of every tower / aligner linear."""
    return {m.path: m.hf_name.removesuffix(".weight") for m in vlm_weight_maps(cfg)
            if m.hf_name.endswith(".weight") and m.path[-1] in VISION_LINEARS + ALIGNER_LINEARS
            and not (m.path[0] == "vision" and m.path[1] != "layers")}


def _torch_pair(w: LoraWeight, index) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(jax.device_get(w.a), np.float32), np.asarray(jax.device_get(w.b), np.float32)
    if index is not None:
        a, b = a[index], b[index]
    return (np.ascontiguousarray(a.reshape(-1, a.shape[-1]).T), np.ascontiguousarray(b.reshape(b.shape[0], -1).T))


def vlm_adapter_tensors(params: dict, cfg: VLMConfig) -> tuple[dict[str, np.ndarray], list[str]]:
    """({peft key: array in torch layout}, HF module path regexes of the adapted modules)."""
    tensors, modules = {}, []
    for path, template in _module_templates(cfg).items():
        node = params
        for key in path:
            node = node[key]
        if not is_lora(node):
            continue
        layers = range(cfg.vision.depth) if "{i}" in template else [None]
        for i in layers:
            name = template.format(i=i)
            a, b = _torch_pair(node, i)
            tensors[PEFT_PREFIX + name + ".lora_A.weight"], tensors[PEFT_PREFIX + name + ".lora_B.weight"] = a, b
        modules.append(re.escape(template).replace(re.escape("{i}"), r"\d+"))
    text_modules = module_names(cfg.text)
    for ours, template in text_modules.items():
        w = params["llm"]["layers"][ours]
        if not is_lora(w):
            continue
        full = vlm_text_prefix(cfg) + template.removeprefix("model.")
        for i in range(cfg.text.num_layers):
            a, b = _torch_pair(w, i)
            name = full.format(i=i)
            tensors[PEFT_PREFIX + name + ".lora_A.weight"], tensors[PEFT_PREFIX + name + ".lora_B.weight"] = a, b
        modules.append(re.escape(full).replace(re.escape("{i}"), r"\d+"))
    return tensors, modules


def save_vlm_peft_adapter(params: dict, cfg: VLMConfig, lora_cfg: LoraConfig, out_dir: str | Path,
                          base_model_name_or_path: str | None = None) -> Path:
    """A folder that `peft.PeftModel.from_pretrained(transformers_model, out_dir)` loads; target_modules is a
    regex of exactly the adapted modules (a plain name such as `gate_proj` would also reach the other part)."""
    tensors, modules = vlm_adapter_tensors(params, cfg)
    if not tensors:
        raise ConfigError("save_vlm_peft_adapter: the params carry no LoRA adapter (call add_vlm_lora first)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "adapter_model.safetensors", tensors, {"format": "pt"})
    alpha = int(lora_cfg.alpha) if float(lora_cfg.alpha).is_integer() else float(lora_cfg.alpha)
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
              "r": lora_cfg.rank, "lora_alpha": alpha, "lora_dropout": lora_cfg.dropout,
              "target_modules": "(" + "|".join(modules) + ")", "use_rslora": lora_cfg.use_rslora,
              "use_dora": False, "bias": "none", "init_lora_weights": True, "fan_in_fan_out": False,
              "modules_to_save": None, "inference_mode": True}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out
