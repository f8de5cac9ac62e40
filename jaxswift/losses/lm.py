"""Next-token cross-entropy computed chunk by chunk from hidden states.

Full float32 logits of a [B, T, V] batch are large (4 x 512 x 49152 x 4 B = 400 MB for SmolLM2); scanning over
sequence chunks with rematerialization keeps only one [B, chunk, V] block alive, forward and backward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxswift.models.config import ModelConfig
from jaxswift.models.transformer import logits_from_hidden


def token_nll(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """-log p(target) per token, in float32."""
    logits = logits_BTV.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
    return log_z - target_logit


def _pad_to_chunks(x, chunk: int):
    pad = -x.shape[1] % chunk
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape(x.shape[0], -1, chunk, *x.shape[2:]).swapaxes(0, 1)  # [chunks, B, chunk, ...]


def chunked_nll_sum(params, h_BTD, targets_BT, weights_BT, cfg: ModelConfig, chunk: int = 512):
    """(sum of weighted token NLL, number of weighted tokens); never holds more than one [B, chunk, V] logit block.
    The count, not the weight sum, is the denominator, as in ms-swift's loss_scale: a token weighted 2.0 counts
    twice in the sum and once in the count (for 0/1 weights the two are equal)."""
    count = jnp.sum(weights_BT != 0).astype(jnp.float32)
    if h_BTD.shape[1] <= chunk:
        nll = token_nll(logits_from_hidden(params, h_BTD, cfg), targets_BT)
        return jnp.sum(nll * weights_BT), count

    @jax.checkpoint
    def one(carry, xs):
        h, t, w = xs
        nll = token_nll(logits_from_hidden(params, h, cfg), t)
        return carry + jnp.sum(nll * w), None

    xs = (_pad_to_chunks(h_BTD, chunk), _pad_to_chunks(targets_BT, chunk), _pad_to_chunks(weights_BT, chunk))
    total, _ = jax.lax.scan(one, jnp.zeros((), jnp.float32), xs)
    return total, count


def token_logps(params, h_BTD, targets_BT, cfg: ModelConfig, chunk: int = 512) -> jax.Array:
    """log p(target) per token [B, T] (for preference and policy losses), chunked like the NLL."""
    if h_BTD.shape[1] <= chunk:
        return -token_nll(logits_from_hidden(params, h_BTD, cfg), targets_BT)

    @jax.checkpoint
    def one(_, xs):
        h, t = xs
        return None, -token_nll(logits_from_hidden(params, h, cfg), t)

    T = h_BTD.shape[1]
    _, out = jax.lax.scan(one, None, (_pad_to_chunks(h_BTD, chunk), _pad_to_chunks(targets_BT, chunk)))
    return out.swapaxes(0, 1).reshape(h_BTD.shape[0], -1)[:, :T]
