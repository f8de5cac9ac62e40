"""FP8 (e4m3) weights: w = float8(w / scale) * scale with scale = amax / 448, per tensor or per output channel.

Written in the compressed-tensors "float-quantized" layout (see `jaxswift.quant.compressed_tensors`), which vLLM
serves and transformers loads (on CPU it decompresses through the compressed-tensors package).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from jaxswift.quant.qweight import QuantizedWeight

E4M3_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448


def fp8_quantize(w_IO: np.ndarray, *, per_channel: bool, shape: tuple | None = None) -> QuantizedWeight:
    """codes float8_e4m3fn [I, O]; scale [1, O] float32 (one value repeated when per tensor)."""
    w = np.asarray(w_IO, np.float32)
    amax = np.abs(w).max(axis=0) if per_channel else np.full(w.shape[1], np.abs(w).max(), np.float32)
    scale = np.maximum(amax / E4M3_MAX, np.finfo(np.float32).tiny)[None, :].astype(np.float32)
    codes = np.clip(w / scale, -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)
    return QuantizedWeight(codes, scale, None, np.zeros(w.shape[0], np.int32), shape or w.shape)
