"""PEFT adapters of vision-language models: the transformers model's module names for the tower
(`model.visual.blocks.{i}.attn.qkv`), the aligner (`model.visual.merger.mlp.0`) and the LLM
(`model.language_model.layers.{i}.self_attn.q_proj`), under peft's `base_model.model.` prefix.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxswift.checkpoints.peft import WEIGHTS_NAME, _read_config
from jaxswift.checkpoints.safetensors_io import SafetensorsFile, write_safetensors
from jaxswift.checkpoints.vlm import part_hf_tensors, vision_weight_of
from jaxswift.errors import CheckpointError, ConfigError
from jaxswift.models.families import HF_MODULE_NAMES
from jaxswift.models.vision import VLMConfig
from jaxswift.models.vlm_families import vlm_text_prefix, vlm_weight_maps
from jaxswift.tuners.lora import LoraConfig, LoraWeight, is_lora, module_names
from jaxswift.tuners.vlm_lora import ALIGNER_LINEARS, VISION_LINEARS, add_vlm_lora

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
        node = _get(params, path)
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
                          base_model_name_or_path: str | None = None, full_parts: tuple[str, ...] = ()) -> Path:
    """A folder that `peft.PeftModel.from_pretrained(transformers_model, out_dir)` loads; target_modules is a
    regex of exactly the adapted modules (a plain name such as `gate_proj` would also reach the other part).
    `full_parts` ("vision", "aligner"), trained in full, are saved whole as PEFT's modules_to_save: one entry per
    module owning a tensor (a ModuleList such as the tower's blocks cannot be wrapped), its tensors under the
    module's own name, as peft writes them."""
    tensors, modules = vlm_adapter_tensors(params, cfg)
    if not tensors:
        raise ConfigError("save_vlm_peft_adapter: the params carry no LoRA adapter (call add_vlm_lora first)")
    adapted = [p for p in full_parts if any(is_lora(x) for x in jax.tree.leaves(params[p], is_leaf=is_lora))]
    if adapted:
        raise ConfigError(f"save_vlm_peft_adapter: the {', '.join(adapted)} part carries LoRA adapters; a part is "
                          "adapted or saved whole, not both")
    whole = part_hf_tensors(params, cfg, tuple(full_parts))
    tensors |= {PEFT_PREFIX + name: np.asarray(a, np.float32) for name, a in whole.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "adapter_model.safetensors", tensors, {"format": "pt"})
    alpha = int(lora_cfg.alpha) if float(lora_cfg.alpha).is_integer() else float(lora_cfg.alpha)
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
              "r": lora_cfg.rank, "lora_alpha": alpha, "lora_dropout": lora_cfg.dropout,
              "target_modules": "(" + "|".join(modules) + ")", "use_rslora": lora_cfg.use_rslora,
              "use_dora": False, "bias": "none", "init_lora_weights": True, "fan_in_fan_out": False,
              "modules_to_save": sorted({name.rsplit(".", 1)[0] for name in whole}) or None,
              "inference_mode": True}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def _all_templates(cfg: VLMConfig) -> dict[tuple[str, ...], str]:
    """Our path of every linear LoRA can adapt (tower, aligner, LLM) -> its HF module path ("{i}": the layer)."""
    out = dict(_module_templates(cfg))
    for ours, template in module_names(cfg.text).items():
        out[("llm", "layers", ours)] = vlm_text_prefix(cfg) + template.removeprefix("model.")
    return out


def _from_torch(a_torch: np.ndarray, b_torch: np.ndarray, like: LoraWeight, index) -> tuple[np.ndarray, np.ndarray]:
    """peft's lora_A [r, in] / lora_B [out, r] -> our a [*in, r] / b [r, *out] (one layer of a stacked leaf)."""
    a_shape, b_shape = (like.a.shape[1:], like.b.shape[1:]) if index is not None else (like.a.shape, like.b.shape)
    if a_torch.shape != (a_shape[-1], math.prod(a_shape[:-1])) or b_torch.shape != (math.prod(b_shape[1:]),
                                                                                     b_shape[0]):
        raise CheckpointError(f"LoRA shapes {a_torch.shape} / {b_torch.shape} do not fit this model's layer "
                              f"(expected [{a_shape[-1]}, {math.prod(a_shape[:-1])}] / "
                              f"[{math.prod(b_shape[1:])}, {b_shape[0]}])")
    return a_torch.T.reshape(a_shape), b_torch.T.reshape(b_shape)


