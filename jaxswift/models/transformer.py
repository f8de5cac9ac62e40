"""The decoder-only transformer as pure functions over a params pytree.

Einsum legend (used everywhere in jaxswift):
  B batch, T query length, S key length, D embed, N query heads, K kv heads, G query heads per kv head,
  H head dim, F mlp hidden, V vocab, E experts, L layers; inside attention and the KV cache also
  Z = B * K (rows and kv heads merged) and M = G * T (query rows per kv head).

Layers are stacked on a leading L axis and run under `jax.lax.scan`, so compile time does not grow with depth.
Decoding unrolls them instead (`unstack_layers`): a scanned layer's weights are dynamic slices, which XLA on CPU
copies out of the stack on every step, while unrolled matmuls read each weight in place.
A weight leaf is either an array or an object with `.apply(equation, x)` (LoRA, quantized weights): see `linear`.
"""

from __future__ import annotations

import functools
import math
import string
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxswift.errors import ConfigError
from jaxswift.models.attention_kernels import (distinct_windows, dot_product_attention, resolve_attn_impl,
                                              splash_attention)
from jaxswift.models.config import ModelConfig
from jaxswift.models.hints import constrain, override, sharded
from jaxswift.models.moe import moe_block
from jaxswift.models.rope import apply_rope

ACT = ("batch", "seq", "embed")
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite, so a fully masked row gives no NaN


class KVCache(NamedTuple):
    """Contiguous per-sequence cache; per-slot positions and segment ids [B, S].

    Rows and kv heads share one axis Z = B * K (row-major), and keys are stored transposed: k [L, Z, H, S],
    v [L, Z, S, H]. Both attention matmuls then read the cache as plain row-major batched operands, with no
    transpose or reshape that XLA could fuse into a second copy of the in-place update. With `per_layer=True`
    (see `init_cache`), k and v are tuples of L arrays [Z, H, S] / [Z, S, H], the form the unrolled layers of
    `unstack_layers` params update in place without slicing a stacked buffer.
    """
    k: jax.Array | tuple
    v: jax.Array | tuple
    positions: jax.Array
    segment_ids: jax.Array
    index: jax.Array  # next slot to write (scalar int32): all rows advance together


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None, *, per_layer: bool = False) -> KVCache:
    dtype = dtype or cfg.compute_dtype
    k_shape = (batch * cfg.num_kv_heads, cfg.head_dim, max_len)
    v_shape = (batch * cfg.num_kv_heads, max_len, cfg.head_dim)
    if per_layer:
        k = tuple(jnp.zeros(k_shape, dtype) for _ in range(cfg.num_layers))
        v = tuple(jnp.zeros(v_shape, dtype) for _ in range(cfg.num_layers))
    else:
        k, v = jnp.zeros((cfg.num_layers, *k_shape), dtype), jnp.zeros((cfg.num_layers, *v_shape), dtype)
    return KVCache(k, v, jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((batch, max_len), jnp.int32),
                   jnp.zeros((), jnp.int32))


def linear(equation: str, x: jax.Array, w) -> jax.Array:
    """x @ w by einsum; adapters and quantized weights bring their own `apply`."""
    if hasattr(w, "apply"):
        return w.apply(equation, x)
    return matmul_einsum(equation, x, w.astype(x.dtype))


