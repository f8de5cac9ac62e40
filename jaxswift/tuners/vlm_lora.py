"""LoRA on vision-language models: adapters on the tower's, the aligner's and the LLM's linears (PEFT export in
checkpoints/vlm_peft.py).

The LLM part is the text LoRA (tuners/lora.py) on `params["llm"]`; the tower and the aligner get the same
`LoraWeight` leaves (a beside the frozen base, `(x @ A) @ B * scale`), which their `linear` calls already apply.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp

from jaxswift.errors import ConfigError
from jaxswift.models.vision import VLMConfig, vlm_param_specs
from jaxswift.models.vlm_families import vlm_text_prefix, vlm_weight_maps
from jaxswift.tuners.lora import LoraConfig, LoraWeight, add_lora, is_lora, module_names

PARTS = ("vision", "aligner", "llm")
# Qwen's tower fuses q, k and v (wqkv); the CLIP / SigLIP tower (models/vit.py) keeps wq, wk, wv; idefics3's
# connector is one `proj`.
VISION_LINEARS = ("wqkv", "wo", "fc1", "fc2", "w_gate", "w_up", "w_down", "wq", "wk", "wv")
ALIGNER_LINEARS = ("fc1", "fc2", "proj")


def _wrap(w, spec, lora_cfg: LoraConfig, key) -> LoraWeight:
    """A LoraWeight on one tower / aligner weight: A as peft's default (kaiming-uniform), B = 0."""
    stacked = spec.logical_axes[0] == "layers"
    n_in = len(spec.fan_in_axes)
    lead = w.shape[:1] if stacked else ()
    in_shape, out_shape = w.shape[len(lead):len(lead) + n_in], w.shape[len(lead) + n_in:]
    bound = 1.0 / math.sqrt(math.prod(in_shape))
    a = jax.random.uniform(key, (*lead, *in_shape, lora_cfg.rank), jnp.float32, -bound, bound)
    b = jnp.zeros((*lead, lora_cfg.rank, *out_shape), jnp.float32)
    return LoraWeight(w, a, b, scale=lora_cfg.scale, dropout=lora_cfg.dropout, n_in=n_in)


def add_vlm_lora(params: dict, cfg: VLMConfig, lora_cfg: LoraConfig, key, parts=PARTS,
                 modules: dict[str, tuple[str, ...]] | None = None) -> dict:
    """params with adapters on every linear of the tower / aligner in `parts`, and on lora_cfg.target_modules of
    the LLM when "llm" is in parts. `modules` (from `resolve_vlm_targets`) narrows the tower's and the aligner's
    linears to the named ones."""
    unknown = set(parts) - set(PARTS)
    if unknown or not parts:
        raise ConfigError(f"LoRA parts must be some of {', '.join(PARTS)}, got {list(parts)}")
    if lora_cfg.use_dora or lora_cfg.init == "pissa":
        raise ConfigError("DoRA and PiSSA adapters on vision-language models are not supported yet")
    k_llm, k_vision, k_aligner = jax.random.split(key, 3)
    out = dict(params)
    if "llm" in parts:
        out["llm"] = add_lora(params["llm"], cfg.text, lora_cfg, k_llm)
    if "vision" in parts:
        specs = vlm_param_specs(cfg)["vision"]["layers"]
        layers = dict(params["vision"]["layers"])
        names = [n for n in VISION_LINEARS if n in layers and (modules is None or n in modules.get("vision", ()))]
        for name, k in zip(names, jax.random.split(k_vision, len(names))):
            layers[name] = _wrap(layers[name], specs[name], lora_cfg, k)
        out["vision"] = {**params["vision"], "layers": layers}
    if "aligner" in parts:
        specs = vlm_param_specs(cfg)["aligner"]
        aligner = dict(params["aligner"])
        names = [n for n in ALIGNER_LINEARS if n in aligner and (modules is None or n in modules.get("aligner", ()))]
        for name, k in zip(names, jax.random.split(k_aligner, max(len(names), 1))):
            aligner[name] = _wrap(aligner[name], specs[name], lora_cfg, k)
        out["aligner"] = aligner
    return out


def randomize_b(params, key, std: float = 0.1):
    """Every adapter's B drawn from N(0, std^2) (tests: an adapter at its init adds nothing)."""
    leaves, treedef = jax.tree.flatten(params, is_leaf=is_lora)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [
        w.replace(b=std * jax.random.normal(k, w.b.shape, jnp.float32)) if is_lora(w) else w
        for w, k in zip(leaves, keys)])


def vlm_module_names(cfg: VLMConfig) -> dict[tuple[str, str], str]:
    """(part, our leaf name) -> the transformers module path ("{i}" for the layer) of every linear LoRA can adapt:
    model.visual.blocks.{i}.attn.qkv, model.visual.merger.mlp.0, model.language_model.layers.{i}.self_attn.q_proj."""
    out = {}
    for m in vlm_weight_maps(cfg):
        part, name = m.path[0], m.path[-1]
        linears = VISION_LINEARS if part == "vision" else ALIGNER_LINEARS
        if m.hf_name.endswith(".weight") and name in linears and (part == "aligner" or m.path[1] == "layers"):
            out[(part, name)] = m.hf_name.removesuffix(".weight")
    for name, template in module_names(cfg.text).items():
        out[("llm", name)] = vlm_text_prefix(cfg) + template.removeprefix("model.")
    return out


def resolve_vlm_targets(cfg: VLMConfig, target_modules) -> dict[str, tuple[str, ...]]:
    """part -> our names of the linears that --target_modules adapts, as peft reads it on the transformers model:
    a list of names matches every module whose path ends with one of them (`qkv`, `mlp.0`, `q_proj`, or our
    `vision.wqkv` / `aligner.fc1` / `wq`), in any part; one regex must fully match module paths (such as
    model.visual.blocks.N.attn.qkv) or our part.name. Stacked layers: a module is adapted in all layers or none."""
    modules = vlm_module_names(cfg)
    depth = {"vision": cfg.vision.depth, "aligner": 1, "llm": cfg.text.num_layers}
    chosen: dict[str, list[str]] = {}
    if isinstance(target_modules, str):
        try:
            regex = re.compile(target_modules)
        except re.error as e:
            raise ConfigError(f"--target_modules {target_modules!r} is not a valid regex ({e})") from None
        for (part, name), template in modules.items():
            hits = [bool(regex.fullmatch(template.format(i=i))) for i in range(depth[part])]
            if all(hits) or regex.fullmatch(f"{part}.{name}"):
                chosen.setdefault(part, []).append(name)
            elif any(hits):
                raise ConfigError(f"--target_modules {target_modules!r} selects {template} in some layers only; "
                                  "layers are stacked, so a module is adapted in all layers or none")
        if not chosen:
            raise ConfigError(f"--target_modules {target_modules!r} matches no module; module paths look like "
                              f"{', '.join(sorted(set(t for t in modules.values()))[:3])}")
    else:
        for target in target_modules:
            hits = [(part, name) for (part, name), template in modules.items()
                    if template.endswith("." + target) or target == f"{part}.{name}"
                    or (part == "llm" and target == name)]
            if not hits:
                raise ConfigError(f"--target_modules: {target!r} names no module of this model; available: "
                                  f"{', '.join(sorted({t.rsplit('.', 1)[-1] for t in modules.values()}))} "
                                  "(or a regex over full paths such as model.visual.blocks.0.attn.qkv)")
            for part, name in hits:
                if name not in chosen.setdefault(part, []):
                    chosen[part].append(name)
    return {part: tuple(names) for part, names in chosen.items()}
