"""Quantized export: a model's matmul weights -> GPTQ / AWQ / FP8 / int8 leaves -> an HF folder others load.

    spec = QuantSpec("gptq", bits=4, group_size=128)
    params = quantize_model(model, spec, calibration_tokens(...))
    save_quantized(model, params, spec, "out/")

Only the per-layer projections (q, k, v, o, gate, up, down) are quantized; embeddings, norms and lm_head stay in
the model's dtype, as AutoGPTQ / AutoAWQ / llm-compressor do by default. `quantize_model` returns the params
with `QuantizedWeight` leaves, so the quantized model also runs directly in jaxswift.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxswift.checkpoints.safetensors_io import write_safetensors
from jaxswift.errors import ConfigError
from jaxswift.models.config import ModelConfig, config_to_hf
from jaxswift.models.families import weight_maps
from jaxswift.quant import awq, gptq
from jaxswift.quant.calibration import INPUT_GROUPS, flat_weight, quantize_layer_by_layer
from jaxswift.quant.compressed_tensors import compressed_tensors_config, int8_quantize, to_compressed_tensors
from jaxswift.quant.fp8 import fp8_quantize
from jaxswift.quant.qweight import LINEAR_KEYS, QuantizedWeight, flat_shape, input_axes, stack_layers

METHODS = ("gptq", "awq", "fp8", "int8")
BITS = {"gptq": (4, 8), "awq": (4,), "fp8": (8,), "int8": (8,)}
CALIBRATED = ("gptq", "awq")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    method: str
    bits: int = 4
    group_size: int = 128  # gptq / awq; -1: one group per output channel
    desc_act: bool = False  # gptq act-order
    sym: bool = True  # gptq
    per_channel: bool = True  # fp8: per output channel, else per tensor (int8 is always per channel)


def check_spec(spec: QuantSpec, cfg: ModelConfig) -> None:
    """Clear errors for a method/bits/group size that cannot work, before any calibration runs."""
    if spec.method not in METHODS:
        raise ConfigError(f"--quant_method {spec.method!r} is not an export method; choose one of "
                          f"{', '.join(METHODS)}")
    gptq.check_bits(spec.bits, spec.method, BITS[spec.method])
    if spec.method not in CALIBRATED:
        return
    dims = {"hidden_size": cfg.hidden_size, "num_heads * head_dim": cfg.num_heads * cfg.head_dim,
            "intermediate_size": cfg.intermediate_size}
    for name, dim in dims.items():
        if spec.group_size != -1 and (spec.group_size <= 0 or dim % spec.group_size):
            raise ConfigError(f"--group_size {spec.group_size} does not divide the model's {name} ({dim}), an input "
                              "dimension of its projections; use a common divisor or -1 (per channel)")
    per_word = 32 // spec.bits  # zeros (and AWQ's weights) are packed along the outputs
    outputs = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim)
    if any(d % per_word for d in outputs):
        raise ConfigError(f"{spec.method} packs {per_word} outputs per int32, so every projection's output size "
                          f"must be a multiple of {per_word}; this model's are {sorted(set(outputs))}")


def _flat(w: np.ndarray, key: str) -> np.ndarray:
    return flat_weight(np.asarray(w, np.float32), key)


def _split_outputs(q: QuantizedWeight, layer: dict, keys: tuple[str, ...]) -> dict[str, QuantizedWeight]:
    """One leaf per weight from a leaf quantized with the weights' outputs concatenated."""
    out, start = {}, 0
    for key in keys:
        width = flat_shape(layer[key].shape, input_axes(key))[1]
        cut = slice(start, start + width)
        out[key] = QuantizedWeight(q.codes[:, cut], q.scale[:, cut], None if q.zero is None else q.zero[:, cut],
                                   q.g_idx, tuple(layer[key].shape))
        start += width
    return out


def _gptq_layer(spec: QuantSpec):
    def quantize(i: int, layer: dict, inputs: dict):
        done = dict(layer)
        for keys in INPUT_GROUPS:
            x = inputs[keys[0]]
            hessian = (2.0 / x.shape[0]) * (x.T @ x)
            w = np.concatenate([_flat(layer[k], k) for k in keys], axis=1)
            q = gptq.gptq_quantize(w, hessian, bits=spec.bits, group_size=spec.group_size, sym=spec.sym,
                                   desc_act=spec.desc_act, where=f"layer {i} {'/'.join(keys)}")
            done.update(_split_outputs(q, layer, keys))
        return done, done
    return quantize


