"""The decoder-only transformer as pure functions over a params pytree.

Einsum legend (used everywhere in jaxswift):
  B batch, T query length, S key length, D embed, N query heads, K kv heads, G query heads per kv head,
  H head dim, F mlp hidden, V vocab, E experts, L layers.

Layers are stacked on a leading L axis and run under `jax.lax.scan`, so compile time does not grow with depth.
A weight leaf is either an array or an object with `.apply(equation, x)` (LoRA, quantized weights): see `linear`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxswift.models.config import ModelConfig
from jaxswift.models.hints import constrain
from jaxswift.models.rope import apply_rope

ACT = ("batch", "seq", "embed")
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite, so a fully masked row gives no NaN


class KVCache(NamedTuple):
    """Contiguous per-sequence cache: k/v [L, B, S, K, H]; per-slot positions and segment ids [B, S]."""
    k: jax.Array
    v: jax.Array
    positions: jax.Array
    segment_ids: jax.Array
    index: jax.Array  # next slot to write (scalar int32): all rows advance together


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    dtype = dtype or cfg.compute_dtype
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, max_len), jnp.int32),
                   jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((), jnp.int32))


def linear(equation: str, x: jax.Array, w) -> jax.Array:
    """x @ w by einsum; adapters and quantized weights bring their own `apply`."""
    if hasattr(w, "apply"):
        return w.apply(equation, x)
    return jnp.einsum(equation, x, w.astype(x.dtype))


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def attention_mask(q_pos_BT, q_seg_BT, k_pos_BS, k_seg_BS, window) -> jax.Array:
    """[B, T, S]: same segment, causal by position, and within the sliding window when window > 0."""
    same_segment = q_seg_BT[:, :, None] == k_seg_BS[:, None, :]
    distance = q_pos_BT[:, :, None] - k_pos_BS[:, None, :]
    in_window = (window == 0) | (distance < window)
    return same_segment & (distance >= 0) & in_window


def attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS) -> jax.Array:
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32)
    scores = jnp.where(mask_BTS[:, None, None], scores * H ** -0.5, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BSKH.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v_BSKH)
    return out.reshape(B, T, N, H)


def _qkv(h_BTD, layer, cfg: ModelConfig, positions_BT):
    q = linear("BTD,DNH->BTNH", h_BTD, layer["wq"])
    k = linear("BTD,DKH->BTKH", h_BTD, layer["wk"])
    v = linear("BTD,DKH->BTKH", h_BTD, layer["wv"])
    if cfg.qkv_bias:
        q, k, v = q + layer["bq"].astype(q.dtype), k + layer["bk"].astype(k.dtype), v + layer["bv"].astype(v.dtype)
    if cfg.qk_norm:
        q, k = rms_norm(q, layer["q_norm"], cfg.rms_norm_eps), rms_norm(k, layer["k_norm"], cfg.rms_norm_eps)
    return apply_rope(q, positions_BT, cfg.rope), apply_rope(k, positions_BT, cfg.rope), v


def _mlp(h_BTD, layer):
    gate = linear("BTD,DF->BTF", h_BTD, layer["w_gate"])
    up = linear("BTD,DF->BTF", h_BTD, layer["w_up"])
    return linear("BTF,FD->BTD", jax.nn.silu(gate) * up, layer["w_down"])


def decoder_layer(x_BTD, layer, window, cfg: ModelConfig, positions_BT, segment_ids_BT, kv=None):
    """One block. `kv` = (k_all, v_all, layer_index, cache_positions, cache_segments, write_index) or None.

    With a cache, the new keys/values are written in place into the stacked [L, B, S, K, H] buffers (a loop
    carry, so XLA updates them without copying the whole cache every step).
    """
    h = rms_norm(x_BTD, layer["attn_norm"], cfg.rms_norm_eps)
    q, k, v = _qkv(h, layer, cfg, positions_BT)
    if kv is None:
        mask = attention_mask(positions_BT, segment_ids_BT, positions_BT, segment_ids_BT, window)
        new_kv = None
    else:
        k_all, v_all, i, cache_pos, cache_seg, index = kv
        zero = jnp.zeros((), jnp.int32)
        k_all = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), (i, zero, index, zero, zero))
        v_all = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), (i, zero, index, zero, zero))
        k, v = k_all[i], v_all[i]
        mask = attention_mask(positions_BT, segment_ids_BT, cache_pos, cache_seg, window)
        new_kv = (k_all, v_all)
    attn = attention(q, k.astype(q.dtype), v.astype(q.dtype), mask)
    x_BTD = x_BTD + linear("BTNH,NHD->BTD", attn, layer["wo"])
    x_BTD = x_BTD + _mlp(rms_norm(x_BTD, layer["mlp_norm"], cfg.rms_norm_eps), layer)
    return constrain(x_BTD, ACT), new_kv


def _remat(fn, policy: str):
    if policy == "none":
        return fn
    saveable = {"full": jax.checkpoint_policies.nothing_saveable,
                "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[policy]
    return jax.checkpoint(fn, policy=saveable)


def _default_positions(tokens_BT, positions, segment_ids, offset=0):
    B, T = tokens_BT.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32) + offset, (B, T))
    if segment_ids is None:
        segment_ids = jnp.ones((B, T), jnp.int32)
    return positions.astype(jnp.int32), segment_ids.astype(jnp.int32)


def hidden_states(params, tokens_BT, cfg: ModelConfig, *, positions=None, segment_ids=None,
                  cache: KVCache | None = None):
    """Final-normed hidden states [B, T, D] (and the updated cache when one is given)."""
    positions, segment_ids = _default_positions(tokens_BT, positions, segment_ids)
    x = jnp.take(params["embed"], tokens_BT, axis=0).astype(cfg.compute_dtype)
    x = constrain(x, ACT)
    windows = jnp.asarray(cfg.window_per_layer, jnp.int32)

    if cache is None:
        def body(carry, xs):
            layer, window = xs
            return decoder_layer(carry, layer, window, cfg, positions, segment_ids)[0], None
        x, _ = jax.lax.scan(_remat(body, cfg.remat), x, (params["layers"], windows))
        new_cache = None
    else:
        T = tokens_BT.shape[1]
        cache_pos = jax.lax.dynamic_update_slice_in_dim(cache.positions, positions, cache.index, axis=1)
        cache_seg = jax.lax.dynamic_update_slice_in_dim(cache.segment_ids, segment_ids, cache.index, axis=1)

        def body(carry, xs):
            x, k_all, v_all = carry
            layer, window, i = xs
            x, (k_all, v_all) = decoder_layer(x, layer, window, cfg, positions, segment_ids,
                                              (k_all, v_all, i, cache_pos, cache_seg, cache.index))
            return (x, k_all, v_all), None

        layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        (x, ks, vs), _ = jax.lax.scan(body, (x, cache.k, cache.v), (params["layers"], windows, layer_ids))
        new_cache = KVCache(ks, vs, cache_pos, cache_seg, cache.index + T)
    return rms_norm(x, params["final_norm"], cfg.rms_norm_eps), new_cache


def output_weight(params, cfg: ModelConfig):
    """[D, V] projection to the vocabulary (the embedding, transposed, when tied)."""
    return params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]


def logits_from_hidden(params, h_BTD, cfg: ModelConfig) -> jax.Array:
    w_DV = output_weight(params, cfg)
    if hasattr(w_DV, "apply"):
        return w_DV.apply("BTD,DV->BTV", h_BTD).astype(jnp.float32)
    return jnp.einsum("BTD,DV->BTV", h_BTD, w_DV.astype(h_BTD.dtype), preferred_element_type=jnp.float32)


def forward(params, tokens, config: ModelConfig, *, positions=None, segment_ids=None, cache: KVCache | None = None):
    """logits [B, T, V] float32; with `cache`, returns (logits, updated cache).

    positions restart at 0 in each packed segment; tokens attend only within their segment (segment id 0 is
    padding) and never to later positions.
    """
    h, new_cache = hidden_states(params, tokens, config, positions=positions, segment_ids=segment_ids, cache=cache)
    logits = logits_from_hidden(params, h, config)
    return logits if cache is None else (logits, new_cache)
