"""PEFT LoRA adapter folders (adapter_config.json + adapter_model.safetensors) in and out.

Keys follow peft: `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` (r, in),
`...lora_B.weight` (out, r), DoRA `...lora_magnitude_vector` (out,), with torch's flattened (out, in) layouts.

PiSSA adapters are exported converted to a standard LoRA of the ORIGINAL base, as peft's
`save_pretrained(path_initial_model_for_weight_conversion=...)` does: dW = sBA - sB0A0 = s [B | -B0] [A ; A0], so
the file holds rank 2r with alpha doubled (times sqrt 2 under rsLoRA) to keep the scale, and
init_lora_weights true. Loading an adapter whose config says init_lora_weights "pissa" re-runs the PiSSA split on
the given base first, which is what peft does when it loads one.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxswift.checkpoints.hf import classifier_config, classifier_head_from_hf, save_hf, seq_cls_body
from jaxswift.checkpoints.registry import portable_model_name
from jaxswift.checkpoints.safetensors_io import SafetensorsFile, write_safetensors
from jaxswift.errors import CheckpointError, ConfigError
from jaxswift.models.config import ModelConfig
from jaxswift.models.families import HF_MODULE_NAMES
from jaxswift.tuners.lora import (LoraConfig, LoraWeight, input_axes, module_names, add_lora, is_lora,
                                  merge_lora)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
OURS = {hf: ours for ours, hf in HF_MODULE_NAMES.items()}
SUFFIX = {"lora_A": ".lora_A.weight", "lora_B": ".lora_B.weight", "lora_magnitude_vector": ".lora_magnitude_vector"}
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\."
                  r"(lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)$")


# --- export -------------------------------------------------------------------------------------------------------


def _exported(w: LoraWeight):
    """(a, b) as they go into the file: PiSSA converted to a rank-2r LoRA of the original base."""
    a, b = np.asarray(jax.device_get(w.a), np.float32), np.asarray(jax.device_get(w.b), np.float32)
    if w.init_a is not None:
        a = np.concatenate([a, np.asarray(w.init_a, np.float32)], axis=-1)
        b = np.concatenate([b, -np.asarray(w.init_b, np.float32)], axis=1)
    return a, b


def adapter_tensors(params, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """{peft key: float32 array in torch layout} for every LoraWeight in params."""
    modules = module_names(cfg)
    out = {}
    for name in modules:
        w = params["layers"][name]
        if not is_lora(w):
            continue
        a, b = _exported(w)
        m = None if w.magnitude is None else np.asarray(jax.device_get(w.magnitude), np.float32)
        for i in range(cfg.num_layers):
            key = PREFIX + modules[name].format(i=i)
            out[key + SUFFIX["lora_A"]] = np.ascontiguousarray(a[i].reshape(-1, a.shape[-1]).T)
            out[key + SUFFIX["lora_B"]] = np.ascontiguousarray(b[i].reshape(b.shape[1], -1).T)
            if m is not None:
                out[key + SUFFIX["lora_magnitude_vector"]] = np.ascontiguousarray(m[i].reshape(-1))
    return out


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)  # peft types lora_alpha as int


def adapter_config(params, lora_cfg: LoraConfig, base_model_name_or_path: str | None) -> dict:
    targets = sorted(HF_MODULE_NAMES[n] for n, w in params["layers"].items() if is_lora(w))
    pissa = lora_cfg.init == "pissa"
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": lora_cfg.rank * (2 if pissa else 1),
        "lora_alpha": _number(lora_cfg.alpha * ((math.sqrt(2) if lora_cfg.use_rslora else 2) if pissa else 1)),
        "lora_dropout": lora_cfg.dropout, "target_modules": targets, "use_rslora": lora_cfg.use_rslora,
        "use_dora": lora_cfg.use_dora, "bias": "none", "init_lora_weights": True, "fan_in_fan_out": False,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
        "lora_bias": False, "inference_mode": True,
    }


def save_peft_adapter(params, cfg: ModelConfig, lora_cfg: LoraConfig, out_dir: str | Path,
                      base_model_name_or_path: str | None = None) -> Path:
    """Writes a folder that `peft.PeftModel.from_pretrained(base, out_dir)` loads. base_model_name_or_path is
    written as other tools can resolve it (`portable_model_name`: hub id of an embedded model, absolute path of a
    local one), so `peft.AutoPeftModelForCausalLM.from_pretrained(out_dir)` finds the base."""
    targets = [w for w in params["layers"].values() if is_lora(w)]
    if not targets:
        raise ConfigError("save_peft_adapter: the params carry no LoRA adapter (call add_lora first)")
    if any(w.rank != lora_cfg.rank or not math.isclose(w.scale, lora_cfg.scale) for w in targets):
        raise ConfigError(f"save_peft_adapter: LoraConfig (rank {lora_cfg.rank}, scale {lora_cfg.scale}) does not "
                          "describe the adapters in params")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / WEIGHTS_NAME, adapter_tensors(params, cfg), {"format": "pt"})
    base = None if base_model_name_or_path is None else portable_model_name(base_model_name_or_path)
    config = adapter_config(params, lora_cfg, base)
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return out


def merge_and_save(model, out_dir: str | Path) -> Path:
    """A full HF folder (config, merged weights, tokenizer) from an api.Model whose params carry LoRA."""
    return save_hf(merge_lora(model.params), model.config, out_dir, tokenizer=model.tokenizer)


# --- import -------------------------------------------------------------------------------------------------------


def _read_config(folder: Path, *, modules_to_save: bool = False) -> tuple[dict, Path]:
    """adapter_config.json, refusing the fields this loader cannot honour (modules_to_save: only where the caller
    loads those tensors, the VLM loader)."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {CONFIG_NAME} (not a PEFT adapter folder)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if raw.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type {raw.get('peft_type')!r} is not supported (only LORA)")
    for field in ("bias", *(() if modules_to_save else ("modules_to_save",)), "rank_pattern", "alpha_pattern",
                  "layers_to_transform", "fan_in_fan_out", "lora_bias"):
        if raw.get(field) not in (None, "none", False, [], {}):
            raise CheckpointError(f"{path}: {field}={raw[field]!r} is not supported")
    return raw, path


