"""A quantized linear weight as a params leaf that dequantizes inside the matmul.

Every exported format (GPTQ, AWQ, FP8, int8) loads into the same leaf. The codes are kept in our layout flattened
to two axes, inputs first: [I, O] with I the product of the contracted axes (D, or N*H for wo) and O the product of
the output axes, i.e. the transpose of the HF (out, in) weight. Weight row i belongs to group `g_idx[i]`:

    w[i, o] = (codes[i, o] - zero[g_idx[i], o]) * scale[g_idx[i], o]

with zero = None for symmetric formats that store signed codes (int8, FP8). Stacked per-layer weights carry a
leading L axis on every array; `jax.lax.scan` slices it off like any other leaf.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxswift.errors import ConfigError
from jaxswift.models.transformer import linear

LINEAR_KEYS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")  # the per-layer matmul weights we quantize


@struct.dataclass
class QuantizedWeight:
    codes: Any  # [.., I, O] int8 / uint8 integer codes, or float8_e4m3fn
    scale: Any  # [.., G, O] float32
    zero: Any  # [.., G, O] float32 (integer-valued zero points) or None
    g_idx: Any  # [.., I] int32: the group of each input row
    shape: tuple = struct.field(pytree_node=False)  # the float weight's per-layer shape in our layout

    def dequantize(self, dtype=jnp.float32):
        """The float weight in our per-layer layout (with the leading L axis when stacked)."""
        scale = jnp.take_along_axis(self.scale, self.g_idx[..., None], axis=-2)
        values = self.codes.astype(jnp.float32)
        if self.zero is not None:
            values = values - jnp.take_along_axis(self.zero, self.g_idx[..., None], axis=-2)
        w = values * scale
        return w.reshape(*w.shape[:-2], *self.shape).astype(dtype)

    def apply(self, equation: str, x):
        return linear(equation, x, self.dequantize(x.dtype))


def flat_shape(shape: tuple[int, ...], n_in: int) -> tuple[int, int]:
    """(I, O) of a weight whose first n_in axes are contracted."""
    return math.prod(shape[:n_in]), math.prod(shape[n_in:])


def input_axes(key: str) -> int:
    """How many leading axes of our per-layer weight `key` the matmul contracts (wo: N and H)."""
    return 2 if key == "wo" else 1


def contiguous_groups(in_features: int, group_size: int, where: str) -> np.ndarray:
    """g_idx for groups of consecutive rows; group_size -1 means one group (per output channel)."""
    if group_size == -1:
        return np.zeros(in_features, np.int32)
    if group_size <= 0 or in_features % group_size:
        raise ConfigError(f"{where}: --group_size {group_size} does not divide the input dimension {in_features} "
                          f"(use a divisor of {in_features}, or -1 for one group per output channel)")
    return (np.arange(in_features) // group_size).astype(np.int32)


def stack_layers(per_layer: list[QuantizedWeight]) -> QuantizedWeight:
    """One stacked leaf [L, ...] from per-layer leaves of the same format."""
    first = per_layer[0]
    stack = lambda name: None if getattr(first, name) is None else jnp.stack(  # noqa: E731
        [jnp.asarray(getattr(q, name)) for q in per_layer])
    return QuantizedWeight(stack("codes"), stack("scale"), stack("zero"), stack("g_idx"), first.shape)


def is_quantized(x) -> bool:
    return isinstance(x, QuantizedWeight)