def matmul_einsum(equation: str, x: jax.Array, w: jax.Array, preferred_element_type=None) -> jax.Array:
    """A linear layer's einsum (x's leading axes kept, its last axes contracted with w's first ones) as one 2-D
    matmul [rows, in] @ [in, out], reshaped back; any other equation goes to jnp.einsum as written.

    Why 2-D: differentiated as a [B, T, ...] einsum, XLA on CPU writes the activation gradients transposed for the
    weight gradient and feeds dots two transposed operands; as one matrix product the backward is two plain
    matmuls. An MLP's forward + backward at [4 x 512, 576 -> 1536] takes 91 ms instead of 160.

    On a mesh of several devices (sharding hints installed) the leading axes stay apart and only the contracted
    ones merge: with the rows merged, the one-process run of the two-process GRPO test (tests/test_multihost_rl.py)
    drifted from the two-process run after its first update. Merging the contracted axes (the output
    projection's N, H) keeps XLA on CPU from copying a decode weight, transposed, on every step.
    """
    inputs, out = equation.replace(" ", "").split("->")
    x_spec, w_spec = inputs.split(",")
    n = sum(c in w_spec for c in x_spec)  # contracted axes
    lead, w_out = x_spec[:len(x_spec) - n], w_spec[n:]
    if n == 0 or x_spec[len(lead):] != w_spec[:n] or out != lead + w_out:
        return jnp.einsum(equation, x, w, preferred_element_type=preferred_element_type)
    fan_in = math.prod(w.shape[:n])
    if sharded():
        merged = next(c for c in string.ascii_letters if c not in equation)
        return jnp.einsum(f"{lead}{merged},{merged}{w_out}->{out}", x.reshape(*x.shape[:len(lead)], fan_in),
                          w.reshape(fan_in, *w.shape[n:]), preferred_element_type=preferred_element_type)
    y = jnp.matmul(x.reshape(-1, fan_in), w.reshape(fan_in, -1), preferred_element_type=preferred_element_type)
    return y.reshape(*x.shape[:len(lead)], *w.shape[n:])


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def attention_mask(q_pos_BT, q_seg_BT, k_pos_BS, k_seg_BS, window, q_parent_BT=None) -> jax.Array:
    """[B, T, S]: same segment, causal by position, and within the sliding window when window > 0.

    q_parent_BT (optional) makes a tree: a query also sees the keys of its parent segment (0: none). Branches that
    share one parent (a prompt's G completions, DPO's chosen and rejected) then run after it in one row, each
    seeing the parent and itself but not the others."""
    same_segment = q_seg_BT[:, :, None] == k_seg_BS[:, None, :]
    if q_parent_BT is not None:
        same_segment |= (q_parent_BT[:, :, None] == k_seg_BS[:, None, :]) & (q_parent_BT[:, :, None] != 0)
    distance = q_pos_BT[:, :, None] - k_pos_BS[:, None, :]
    in_window = (window == 0) | (distance < window)
    return same_segment & (distance >= 0) & in_window


def attention(q_BTNH, k_ZHS, v_ZSH, mask_BTS) -> jax.Array:
    """Softmax attention. Keys and values come with rows and kv heads merged into Z = B * K, keys transposed
    ([Z, H, S], values [Z, S, H]), as `KVCache` keeps them: each product is a plain batched matmul of row-major
    operands, and a cache buffer reaches it without any reshape in between."""
    B, T, N, H = q_BTNH.shape
    K = k_ZHS.shape[0] // B
    G = N // K
    # One row axis M = (G, T) per (row, kv head).
    q_ZMH = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B * K, G * T, H)
    scores = jnp.einsum("ZMH,ZHS->ZMS", q_ZMH, k_ZHS, preferred_element_type=jnp.float32)
    scores = jnp.where(mask_BTS[:, None, None], scores.reshape(B, K, G, T, -1) * H ** -0.5, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_ZSH.dtype).reshape(B * K, G * T, -1)
    out = jnp.einsum("ZMS,ZSH->ZMH", probs, v_ZSH)
    return out.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


def grouped_attention(q_BTNH, k_BKHS, v_BKSH, mask_BTS) -> jax.Array:
    """Softmax attention with rows B and kv heads K kept as two batch axes (keys transposed, [B, K, H, S]).

    The training / prefill form: under tensor parallelism K stays sharded over the heads' mesh axis, so each
    device attends with its own heads; merging B and K into one axis (as `attention` does for the cache) makes
    XLA gather q, k and v across that axis first.
    """
    B, T, N, H = q_BTNH.shape
    K = k_BKHS.shape[1]
    G = N // K
    q_BKMH = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
    scores = jnp.einsum("BKMH,BKHS->BKMS", q_BKMH, k_BKHS, preferred_element_type=jnp.float32)
    scores = jnp.where(mask_BTS[:, None, None], scores.reshape(B, K, G, T, -1) * H ** -0.5, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BKSH.dtype).reshape(B, K, G * T, -1)
    out = jnp.einsum("BKMS,BKSH->BKMH", probs, v_BKSH)
    return out.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


