"""AWQ (Lin et al. 2023, as AutoAWQ does it): activation-aware input-channel scales searched on the output of the
block each group of weights feeds, a clip search, and the GEMM checkpoint layout.

Per decoder layer, on the float layer's calibration inputs, four groups of weights share an input and get one
scale s per input channel, folded into the op that produces that input so the float model is unchanged:

    weights            scale folded into                  loss measured on
    q, k, v            attn_norm (/ s)                    the attention block's output (after o)
    o                  v's outputs (/ s)                  o's output
    gate, up           mlp_norm (/ s)                     the MLP's output (after down)
    down               up's outputs (/ s)                 down's output

s = mean|x|^a / (mean|w|^(1-a) + 1e-4) (w normalised by its group's max |w|), divided by sqrt(max s * min s), for
a in {0, 1/20, ..., 19/20}; the a whose block output, computed with the weights quantize(w * s) / s, has the
smallest squared error against the float block wins. Under grouped-query attention the query heads sharing a kv
head share o's input scales (the mean of their statistics), so they fold into that kv head's v (AutoAWQ skips o
there). Then each (output, group) of v, o, gate, up and down is clipped to the max |w| * (1 - k/20), k < 10, whose
quantized partial output errs least on a subsample of the tokens (not q/k, whose errors the attention softmax
amplifies). Quantization is asymmetric min-max per group: zero = -round(min / scale).

Checkpoint layout (AutoAWQ / vLLM "awq", version "gemm"): qweight int32 [I, O / 8] packed along the output in the
order [0, 2, 4, 6, 1, 3, 5, 7], qzeros int32 [G, O / 8] packed the same way (true zeros), scales float16 [G, O].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxswift.errors import CheckpointError
from jaxswift.models.config import ModelConfig
from jaxswift.models.transformer import feed_forward, linear, project_qkv, self_attention
from jaxswift.quant.calibration import INPUT_GROUPS, flat_weight, sequence_positions, subsample_rows
from jaxswift.quant.gptq import check_bits
from jaxswift.quant.packing import pack_int32, unpack_int32
from jaxswift.quant.qweight import LINEAR_KEYS, QuantizedWeight, contiguous_groups

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
GRID = 20
MAX_SHRINK = 0.5
CLIP_TOKENS = 512  # calibration tokens used by the clip search (AutoAWQ's n_sample_token)
SCALE_SEQUENCES = 16  # calibration windows (evenly strided) the scale search runs its blocks on, to bound its cost
CLIPPED = ("wv", "wo", "w_gate", "w_up", "w_down")


def scale_groups(cfg: ModelConfig):
    """(weights, op the scale folds into, block whose output is the loss, query heads sharing one scale)."""
    return ((("wq", "wk", "wv"), "attn_norm", "attention", 1),
            (("wo",), "wv", "wo", cfg.num_heads // cfg.num_kv_heads),
            (("w_gate", "w_up"), "mlp_norm", "mlp", 1),
            (("w_down",), "w_up", "w_down", 1))


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
    codes = jnp.clip(jnp.round(_grouped(w_IO, group_size) / scale[:, None]) + zero[:, None], 0, 2 ** bits - 1)
    return codes.reshape(w_IO.shape), scale, zero


def fake_quantize(w_IO, bits: int, group_size: int):
    codes, scale, zero = _codes(w_IO, bits, group_size)
    return ((_grouped(codes, group_size) - zero[:, None]) * scale[:, None]).reshape(w_IO.shape)


def awq_quantize(w_IO: np.ndarray, *, bits: int, group_size: int, shape: tuple | None = None,
                 where: str = "awq") -> QuantizedWeight:
    check_bits(bits, "awq", (4,))
    g_idx = contiguous_groups(w_IO.shape[0], group_size, where)
    codes, scale, zero = _codes(jnp.asarray(w_IO, jnp.float32), bits, group_size)
    return QuantizedWeight(np.asarray(codes, np.uint8), np.asarray(scale), np.asarray(zero), g_idx,
                           shape or w_IO.shape)


# ---------------------------------------------------------------- scale search

def block_output(block: str, layer: dict, x_BTI, cfg: ModelConfig, window: int):
    """The output of `block` of a float layer ("attention": q/k/v -> attention -> o, "mlp": gate/up -> down, or one
    linear "wo" / "w_down") given that block's input."""
    if block == "attention":
        B, T = x_BTI.shape[:2]
        positions, segments = sequence_positions(B, T)
        q, k, v = project_qkv(x_BTI, layer, cfg, positions)
        return linear("BTNH,NHD->BTD", self_attention(q, k, v, positions, segments, window), layer["wo"])
    if block == "mlp":
        return feed_forward(x_BTI, layer, cfg)[0]
    if block == "wo":
        return linear("BTNH,NHD->BTD", x_BTI.reshape(*x_BTI.shape[:2], cfg.num_heads, cfg.head_dim), layer["wo"])
    return linear("BTF,FD->BTD", x_BTI, layer[block])


def _share_over_heads(v_I, heads_per_scale: int, head_dim: int):
    """Channel statistics averaged over the query heads that share one kv head's scale (identity for 1)."""
    if heads_per_scale == 1:
        return v_I
    per_kv = v_I.reshape(-1, heads_per_scale, head_dim).mean(axis=1, keepdims=True)
    return jnp.broadcast_to(per_kv, (per_kv.shape[0], heads_per_scale, head_dim)).reshape(v_I.shape)


