"""The compressed-tensors layouts we write for FP8 ("float-quantized") and int8 ("int-quantized") weights.

One linear: `weight` [O, I] (float8_e4m3fn or int8, the HF orientation) and `weight_scale` float32, [O, 1] per
channel or [1] per tensor; symmetric, so no zero point: w = weight * weight_scale. config.json carries
`quantization_config` {quant_method: compressed-tensors, format, config_groups: {group_0: {targets: [Linear],
weights: {num_bits: 8, type: float|int, strategy: channel|tensor, symmetric: true}}}, ignore: [lm_head]}.
vLLM serves both; transformers loads both on CPU through the `compressed-tensors` package, which decompresses them.

int8 is per output channel: scale = amax / 127, codes = round(w / scale) in [-127, 127] (weight-only, W8A16).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from jaxswift.errors import CheckpointError
from jaxswift.quant.qweight import QuantizedWeight

FORMATS = {"float": "float-quantized", "int": "int-quantized"}


def int8_quantize(w_IO: np.ndarray, *, shape: tuple | None = None) -> QuantizedWeight:
    """Symmetric per-output-channel int8: codes int8 [I, O], scale [1, O]."""
    w = np.asarray(w_IO, np.float32)
    scale = np.maximum(np.abs(w).max(axis=0) / 127.0, np.finfo(np.float32).tiny)[None, :].astype(np.float32)
    codes = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    return QuantizedWeight(codes, scale, None, np.zeros(w.shape[0], np.int32), shape or w.shape)


def to_compressed_tensors(q: QuantizedWeight, strategy: str) -> dict[str, np.ndarray]:
    scale = np.asarray(q.scale, np.float32)[0]
    return {"weight": np.ascontiguousarray(np.asarray(q.codes).T),
            "weight_scale": scale[:1].copy() if strategy == "tensor" else scale[:, None].copy()}


def from_compressed_tensors(tensors: dict[str, np.ndarray], shape: tuple, where: str) -> QuantizedWeight:
    weight, scale = tensors["weight"], np.asarray(tensors["weight_scale"], np.float32)
    if weight.dtype not in (np.int8, np.dtype(ml_dtypes.float8_e4m3fn)):
        raise CheckpointError(f"{where}: weight has dtype {weight.dtype}; we read int8 and float8_e4m3fn")
    O, I = weight.shape
    if scale.size not in (1, O):
        raise CheckpointError(f"{where}: weight_scale has shape {scale.shape}; expected [1] (tensor) or [{O}, 1] "
                              "(channel); group strategies are not supported")
    scale = np.broadcast_to(scale.reshape(1, -1), (1, O)).astype(np.float32)
    return QuantizedWeight(np.ascontiguousarray(weight.T), scale, None, np.zeros(I, np.int32), shape)


def compressed_tensors_config(kind: str, strategy: str) -> dict:
    weights = {"num_bits": 8, "type": kind, "strategy": strategy, "symmetric": True, "dynamic": False,
               "group_size": None, "observer": "minmax"}
    return {"quant_method": "compressed-tensors", "format": FORMATS[kind], "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "format": FORMATS[kind],
                                          "input_activations": None, "output_activations": None}},
            "ignore": ["lm_head"]}