CAUSAL_BLOCK = 128  # query rows per block in `causal_self_attention`


def causal_self_attention(q_BTNH, k_BKHT, v_BKTH, mask_BTT, block: int = CAUSAL_BLOCK) -> jax.Array:
    """`grouped_attention` of a sequence over itself, skipping for each block of queries the keys after the block.

    Those keys are masked anyway wherever a later index never holds an earlier position of the same segment, as
    in packed and padded rows (positions grow along each segment); only padding rows (segment 0, all at position
    0) may differ, and they are ignored. About (1 + 1/n) / 2 of the work for n blocks.
    """
    T = q_BTNH.shape[1]
    if T <= block:
        return grouped_attention(q_BTNH, k_BKHT, v_BKTH, mask_BTT)
    out = []
    for start in range(0, T, block):
        end = min(start + block, T)
        out.append(grouped_attention(q_BTNH[:, start:end], k_BKHT[..., :end], v_BKTH[:, :, :end],
                                     mask_BTT[:, start:end, :end]))
    return jnp.concatenate(out, axis=1)


def project_qkv(h_BTD, layer, cfg: ModelConfig, positions_BT):
    """q [B,T,N,H], k and v [B,T,K,H] of one layer's input, with q/k norms and RoPE applied."""
    q = linear("BTD,DNH->BTNH", h_BTD, layer["wq"])
    k = linear("BTD,DKH->BTKH", h_BTD, layer["wk"])
    v = linear("BTD,DKH->BTKH", h_BTD, layer["wv"])
    if cfg.qkv_bias:
        q, k, v = q + layer["bq"].astype(q.dtype), k + layer["bk"].astype(k.dtype), v + layer["bv"].astype(v.dtype)
    if cfg.qk_norm:
        q, k = rms_norm(q, layer["q_norm"], cfg.rms_norm_eps), rms_norm(k, layer["k_norm"], cfg.rms_norm_eps)
    return apply_rope(q, positions_BT, cfg.rope), apply_rope(k, positions_BT, cfg.rope), v


@jax.custom_vjp
def swiglu(gate, up):
    """silu(gate) * up. Its own VJP keeps only gate and up for the backward and recomputes the sigmoid there, in
    one pass that yields both input gradients; autodiff of silu saves four [B, T, F] intermediates per layer."""
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(residuals, d_out):
    gate, up = residuals
    g32 = gate.astype(jnp.float32)
    sig = jax.nn.sigmoid(g32)
    d32 = d_out.astype(jnp.float32)
    d_gate = d32 * up.astype(jnp.float32) * sig * (1 + g32 * (1 - sig))
    return d_gate.astype(gate.dtype), (d32 * g32 * sig).astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def _mlp(h_BTD, layer):
    gate = linear("BTD,DF->BTF", h_BTD, layer["w_gate"])
    up = linear("BTD,DF->BTF", h_BTD, layer["w_up"])
    return linear("BTF,FD->BTD", swiglu(gate, up), layer["w_down"])


def self_attention(q_BTNH, k_BTKH, v_BTKH, positions_BT, segment_ids_BT, window, *, impl: str = "einsum",
                   windows: tuple[int, ...] = (0,), parents_BT=None) -> jax.Array:
    """Attention of a sequence over itself (no cache): the default of the "self_attention" override.

    impl (a resolved --attn_impl, see models/attention_kernels.py): einsum (the reference), xla, cudnn or splash;
    `windows` are the model's distinct sliding windows (splash builds one kernel per window); parents_BT: the
    tree of `attention_mask` (not with splash, whose masks are segment ids only)."""
    k_BTKH, v_BTKH = k_BTKH.astype(q_BTNH.dtype), v_BTKH.astype(q_BTNH.dtype)
    if impl == "splash":
        if parents_BT is not None:
            raise ConfigError("--attn_impl splash masks by segment ids only: rows that share a prompt (parent "
                              "segments) need --attn_impl einsum, xla or cudnn")
        return splash_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, window, windows)
    mask = attention_mask(positions_BT, segment_ids_BT, positions_BT, segment_ids_BT, window, parents_BT)
    if impl in ("xla", "cudnn"):
        return dot_product_attention(q_BTNH, k_BTKH, v_BTKH, mask, impl, windows)
    k = k_BTKH.transpose(0, 2, 3, 1)  # [B, K, H, T]
    v = v_BTKH.transpose(0, 2, 1, 3)  # [B, K, T, H]
    return causal_self_attention(q_BTNH, k, v, mask)