def _init_of(raw: dict, path: Path) -> str:
    init = raw.get("init_lora_weights", True)
    if init in (True, False, "gaussian"):
        return "true"  # the weights come from the file; the init only matters for bases it mutates
    if init == "pissa":
        return "pissa"
    raise CheckpointError(f"{path}: init_lora_weights={init!r} changes the base weights in a way jaxswift does not "
                          "reproduce (supported: true, gaussian, pissa)")


def _group_tensors(st: SafetensorsFile, cfg: ModelConfig, skip: frozenset = frozenset()) -> dict[str, dict]:
    """{our name: {(layer, kind): array}}, checking that every key (but `skip`) is a LoRA tensor of a known module."""
    modules = module_names(cfg)
    grouped: dict[str, dict] = {}
    for key in st.keys():
        if key in skip:
            continue
        match = _KEY.match(key)
        name = OURS.get(match.group(2)) if match else None
        if name is None or name not in modules or not key.startswith(
                PREFIX + modules[name].format(i=match.group(1)) + "."):
            raise CheckpointError(f"{st.path}: unexpected tensor {key!r} (expected LoRA A/B/magnitude of "
                                  f"{', '.join(HF_MODULE_NAMES[n] for n in modules)})")
        layer = int(match.group(1))
        if layer >= cfg.num_layers:
            raise CheckpointError(f"{st.path}: tensor {key!r} is for layer {layer}, the base has {cfg.num_layers}")
        grouped.setdefault(name, {})[(layer, match.group(3).split(".")[0])] = (key, st.get(key))
    return grouped