def load_vlm_peft_adapter(params: dict, cfg: VLMConfig, adapter_dir: str | Path) -> tuple[dict, LoraConfig]:
    """(params with LoraWeights holding the adapter, its LoraConfig): the inverse of `save_vlm_peft_adapter`, and
    any PEFT LoRA adapter of the transformers model over the tower's, the aligner's and the LLM's linears."""
    folder = Path(adapter_dir)
    raw, config_path = _read_config(folder, modules_to_save=True)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{folder}: no {WEIGHTS_NAME}")
    try:
        rank, alpha = int(raw["r"]), float(raw["lora_alpha"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{config_path}: r and lora_alpha must be numbers ({e!r})") from None
    if raw.get("use_dora") or raw.get("init_lora_weights", True) not in (True, False, "gaussian"):
        raise CheckpointError(f"{config_path}: DoRA / PiSSA adapters on vision-language models are not supported")
    st = SafetensorsFile(weights)
    templates = _all_templates(cfg)
    key = lambda template, i, ab: f"{PEFT_PREFIX}{template.format(i=i)}.lora_{ab}.weight"  # noqa: E731
    names = set(st.keys())
    present = {path: t for path, t in templates.items() if key(t, 0, "A") in names}
    known = {key(t, i, ab) for t in present.values() for i in range(max(cfg.vision.depth, cfg.text.num_layers))
             for ab in "AB"}
    whole = {n for n in names - known if n.startswith(PEFT_PREFIX) and vision_weight_of(n[len(PEFT_PREFIX):], cfg)}
    unknown = sorted(names - known - whole)
    if unknown or not present:
        raise CheckpointError(f"{weights}: " + (f"tensors this model has no module for: {unknown[:3]}" if unknown
                                                else "no LoRA tensors of this model's modules"))
    llm_names = tuple(HF_MODULE_NAMES[path[-1]] for path in present if path[0] == "llm")
    lora_cfg = LoraConfig(rank=rank, alpha=alpha, dropout=float(raw.get("lora_dropout", 0.0)),
                          target_modules=llm_names or ("q_proj",), use_rslora=bool(raw.get("use_rslora", False)))
    params = _with_saved_modules(params, cfg, st, sorted(whole), weights)
    parts = tuple(dict.fromkeys(path[0] for path in present))
    modules = {part: tuple(path[-1] for path in present if path[0] == part) for part in ("vision", "aligner")}
    adapted = add_vlm_lora(params, cfg, lora_cfg, jax.random.key(0), parts=parts, modules=modules)
    for path, template in present.items():
        like = _get(adapted, path)
        layers = range(like.a.shape[0]) if "{i}" in template else [None]
        try:
            pairs = [_from_torch(st.get(key(template, i, "A")).astype(np.float32),
                                 st.get(key(template, i, "B")).astype(np.float32), like, i) for i in layers]
        except KeyError as e:
            raise CheckpointError(f"{weights}: missing {e} (an adapter must cover every layer of a module)") from None
        except CheckpointError as e:
            raise CheckpointError(f"{weights}: {template}: {e}") from None
        a, b = (np.stack(x) for x in zip(*pairs)) if layers != [None] else pairs[0]
        adapted = _set(adapted, path, like.replace(a=jnp.asarray(a), b=jnp.asarray(b)))
    return adapted, lora_cfg


def _with_saved_modules(params: dict, cfg: VLMConfig, st: SafetensorsFile, names: list[str], weights: Path) -> dict:
    """params with the tower / aligner tensors an adapter saved whole (modules_to_save) in place of the base's."""
    leaves: dict[tuple[str, ...], tuple] = {}
    for name in names:
        m, i = vision_weight_of(name[len(PEFT_PREFIX):], cfg)
        leaves.setdefault(m.path, (m, {}))[1][i] = m.to_ours(st.get(name).astype(np.float32))
    for path, (m, layers) in leaves.items():
        like = _get(params, path)
        if None in layers:
            value = layers[None]
        else:
            missing = sorted(set(range(like.shape[0])) - set(layers))
            if missing:
                raise CheckpointError(f"{weights}: the saved module {m.hf_name} lacks layers {missing} (a module "
                                      "saved whole must cover every layer)")
            value = np.stack([layers[i] for i in range(like.shape[0])])
        if value.shape != like.shape:
            raise CheckpointError(f"{weights}: {m.hf_name} has shape {value.shape} in the adapter, {like.shape} in "
                                  "this model")
        params = _set(params, path, jnp.asarray(value, like.dtype))
    return params


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> dict:
    """A copy of the nested dict with tree[path] = value (the input is left as it was)."""
    head, *rest = path
    return {**tree, head: _set(tree[head], tuple(rest), value) if rest else value}