def _round_to_nearest(params: dict, cfg: ModelConfig, spec: QuantSpec) -> list[dict]:
    layers = []
    for i in range(cfg.num_layers):
        layer = jax.tree.map(lambda a: np.asarray(a[i], np.float32), params["layers"])
        for k in LINEAR_KEYS:
            w, shape = _flat(layer[k], k), layer[k].shape
            layer[k] = fp8_quantize(w, per_channel=spec.per_channel, shape=shape) if spec.method == "fp8" \
                else int8_quantize(w, shape=shape)
        layers.append(layer)
    return layers


def quantize_model(model, spec: QuantSpec, calibration: np.ndarray | None = None) -> dict:
    """params with QuantizedWeight leaves (stacked over layers); GPTQ / AWQ need calibration tokens [B, T]."""
    cfg = model.config
    check_spec(spec, cfg)
    if spec.method in CALIBRATED:
        if calibration is None or np.size(calibration) == 0:
            raise ConfigError(f"--quant_method {spec.method} needs calibration data: pass --dataset FILE")
        run = _gptq_layer(spec) if spec.method == "gptq" else \
            awq.layer_quantizer(cfg, spec.bits, spec.group_size, np.shape(calibration))
        layers = quantize_layer_by_layer(model.params, cfg, np.asarray(calibration), run)
    else:
        layers = _round_to_nearest(model.params, cfg, spec)
    stacked = {k: stack_layers([layer[k] for layer in layers]) if k in LINEAR_KEYS else
               jnp.asarray(np.stack([np.asarray(layer[k]) for layer in layers]), cfg.weight_dtype)
               for k in layers[0]}
    return {**model.params, "layers": stacked}


# ---------------------------------------------------------------- writing

def quantization_config(spec: QuantSpec) -> dict:
    if spec.method == "gptq":
        return gptq.gptq_config(spec.bits, spec.group_size, spec.desc_act, spec.sym)
    if spec.method == "awq":
        return awq.awq_config(spec.bits, spec.group_size)
    return compressed_tensors_config("float" if spec.method == "fp8" else "int",
                                     "channel" if spec.per_channel or spec.method == "int8" else "tensor")


def _linear_tensors(q: QuantizedWeight, spec: QuantSpec) -> dict[str, np.ndarray]:
    q = jax.tree.map(np.asarray, q)
    if spec.method == "gptq":
        return gptq.to_gptq_tensors(q, spec.bits)
    if spec.method == "awq":
        return awq.to_awq_tensors(q, spec.bits)
    return to_compressed_tensors(q, "channel" if spec.per_channel or spec.method == "int8" else "tensor")


def quantized_tensors(params: dict, cfg: ModelConfig, spec: QuantSpec) -> dict[str, np.ndarray]:
    """{hf_name: array}: the quantized linears in the method's layout, everything else as save_hf writes it."""
    out = {}
    for m in weight_maps(cfg):
        node = params
        for key in m.path:
            node = node[key]
        if m.path[-1] in LINEAR_KEYS:
            for i in range(cfg.num_layers):
                prefix = m.hf_name.format(i=i).removesuffix(".weight")
                one = jax.tree.map(lambda a: a[i], node)
                out.update({f"{prefix}.{name}": t for name, t in _linear_tensors(one, spec).items()})
            continue
        array = np.asarray(jax.device_get(node))
        names = [m.hf_name.format(i=i) for i in range(cfg.num_layers)] if m.per_layer else [m.hf_name]
        for i, name in enumerate(names):
            out[name] = np.ascontiguousarray(m.to_hf(array[i] if m.per_layer else array))
    return out


def save_quantized(model, params: dict, spec: QuantSpec, out_dir: str | Path) -> Path:
    """config.json with `quantization_config`, model.safetensors, generation config and tokenizer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    write_safetensors(out / "model.safetensors", quantized_tensors(params, cfg, spec), {"format": "pt"})
    config = config_to_hf(cfg)
    config["quantization_config"] = quantization_config(spec)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_ids) or None}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(out))
    return out