def attention_impl(cfg: ModelConfig) -> str:
    """cfg.attn_impl resolved for this backend, dtype and head size (a ConfigError where it cannot run)."""
    return resolve_attn_impl(cfg.attn_impl, cfg.compute_dtype, cfg.head_dim)


def self_attention_fn(cfg: ModelConfig):
    """The "self_attention" override when a parallel strategy installed one (ring attention), else
    `self_attention` with the config's kernel. A kernel asked for by name under an override would go unused:
    refused."""
    installed = override("self_attention", None)
    if installed is None:
        return functools.partial(self_attention, impl=attention_impl(cfg),
                                 windows=distinct_windows(cfg.window_per_layer))
    if cfg.attn_impl not in ("auto", "einsum"):
        raise ConfigError(f"--attn_impl {cfg.attn_impl}: sequence parallelism runs its own ring attention (einsum "
                          f"blocks); use --attn_impl auto with a sequence mesh axis")
    return installed


def feed_forward(h_BTD, layer, cfg: ModelConfig, segment_ids_BT=None):
    """The block's MLP -> (out, aux loss); aux is 0 for a dense MLP. A layer with a router is an MoE block
    (models/moe.py); padding tokens (segment 0) take no expert there."""
    if "router" in layer:
        return moe_block(h_BTD, layer, cfg, segment_ids_BT)
    return _mlp(h_BTD, layer), jnp.zeros((), jnp.float32)


def decoder_layer(x_BTD, layer, window, cfg: ModelConfig, positions_BT, segment_ids_BT, kv=None,
                  rope_positions=None, parents_BT=None):
    """One block -> (x, new_kv, aux). `kv` = (k_cache, v_cache, layer_index, cache_positions, cache_segments,
    write_index) or None; aux is the block's auxiliary loss (MoE load balancing; 0 for dense blocks).
    rope_positions (default: positions_BT) rotate q and k only; [3, B, T] for M-RoPE (models/rope.py), while
    positions_BT keep ordering the mask and the cache.

    With a cache, the new keys/values are written in place (a loop carry, so XLA updates them without copying the
    whole cache every step): into this layer's own k [Z, H, S] / v [Z, S, H] when layer_index is None, else at
    layer_index of the stacked [L, ...] buffers; attention then reads the updated cache.
    parents_BT (no cache): each token's parent segment, the tree of `attention_mask`.
    """
    B, T, _ = x_BTD.shape
    h = rms_norm(x_BTD, layer["attn_norm"], cfg.rms_norm_eps)
    q, k, v = project_qkv(h, layer, cfg, positions_BT if rope_positions is None else rope_positions)
    if kv is None:
        attend = self_attention_fn(cfg)
        if parents_BT is not None:
            if override("self_attention", None) is not None:
                raise ConfigError("sequence parallelism runs its own ring attention, which has no parent segments: "
                                  "rows that share a prompt run without a sequence mesh axis")
            attend = functools.partial(attend, parents_BT=parents_BT)
        attn = attend(q, k, v, positions_BT, segment_ids_BT, window)
        new_kv = None
    else:
        k = k.transpose(0, 2, 3, 1).reshape(-1, cfg.head_dim, T)  # [Z, H, T]
        v = v.transpose(0, 2, 1, 3).reshape(-1, T, cfg.head_dim)  # [Z, T, H]
        k_all, v_all, i, cache_pos, cache_seg, index = kv
        zero = jnp.zeros((), jnp.int32)
        if i is None:
            k_all = jax.lax.dynamic_update_slice(k_all, k.astype(k_all.dtype), (zero, zero, index))
            v_all = jax.lax.dynamic_update_slice(v_all, v.astype(v_all.dtype), (zero, index, zero))
            k, v = k_all, v_all
        else:
            k_all = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), (i, zero, zero, index))
            v_all = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), (i, zero, index, zero))
            k, v = k_all[i], v_all[i]
        mask = attention_mask(positions_BT, segment_ids_BT, cache_pos, cache_seg, window)
        attn = attention(q, k.astype(q.dtype), v.astype(q.dtype), mask)
        new_kv = (k_all, v_all)
    x_BTD = x_BTD + linear("BTNH,NHD->BTD", attn, layer["wo"])
    ffn, aux = feed_forward(rms_norm(x_BTD, layer["mlp_norm"], cfg.rms_norm_eps), layer, cfg, segment_ids_BT)
    return constrain(x_BTD + ffn, ACT), new_kv, aux


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


