"""AWQ (Lin et al. 2023): activation-aware per-input-channel scales, a clip search, and the GEMM checkpoint layout.

For weights sharing an input x (q/k/v after the attention norm, gate/up after the MLP norm, down after up):
s = mean|x|^a / mean|w|^(1-a) (w normalised by its group max), divided by sqrt(max s * min s), for a in
{0, 1/20, ..., 19/20}; the a whose quantized (w * s) / s gives the smallest squared error of x @ w wins. The scale
is folded into the op before (norm weight / s, or up's outputs / s), the weight rows multiplied by s, so the float
model is unchanged. Then for each output and group the clip max |w| * (1 - k/20), k < 10, with the smallest error of
that group's partial output is applied (not to q/k, whose errors the attention softmax amplifies). The o
projection is clipped but not rescaled (its input is v's output, which does not match it under grouped-query
attention). Quantization is asymmetric min-max per group: zero = -round(min / scale).

Checkpoint layout (AutoAWQ / vLLM "awq", version "gemm"): qweight int32 [I, O / 8] packed along the output in the
order [0, 2, 4, 6, 1, 3, 5, 7], qzeros int32 [G, O / 8] packed the same way (true zeros), scales float16 [G, O].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxswift.errors import CheckpointError
from jaxswift.quant.gptq import check_bits
from jaxswift.quant.packing import pack_int32, unpack_int32
from jaxswift.quant.qweight import QuantizedWeight, contiguous_groups

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
GRID = 20
MAX_SHRINK = 0.5
SEARCH_TOKENS = 512  # calibration tokens used by the searches (AutoAWQ's n_sample_token)


def _grouped(w_IO, group_size: int):
    """[I, O] -> [G, gs, O]."""
    I, O = w_IO.shape
    gs = I if group_size == -1 else group_size
    return w_IO.reshape(I // gs, gs, O)


def awq_params(w_IO, bits: int, group_size: int):
    """Per group and output: float16-exact scale [G, O] and zero [G, O], AWQ's asymmetric min-max."""
    groups = _grouped(w_IO, group_size)
    high, low = groups.max(axis=1), groups.min(axis=1)
    maxq = 2 ** bits - 1
    scale = (jnp.maximum(high - low, 1e-5) / maxq).astype(jnp.float16).astype(jnp.float32)
    return scale, jnp.clip(-jnp.round(low / scale), 0, maxq)


def _codes(w_IO, bits: int, group_size: int):
    scale, zero = awq_params(w_IO, bits, group_size)
    gs = w_IO.shape[0] if group_size == -1 else group_size
    codes = jnp.clip(jnp.round(_grouped(w_IO, group_size) / scale[:, None]) + zero[:, None], 0, 2 ** bits - 1)
    return codes.reshape(w_IO.shape), scale, zero, gs


def fake_quantize(w_IO, bits: int, group_size: int):
    codes, scale, zero, gs = _codes(w_IO, bits, group_size)
    return ((_grouped(codes, group_size) - zero[:, None]) * scale[:, None]).reshape(w_IO.shape)


def awq_quantize(w_IO: np.ndarray, *, bits: int, group_size: int, shape: tuple | None = None,
                 where: str = "awq") -> QuantizedWeight:
    check_bits(bits, "awq", (4,))
    g_idx = contiguous_groups(w_IO.shape[0], group_size, where)
    codes, scale, zero, _ = _codes(jnp.asarray(w_IO, jnp.float32), bits, group_size)
    return QuantizedWeight(np.asarray(codes, np.uint8), np.asarray(scale), np.asarray(zero), g_idx,
                           shape or w_IO.shape)