def _fetch(tensors: dict, layer: int, kind: str, expected: tuple, template: str, st: SafetensorsFile):
    key = PREFIX + template.format(i=layer) + SUFFIX[kind]
    if (layer, kind) not in tensors:
        raise CheckpointError(f"{st.path}: missing tensor {key!r} (adapters must cover every layer)")
    name, value = tensors[(layer, kind)]
    if tuple(value.shape) != expected:
        raise CheckpointError(f"{st.path}: tensor {name!r} has shape {tuple(value.shape)}, which does not fit the "
                              f"base model (expected {expected})")
    return np.asarray(value, np.float32)


def _stack(tensors, name, cfg, r, use_dora, st, w) -> dict:
    """a [L, *in, r], b [L, r, *out], magnitude [L, *out] from the per-layer torch-layout tensors."""
    n_in = input_axes(cfg, name)
    in_shape, out_shape = w.shape[1:1 + n_in], w.shape[1 + n_in:]
    I, O = math.prod(in_shape), math.prod(out_shape)
    template = module_names(cfg)[name]
    layers = range(cfg.num_layers)
    a = np.stack([_fetch(tensors, i, "lora_A", (r, I), template, st).T.reshape(*in_shape, r) for i in layers])
    b = np.stack([_fetch(tensors, i, "lora_B", (O, r), template, st).T.reshape(r, *out_shape) for i in layers])
    out = {"a": jnp.asarray(a), "b": jnp.asarray(b)}
    if use_dora:
        m = [_fetch(tensors, i, "lora_magnitude_vector", (O,), template, st).reshape(out_shape) for i in layers]
        out["magnitude"] = jnp.asarray(np.stack(m))
    elif any(kind == "lora_magnitude_vector" for _, kind in tensors):
        raise CheckpointError(f"{st.path}: DoRA magnitudes present but use_dora is false in {CONFIG_NAME}")
    return out