def scan_layers(layer_fn, x_BTD, side, layer_xs):
    """The default of the "run_layers" override: `jax.lax.scan` over the stacked layers, summing their aux."""
    def body(carry, xs):
        x, aux = carry
        x, layer_aux = layer_fn(x, side, xs)
        return (x, aux + layer_aux), None
    (x_BTD, aux), _ = jax.lax.scan(body, (x_BTD, jnp.zeros((), jnp.float32)), layer_xs)
    return x_BTD, aux


def hidden_states(params, tokens_BT, cfg: ModelConfig, *, positions=None, segment_ids=None,
                  cache: KVCache | None = None, return_aux: bool = False, rope_positions=None, embeds=None,
                  parent_segment_ids=None):
    """Final-normed hidden states [B, T, D] and the updated cache (None without one); with return_aux, also the
    summed auxiliary loss of the blocks (MoE load balancing; 0 for dense models).

    Vision-language models (models/vision.py) pass `embeds` [B, T, D] (token embeddings with image features
    scattered in) instead of looking tokens up, and `rope_positions` [3, B, T] (M-RoPE) or [B, T] for the
    rotation; `positions` still order the causal mask and the cache.

    parent_segment_ids [B, T] (optional, no cache) lay a tree in each row: a token also sees its parent segment
    (`attention_mask`), as a prompt's completions after the prompt in one row (infer/rollout.py).

    Stacked layers run under `jax.lax.scan` (or the "run_layers" override, e.g. a pipeline); the tuple of
    per-layer trees of `unstack_layers` runs unrolled.
    """
    positions, segment_ids = _default_positions(tokens_BT, positions, segment_ids)
    if parent_segment_ids is not None and cache is not None:
        raise ConfigError("parent_segment_ids lay a tree over a sequence attending to itself: not with a KV cache")
    x = jnp.take(params["embed"], tokens_BT, axis=0) if embeds is None else embeds
    x = constrain(x.astype(cfg.compute_dtype), ACT)
    layers = params["layers"]
    aux = jnp.zeros((), jnp.float32)
    if cache is not None:
        x, cache = _cached_layers(x, layers, cfg, positions, segment_ids, cache, rope_positions)
    elif isinstance(layers, (list, tuple)):
        for layer, window in zip(layers, cfg.window_per_layer):
            x, _, layer_aux = decoder_layer(x, layer, window, cfg, positions, segment_ids,
                                            rope_positions=rope_positions, parents_BT=parent_segment_ids)
            aux = aux + layer_aux
    else:
        def layer_fn(x, side, xs):
            (layer, window), (pos, seg, rope, parents) = xs, side
            rope = None if rope is None else _rope_from_side(rope)
            x, _, layer_aux = decoder_layer(x, layer, window, cfg, pos, seg, rope_positions=rope, parents_BT=parents)
            return x, layer_aux
        windows = jnp.asarray(cfg.window_per_layer, jnp.int32)
        run_layers = override("run_layers", scan_layers)
        rope_side = None if rope_positions is None else _rope_to_side(rope_positions)
        side = (positions, segment_ids, rope_side, parent_segment_ids)  # None entries: no leaves to split
        x, aux = run_layers(_remat(layer_fn, cfg.remat), x, side, (layers, windows))
    h = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    return (h, cache, aux) if return_aux else (h, cache)