@functools.partial(jax.jit, static_argnames=("bits", "group_size"))
def search_scale(x_NI, w_IO, *, bits: int, group_size: int):
    """The input-channel scale s [I] with the smallest output error of quantize(w * s) / s."""
    x_mean = jnp.abs(x_NI).mean(axis=0)
    groups = jnp.abs(_grouped(w_IO, group_size))
    w_mean = (groups / jnp.maximum(groups.max(axis=1, keepdims=True), 1e-12)).reshape(w_IO.shape).mean(axis=1)
    reference = x_NI @ w_IO

    def error(ratio):
        s = jnp.maximum(x_mean ** ratio / jnp.maximum(w_mean, 1e-4) ** (1 - ratio), 1e-4)
        s = s / jnp.sqrt(s.max() * s.min())
        w_q = fake_quantize(w_IO * s[:, None], bits, group_size) / s[:, None]
        return jnp.mean((x_NI @ w_q - reference) ** 2), s

    errors, scales = jax.lax.map(error, jnp.arange(GRID, dtype=jnp.float32) / GRID)
    return scales[jnp.argmin(errors)]


@functools.partial(jax.jit, static_argnames=("bits", "group_size"))
def search_clip(x_NI, w_IO, *, bits: int, group_size: int):
    """w with each (group, output) clipped to the max |w| whose quantized partial output errs least."""
    groups = _grouped(w_IO, group_size)  # [G, gs, O]
    x_groups = x_NI.reshape(x_NI.shape[0], groups.shape[0], groups.shape[1])  # [N, G, gs]
    reference = jnp.einsum("NGC,GCO->GNO", x_groups, groups)
    original_max = jnp.abs(groups).max(axis=1, keepdims=True)  # [G, 1, O]

    def error(shrink):
        max_value = original_max * (1 - shrink)
        clipped = jnp.clip(groups, -max_value, max_value)
        w_q = fake_quantize(clipped.reshape(w_IO.shape), bits, group_size).reshape(groups.shape)
        return jnp.mean((jnp.einsum("NGC,GCO->GNO", x_groups, w_q) - reference) ** 2, axis=1, keepdims=True)

    shrinks = jnp.arange(int(GRID * MAX_SHRINK), dtype=jnp.float32) / GRID
    errors = jax.lax.map(error, shrinks)  # [K, G, 1, O]
    best_max = original_max * (1 - shrinks[jnp.argmin(errors, axis=0)])
    return jnp.clip(groups, -best_max, best_max).reshape(w_IO.shape)


# ---------------------------------------------------------------- checkpoint layout

def to_awq_tensors(q: QuantizedWeight, bits: int = 4) -> dict[str, np.ndarray]:
    return {
        "qweight": pack_int32(np.asarray(q.codes), bits, axis=1, order=AWQ_ORDER),
        "qzeros": pack_int32(np.asarray(q.zero).astype(np.int64), bits, axis=1, order=AWQ_ORDER),
        "scales": np.asarray(q.scale).astype(np.float16),
    }


def from_awq_tensors(tensors: dict[str, np.ndarray], bits: int, group_size: int, shape: tuple,
                     where: str) -> QuantizedWeight:
    codes = unpack_int32(tensors["qweight"], bits, axis=1, order=AWQ_ORDER)
    zero = unpack_int32(tensors["qzeros"], bits, axis=1, order=AWQ_ORDER).astype(np.float32)
    scale = np.asarray(tensors["scales"], np.float32)
    g_idx = contiguous_groups(codes.shape[0], group_size, where)
    if scale.shape != zero.shape or scale.shape[0] != int(g_idx.max()) + 1 or scale.shape[1] != codes.shape[1]:
        raise CheckpointError(f"{where}: AWQ tensors do not agree (qweight unpacks to {codes.shape}, qzeros to "
                         f"{zero.shape}, scales {scale.shape}, group_size {group_size})")
    return QuantizedWeight(codes, scale, zero, g_idx, shape)


def awq_config(bits: int, group_size: int) -> dict:
    return {"quant_method": "awq", "bits": bits, "group_size": group_size, "zero_point": True, "version": "gemm",
            "modules_to_not_convert": None}