def load_peft_adapter(params, cfg: ModelConfig, adapter_dir: str | Path, *,
                      modules_to_save: tuple[str, ...] = ()) -> tuple[dict, LoraConfig]:
    """(params with LoraWeights holding the adapter, its LoraConfig); params must be the plain base.
    modules_to_save: whole modules the adapter may carry (`base_model.model.NAME.weight`), left to the caller."""
    folder = Path(adapter_dir)
    raw, config_path = _read_config(folder, modules_to_save=bool(modules_to_save))
    extra = sorted(set(raw.get("modules_to_save") or ()) - set(modules_to_save))
    if extra:
        raise CheckpointError(f"{config_path}: modules_to_save={extra!r} is not supported (only "
                              f"{list(modules_to_save)} here)")
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        hint = " (pickled adapter_model.bin is not loaded: save with safetensors)" if (
            folder / "adapter_model.bin").exists() else ""
        raise CheckpointError(f"{folder}: no {WEIGHTS_NAME}{hint}")
    if any(is_lora(w) for w in params["layers"].values()):
        raise ConfigError("load_peft_adapter: params already carry LoRA; load onto the plain base")
    try:
        r, alpha = int(raw["r"]), float(raw["lora_alpha"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{config_path}: r and lora_alpha must be numbers ({e!r})") from None
    st = SafetensorsFile(weights)
    grouped = _group_tensors(st, cfg, frozenset(f"{PREFIX}{name}.weight" for name in modules_to_save))
    if not grouped:
        raise CheckpointError(f"{weights}: no LoRA tensors")
    targets = [n for n in module_names(cfg) if n in grouped]
    try:
        lora_cfg = LoraConfig(rank=r, alpha=alpha, dropout=float(raw.get("lora_dropout", 0.0)),
                              target_modules=tuple(HF_MODULE_NAMES[n] for n in targets),
                              use_rslora=bool(raw.get("use_rslora", False)), use_dora=bool(raw.get("use_dora", False)),
                              init=_init_of(raw, config_path))
    except ConfigError as e:
        raise CheckpointError(f"{config_path}: {e}") from None
    for name in targets:  # shapes first, so a misfit adapter fails before any SVD
        grouped[name] = _stack(grouped[name], name, cfg, r, lora_cfg.use_dora, st, params["layers"][name])
    params = add_lora(params, cfg, lora_cfg, jax.random.key(0))
    layers = dict(params["layers"])
    for name in targets:
        layers[name] = layers[name].replace(**grouped[name])
    return {**params, "layers": layers}, lora_cfg


SCORE_KEY = PREFIX + "score.weight"
HEAD_FILE = "classifier_head.json"  # beside the adapter: what config.json says of a classifier folder's head


def save_seq_cls_adapter(params, cfg: ModelConfig, lora_cfg: LoraConfig, head, out_dir: str | Path,
                         base_model_name_or_path: str | None = None) -> Path:
    """A PEFT adapter of a sequence classifier, as peft's task_type SEQ_CLS writes it: the LoRA weights plus the
    whole `score` head (modules_to_save), so `PeftModel.from_pretrained(AutoModelForSequenceClassification..., dir)`
    restores both; the head's labels, problem type and pad id go to classifier_head.json (peft ignores it).
    params: the decoder with its adapters and params["score"] [D, C]; head: models/heads.ClassifierHead."""
    body = {k: v for k, v in params.items() if k != "score"}
    out = save_peft_adapter(body, cfg, lora_cfg, out_dir, base_model_name_or_path)
    tensors = adapter_tensors(body, cfg)
    tensors[SCORE_KEY] = np.ascontiguousarray(np.asarray(jax.device_get(params["score"]), np.float32).T)
    write_safetensors(out / WEIGHTS_NAME, tensors, {"format": "pt"})
    config = json.loads((out / CONFIG_NAME).read_text())
    config.update(task_type="SEQ_CLS", modules_to_save=["score"])
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    (out / HEAD_FILE).write_text(json.dumps(classifier_config(cfg, head), indent=2))
    return out


def is_seq_cls_adapter(adapter_dir: str | Path) -> bool:
    path = Path(adapter_dir) / CONFIG_NAME
    return path.is_file() and json.loads(path.read_text()).get("task_type") == "SEQ_CLS"


def load_seq_cls_adapter(params, cfg: ModelConfig, adapter_dir: str | Path):
    """(params with LoRA and params["score"], LoraConfig, ClassifierHead) of a SEQ_CLS adapter over the decoder
    `params` (a causal LM's: its lm_head is dropped). The head comes from classifier_head.json when the adapter
    has one (jaxswift's), else from the score's shape with transformers' defaults and the base's pad id."""
    folder = Path(adapter_dir)
    st = SafetensorsFile(folder / WEIGHTS_NAME) if (folder / WEIGHTS_NAME).is_file() else None
    if st is None or SCORE_KEY not in st.keys():
        raise CheckpointError(f"{folder}: a SEQ_CLS adapter needs {SCORE_KEY!r} in {WEIGHTS_NAME} (peft saves the "
                              "score head with modules_to_save)")
    score_CD = np.asarray(st.get(SCORE_KEY), np.float32)
    if score_CD.ndim != 2 or score_CD.shape[1] != cfg.hidden_size:
        raise CheckpointError(f"{folder}: {SCORE_KEY} has shape {score_CD.shape}, expected (num_labels, "
                              f"{cfg.hidden_size})")
    body_cfg = seq_cls_body(cfg)
    body = {k: v for k, v in params.items() if k not in ("lm_head", "score")}
    body, lora_cfg = load_peft_adapter(body, body_cfg, folder, modules_to_save=("score", "classifier"))
    head_file = folder / HEAD_FILE
    raw = json.loads(head_file.read_text()) if head_file.is_file() else {
        "num_labels": score_CD.shape[0], "pad_token_id": cfg.pad_token_id}
    head = classifier_head_from_hf(raw, str(head_file))
    if head.num_labels != score_CD.shape[0]:
        raise CheckpointError(f"{head_file}: num_labels {head.num_labels}, but the score head has "
                              f"{score_CD.shape[0]} rows")
    return {**body, "score": jnp.asarray(score_CD.T, cfg.weight_dtype)}, lora_cfg, head