def _rope_to_side(rope_positions):
    """Side inputs are split on their leading batch axis (pipeline microbatches): M-RoPE's [3, B, T] -> [B, 3, T]."""
    return jnp.moveaxis(rope_positions, 0, 1) if rope_positions.ndim == 3 else rope_positions


def _rope_from_side(rope_side):
    return jnp.moveaxis(rope_side, 1, 0) if rope_side.ndim == 3 else rope_side


def _cached_layers(x, layers, cfg: ModelConfig, positions, segment_ids, cache: KVCache, rope_positions=None):
    """The decoder over `cache`: unrolled layers with a per-layer cache, or scanned ones with a stacked cache."""
    T = x.shape[1]
    cache_pos = jax.lax.dynamic_update_slice_in_dim(cache.positions, positions, cache.index, axis=1)
    cache_seg = jax.lax.dynamic_update_slice_in_dim(cache.segment_ids, segment_ids, cache.index, axis=1)

    def body(carry, xs):
        x, k, v = carry
        layer, window, i = xs
        x, (k, v), _ = decoder_layer(x, layer, window, cfg, positions, segment_ids,
                                     (k, v, i, cache_pos, cache_seg, cache.index), rope_positions)
        return (x, k, v), None

    unrolled, per_layer = isinstance(layers, (list, tuple)), isinstance(cache.k, (list, tuple))
    if unrolled != per_layer:
        raise ValueError("unstacked layers (unstack_layers) need init_cache(..., per_layer=True), and stacked "
                         "layers a stacked cache")
    if unrolled:
        ks, vs = list(cache.k), list(cache.v)
        for i, (layer, window) in enumerate(zip(layers, cfg.window_per_layer)):
            (x, ks[i], vs[i]), _ = body((x, ks[i], vs[i]), (layer, window, None))
        ks, vs = tuple(ks), tuple(vs)
    else:
        xs = (layers, jnp.asarray(cfg.window_per_layer, jnp.int32), jnp.arange(cfg.num_layers, dtype=jnp.int32))
        (x, ks, vs), _ = jax.lax.scan(body, (x, cache.k, cache.v), xs)
    return x, KVCache(ks, vs, cache_pos, cache_seg, cache.index + T)


def unstack_layers(params):
    """The same params with `layers` as a tuple of per-layer trees, which `hidden_states` runs unrolled.

    For decoding: a scanned layer reads its weights through a dynamic slice, which XLA on CPU copies out of the
    stacked array on every step; unrolled, each matmul reads its weight in place.
    """
    stacked = params["layers"]
    if isinstance(stacked, (list, tuple)):
        return params
    n = jax.tree.leaves(stacked)[0].shape[0]
    return {**params, "layers": tuple(jax.tree.map(lambda a: a[i], stacked) for i in range(n))}


def output_weight(params, cfg: ModelConfig):
    """[D, V] projection to the vocabulary: `lm_head`, or the embedding, transposed, when tied. A tied model served
    in int8 carries a quantized copy of it as `lm_head` for the logits (quant/serving.py); the lookup stays float."""
    head = params.get("lm_head")
    if cfg.tie_word_embeddings and not hasattr(head, "apply"):
        return params["embed"].T
    return params["lm_head"]


def logits_from_hidden(params, h_BTD, cfg: ModelConfig) -> jax.Array:
    w_DV = output_weight(params, cfg)
    if hasattr(w_DV, "apply"):
        return w_DV.apply("BTD,DV->BTV", h_BTD).astype(jnp.float32)
    return matmul_einsum("BTD,DV->BTV", h_BTD, w_DV.astype(h_BTD.dtype), preferred_element_type=jnp.float32)


def forward(params, tokens, config: ModelConfig, *, positions=None, segment_ids=None, cache: KVCache | None = None):
    """logits [B, T, V] float32; with `cache`, returns (logits, updated cache).

    positions restart at 0 in each packed segment; tokens attend only within their segment (segment id 0 is
    padding) and never to later positions.
    """
    h, new_cache = hidden_states(params, tokens, config, positions=positions, segment_ids=segment_ids, cache=cache)
    logits = logits_from_hidden(params, h, config)
    return logits if cache is None else (logits, new_cache)
