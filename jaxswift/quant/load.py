"""Quantized HF folders (GPTQ, AWQ GEMM, compressed-tensors FP8 / int8) -> params with `QuantizedWeight` leaves.

`load_model` calls `load_quantized_params` when config.json has a `quantization_config`; each quantized linear
becomes a leaf that dequantizes inside the matmul (`jaxswift.quant.qweight`), stacked over layers like the float
weights. Linears a checkpoint left in float (its ignore list) load as plain arrays.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxswift.checkpoints.hf import dense_leaf, set_path
from jaxswift.checkpoints.safetensors_io import iter_folder_tensors
from jaxswift.errors import CheckpointError, ConfigError
from jaxswift.models.config import ModelConfig
from jaxswift.models.families import weight_maps
from jaxswift.quant.awq import from_awq_tensors
from jaxswift.quant.compressed_tensors import FORMATS, from_compressed_tensors
from jaxswift.quant.gptq import from_gptq_tensors
from jaxswift.quant.qweight import LINEAR_KEYS, stack_layers

READABLE = "gptq (bits 4/8, format gptq), awq (bits 4, version gemm), compressed-tensors (8-bit float/int-quantized)"


def _check(ok: bool, where: str, message: str):
    if not ok:
        raise CheckpointError(f"{where}: quantization_config {message}; jaxswift reads {READABLE}")


def check_quantization_config(qc: dict, where: str) -> dict:
    """The validated config; raises CheckpointError naming the field we cannot read."""
    _check(isinstance(qc, dict), where, "is not an object")
    method = qc.get("quant_method")
    if method == "gptq":
        _check(qc.get("bits") in (4, 8), where, f"bits {qc.get('bits')!r} is not 4 or 8")
        _check(qc.get("checkpoint_format", "gptq") in ("gptq", "gptq_v2"), where,
               f"checkpoint_format {qc.get('checkpoint_format')!r} is not gptq or gptq_v2")
    elif method == "awq":
        _check(qc.get("bits", 4) == 4, where, f"bits {qc.get('bits')!r} is not 4")
        _check(str(qc.get("version", "gemm")).lower() == "gemm", where, f"version {qc.get('version')!r} is not gemm")
        _check(isinstance(qc.get("group_size"), int), where, "has no integer group_size")
    elif method == "compressed-tensors":
        _check(qc.get("format") in FORMATS.values(), where, f"format {qc.get('format')!r} is not one we read")
        for name, group in (qc.get("config_groups") or {}).items():
            weights = group.get("weights") or {}
            _check(weights.get("num_bits") == 8 and weights.get("strategy") in ("tensor", "channel"), where,
                   f"config_groups.{name}.weights ({weights}) is not 8 bits per tensor or channel")
    else:
        _check(False, where, f"quant_method {method!r} is not supported")
    return qc


def _linear_leaf(tensors: dict, prefix: str, qc: dict, shape: tuple, where: str):
    """The leaf of one linear ({suffix: array} of `prefix`), or its float weight in our layout."""
    method = qc["quant_method"]
    if "qweight" in tensors and method == "gptq":
        q = from_gptq_tensors(tensors, qc["bits"], shape, where)
        if qc.get("checkpoint_format") == "gptq_v2":  # v2 stores true zeros: undo the v1 + 1
            q = q.replace(zero=(q.zero - 1) % (2 ** qc["bits"]))
        return q
    if "qweight" in tensors and method == "awq":
        return from_awq_tensors(tensors, 4, qc["group_size"], shape, where)
    if "weight_scale" in tensors and method == "compressed-tensors":
        return from_compressed_tensors(tensors, shape, where)
    if set(tensors) == {"weight"}:  # left in float by the checkpoint
        return np.asarray(tensors["weight"], np.float32).T.reshape(shape)
    raise CheckpointError(f"{where}: tensors {sorted(tensors)} of {prefix} fit no {method} layout")


def load_quantized_params(folder: str | Path, cfg: ModelConfig, quantization_config: dict, shardings=None) -> dict:
    """params for `cfg` from a quantized HF folder; non-linear tensors are converted to cfg's dtype."""
    folder = Path(folder)
    if shardings is not None:
        raise ConfigError(f"{folder}: quantized checkpoints load onto one device for now (no shardings)")
    qc = check_quantization_config(quantization_config, str(folder / "config.json"))
    tensors = {name: array for name, array, _ in iter_folder_tensors(folder)}
    params: dict = {}
    for m in weight_maps(cfg):
        names = [m.hf_name.format(i=i) for i in range(cfg.num_layers)] if m.per_layer else [m.hf_name]
        if m.path[-1] in LINEAR_KEYS:
            leaves = []
            for name in names:
                prefix = name.removesuffix(".weight")
                parts = {n[len(prefix) + 1:]: a for n, a in tensors.items() if n.startswith(prefix + ".")}
                leaves.append(_linear_leaf(parts, prefix, qc, _our_shape(cfg, m.path[-1]), f"{folder}: {prefix}"))
            value = _stack(leaves, f"{folder}: {m.hf_name}")
        else:
            value = dense_leaf(tensors, names, m, cfg, str(folder))
        set_path(params, m.path, value)
    if not any(hasattr(leaf, "apply") for leaf in params["layers"].values()):
        raise CheckpointError(f"{folder / 'config.json'}: quantization_config says quant_method "
                              f"{qc['quant_method']!r}, but every linear weight is a plain float tensor (no qweight / "
                              "weight_scale): remove quantization_config, or point at the quantized folder")
    return jax.tree.map(jnp.asarray, params)


def _stack(leaves: list, where: str):
    floats = [isinstance(leaf, np.ndarray) for leaf in leaves]
    if all(floats):
        return jnp.asarray(np.stack(leaves))
    if any(floats):
        raise CheckpointError(f"{where}: quantized in some layers and float in others; jaxswift stacks layers and "
                              "needs one kind per projection")
    return stack_layers(leaves)


def _our_shape(cfg: ModelConfig, key: str) -> tuple[int, ...]:
    from jaxswift.models.spec import param_specs

    return tuple(param_specs(cfg)["layers"][key].shape[1:])
