"""Sentence embeddings from the decoder's final hidden states: last-token or mean pooling, optionally L2-normalised.

Rows may be padded on either side: padding is segment 0 (as everywhere in jaxswift), so the last token is the last
position with a non-zero segment id and the mean runs over those positions only. Positions restart at 0 on each
row's first real token, so a left-padded row computes exactly what its unpadded self would.

    vectors_BD = embed(params, tokens_BT, segment_ids_BT, cfg, pooling="last", normalize=True)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxswift.models.config import ModelConfig
from jaxswift.models.transformer import hidden_states

POOLINGS = ("last", "mean")


def pool(h_BTD, segment_ids_BT, pooling: str) -> jax.Array:
    """[B, D] float32: the last real token's hidden state, or the mean over the real tokens."""
    real_BT = segment_ids_BT > 0
    h32 = h_BTD.astype(jnp.float32)
    if pooling == "last":
        T = h_BTD.shape[1]
        last_B = jnp.max(jnp.where(real_BT, jnp.arange(T)[None, :], -1), axis=1)  # -1 for an all-padding row
        return jnp.take_along_axis(h32, jnp.maximum(last_B, 0)[:, None, None], axis=1)[:, 0]
    if pooling == "mean":
        w_BT = real_BT.astype(jnp.float32)
        return jnp.einsum("BTD,BT->BD", h32, w_BT) / jnp.maximum(w_BT.sum(axis=1), 1.0)[:, None]
    raise ValueError(f"pooling {pooling!r}: expected one of {' | '.join(POOLINGS)}")


def l2_normalize(x_BD, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps), as torch.nn.functional.normalize does (a zero vector stays zero, never NaN)."""
    return x_BD / jnp.maximum(jnp.linalg.norm(x_BD, axis=-1, keepdims=True), eps)


def positions_of(segment_ids_BT) -> jax.Array:
    """[B, T] positions counting from 0 at each row's first real token (padding on either side); 0 on padding."""
    real = (segment_ids_BT > 0).astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(real, axis=1) - 1, 0) * real


def embed(params, tokens_BT, segment_ids_BT, cfg: ModelConfig, *, pooling: str = "last",
          normalize: bool = True) -> jax.Array:
    """[B, D] float32 sentence vectors of padded rows (one sequence per row; segment 0 is padding)."""
    h, _ = hidden_states(params, tokens_BT, cfg, positions=positions_of(segment_ids_BT), segment_ids=segment_ids_BT)
    vectors = pool(h, segment_ids_BT, pooling)
    return l2_normalize(vectors) if normalize else vectors
