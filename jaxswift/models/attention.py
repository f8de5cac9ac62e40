"""Decoding over a paged KV cache: one new token per row, keys and values in fixed-size pages.

Legend as in transformer.py, plus for pages: C pages gathered per row, P tokens per page (page size).
One pool per layer for keys and one for values, each [K, pages, P, H]. A row's page table [B, C] lists its pages
in order, so page c holds the row's positions c*P .. c*P + P - 1; page 0 is a scratch page that free rows write
into and nobody reads. The kv-heads axis leads so that gathering a batch's pages (axis 1) gives [K, B, C, P, H],
which is already the batched-matmul operand [Z, S, H] (Z = K * B here, kv heads major) without a transpose.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxswift.models.config import ModelConfig
from jaxswift.models.hints import constrain
from jaxswift.models.transformer import _MASKED, ACT, feed_forward, linear, project_qkv, rms_norm


def write_token_kv(k_pool, v_pool, k_BKH, v_BKH, page_B, offset_B):
    """The pools with each row's new key/value written at (its page, its offset in the page)."""
    k_pool = k_pool.at[:, page_B, offset_B].set(k_BKH.transpose(1, 0, 2).astype(k_pool.dtype))
    v_pool = v_pool.at[:, page_B, offset_B].set(v_BKH.transpose(1, 0, 2).astype(v_pool.dtype))
    return k_pool, v_pool


def paged_attention(q_BNH, k_pool, v_pool, table_BC, position_B, window) -> jax.Array:
    """Softmax attention of one query per row over the row's positions 0..position (the gathered pages).

    window > 0 keeps only keys less than `window` positions back (sliding-window layers).
    """
    B, N, H = q_BNH.shape
    K, P = k_pool.shape[0], k_pool.shape[2]
    G, S = N // K, table_BC.shape[1] * P
    # Page ids are always valid (free entries point at the scratch page): no out-of-bounds fill to select.
    gather = lambda pool: jnp.take(pool, table_BC, axis=1, mode="clip")  # noqa: E731
    k_ZSH = gather(k_pool).reshape(K * B, S, H).astype(q_BNH.dtype)
    v_ZSH = gather(v_pool).reshape(K * B, S, H).astype(q_BNH.dtype)
    q_ZGH = q_BNH.reshape(B, K, G, H).transpose(1, 0, 2, 3).reshape(K * B, G, H)
    scores = jnp.einsum("ZGH,ZSH->ZGS", q_ZGH, k_ZSH, preferred_element_type=jnp.float32) * H ** -0.5
    distance_BS = position_B[:, None] - jnp.arange(S, dtype=jnp.int32)
    visible_BS = (distance_BS >= 0) & ((window == 0) | (distance_BS < window))
    scores = jnp.where(visible_BS[None, :, None], scores.reshape(K, B, G, S), _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_ZSH.dtype).reshape(K * B, G, S)
    out = jnp.einsum("ZGS,ZSH->ZGH", probs, v_ZSH)
    return out.reshape(K, B, G, H).transpose(1, 0, 2, 3).reshape(B, N, H)


def paged_decoder_layer(x_BD, layer, window, cfg: ModelConfig, position_B, pages, page_B, offset_B, table_BC,
                        rope_position_B=None):
    """One block for one new token per row; `pages` = (k_pool, v_pool) of this layer, returned updated.
    rope_position_B (default: position_B) rotates q and k only (a VLM prompt's M-RoPE delta moves it)."""
    B = x_BD.shape[0]
    x = x_BD[:, None]
    h = rms_norm(x, layer["attn_norm"], cfg.rms_norm_eps)
    q, k, v = project_qkv(h, layer, cfg, (position_B if rope_position_B is None else rope_position_B)[:, None])
    k_pool, v_pool = write_token_kv(*pages, k[:, 0], v[:, 0], page_B, offset_B)
    attn = paged_attention(q[:, 0], k_pool, v_pool, table_BC, position_B, window)
    x = x + linear("BTNH,NHD->BTD", attn.reshape(B, 1, cfg.num_heads, cfg.head_dim), layer["wo"])
    x = x + feed_forward(rms_norm(x, layer["mlp_norm"], cfg.rms_norm_eps), layer, cfg)[0]  # dense or MoE
    return constrain(x, ACT)[:, 0], (k_pool, v_pool)


def paged_decode_hidden(params, tokens_B, cfg: ModelConfig, position_B, k_pages, v_pages, page_B, offset_B,
                        table_BC, rope_position_B=None):
    """Final-normed hidden states [B, D] of one new token per row, and the updated per-layer pools.

    params["layers"] is the tuple of per-layer trees of `unstack_layers` (decoding runs unrolled); k_pages and
    v_pages are tuples of per-layer pools.
    """
    x = jnp.take(params["embed"], tokens_B, axis=0).astype(cfg.compute_dtype)
    ks, vs = list(k_pages), list(v_pages)
    for i, (layer, window) in enumerate(zip(params["layers"], cfg.window_per_layer)):
        x, (ks[i], vs[i]) = paged_decoder_layer(x, layer, window, cfg, position_B, (ks[i], vs[i]), page_B,
                                                offset_B, table_BC, rope_position_B)
    return rms_norm(x, params["final_norm"], cfg.rms_norm_eps), tuple(ks), tuple(vs)