def group_normalised_magnitude(w_IO, group_size: int):
    """[I]: mean over outputs of |w| / (its group's max |w| + 1e-6), AutoAWQ's w_mean."""
    groups = jnp.abs(_grouped(w_IO, group_size))
    return (groups / (groups.max(axis=1, keepdims=True) + 1e-6)).reshape(w_IO.shape).mean(axis=1)


def candidate_scale(x_mean, w_mean, ratio):
    s = jnp.maximum(x_mean ** ratio / (w_mean ** (1 - ratio) + 1e-4), 1e-4)
    return s / jnp.sqrt(s.max() * s.min())


def _with_weights(layer: dict, keys: tuple[str, ...], w_IO) -> dict:
    """layer with the weights `keys` replaced by consecutive output slices of w [I, sum O]."""
    out, start = dict(layer), 0
    for key in keys:
        width = flat_weight(layer[key], key).shape[1]
        out[key] = w_IO[:, start:start + width].reshape(layer[key].shape)
        start += width
    return out


@functools.partial(jax.jit, static_argnames=("keys", "block", "heads_per_scale", "bits", "group_size", "cfg",
                                             "window"))
def search_scale(layer: dict, x_BTI, *, keys: tuple[str, ...], block: str, heads_per_scale: int, bits: int,
                 group_size: int, cfg: ModelConfig, window: int):
    """(s [I], errors [GRID]): the input-channel scale whose quantize(w * s) / s gives `block` the smallest squared
    output error on x, and the error of every ratio on the grid."""
    w_IO = jnp.concatenate([flat_weight(layer[k], k) for k in keys], axis=1)
    x_mean = _share_over_heads(jnp.abs(x_BTI).reshape(-1, w_IO.shape[0]).mean(axis=0), heads_per_scale,
                               cfg.head_dim)
    w_mean = _share_over_heads(group_normalised_magnitude(w_IO, group_size), heads_per_scale, cfg.head_dim)
    reference = block_output(block, layer, x_BTI, cfg, window)

    def error(ratio):
        s = candidate_scale(x_mean, w_mean, ratio)
        w_q = fake_quantize(w_IO * s[:, None], bits, group_size) / s[:, None]
        out = block_output(block, _with_weights(layer, keys, w_q), x_BTI, cfg, window)
        return jnp.mean((out - reference) ** 2), s

    errors, scales = jax.lax.map(error, jnp.arange(GRID, dtype=jnp.float32) / GRID)
    return scales[jnp.argmin(errors)], errors


def fold_scale(layer: dict, keys: tuple[str, ...], into: str, s_I: np.ndarray, cfg: ModelConfig) -> dict:
    """The float layer computing the same function with the rows of `keys` multiplied by s and the op before them
    (a norm's weight, or the outputs, and bias, of v / up) divided by s."""
    out = dict(layer)
    for key in keys:
        out[key] = (flat_weight(layer[key], key) * s_I[:, None]).reshape(layer[key].shape)
    if into == "wv":  # o's scales are shared by the query heads of a kv head: one per v output
        s_I = s_I.reshape(cfg.num_kv_heads, -1, cfg.head_dim)[:, 0].reshape(-1)
        if "bv" in layer:
            out["bv"] = layer["bv"] / s_I.reshape(layer["bv"].shape)
    if into in ("wv", "w_up"):
        out[into] = (flat_weight(layer[into], into) / s_I[None, :]).reshape(layer[into].shape)
    else:
        out[into] = layer[into] / s_I
    return out


# ---------------------------------------------------------------- clip search

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


# ---------------------------------------------------------------- one layer

def layer_quantizer(cfg: ModelConfig, bits: int, group_size: int, batch_shape: tuple[int, int]):
    """The `quantize_layer(i, float_layer, inputs) -> (exported_layer, layer_to_run)` of calibration's
    `quantize_layer_by_layer` for AWQ; batch_shape is (B, T) of the calibration tokens.

    The scale searches run on up to SCALE_SEQUENCES of the windows, the clip search on CLIP_TOKENS of their tokens;
    the next layer runs on the float layer with the scales folded in and the clipped weights."""
    check_bits(bits, "awq", (4,))
    shared_input = {k: group[0] for group in INPUT_GROUPS for k in group}

    def quantize(i: int, layer: dict, inputs: dict):
        layer = {k: jnp.asarray(v, jnp.float32) for k, v in layer.items()}
        window = cfg.window_per_layer[i]
        x_in = {k: jnp.asarray(inputs[shared_input[k]]) for k in LINEAR_KEYS}
        for keys, into, block, heads_per_scale in scale_groups(cfg):
            x_BTI = subsample_rows(x_in[keys[0]].reshape(*batch_shape, -1), SCALE_SEQUENCES)
            s, _ = search_scale(layer, x_BTI, keys=keys, block=block, heads_per_scale=heads_per_scale, bits=bits,
                                group_size=group_size, cfg=cfg, window=window)
            layer = fold_scale(layer, keys, into, s, cfg)
            x_in.update({k: x_in[k] / s[None, :] for k in keys})
        for k in CLIPPED:
            clipped = search_clip(subsample_rows(x_in[k], CLIP_TOKENS), flat_weight(layer[k], k), bits=bits,
                                  group_size=group_size)
            layer[k] = clipped.reshape(layer[k].shape)
        to_run = {k: np.asarray(v) for k, v in layer.items()}
        done = dict(to_run, **{k: awq_quantize(flat_weight(to_run[k], k), bits=bits, group_size=group_size,
                                               shape=to_run[k].shape, where=f"layer {i} {k}") for k in LINEAR_KEYS})
        return done, to_run
    return quantize


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
