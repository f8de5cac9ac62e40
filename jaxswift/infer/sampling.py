"""Token sampling from logits: greedy, temperature, top-k, top-p — pure and jittable."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

_NEG = -1e30


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def top_p_filter(logits_BV: jax.Array, top_p) -> jax.Array:
    """Keeps the smallest set of tokens whose probability mass reaches top_p (always at least the best one)."""
    sorted_logits = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < top_p
    # threshold = smallest kept logit
    threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits_BV >= threshold, logits_BV, _NEG)


def top_k_filter(logits_BV: jax.Array, top_k: int) -> jax.Array:
    kth = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    return jnp.where(logits_BV >= kth, logits_BV, _NEG)


def sample(logits_BV: jax.Array, key: jax.Array, params: SamplingParams, temperature=None, top_p=None) -> jax.Array:
    """Next tokens [B]. `params` decides the static path; traced temperature/top_p may override its values."""
    if params.greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    temperature = params.temperature if temperature is None else temperature
    top_p = params.top_p if top_p is None else top_p
    logits = logits_BV.astype(jnp.float32) / temperature
    if params.top_k:
        logits = top_k_filter(logits, min(params.top_k, logits.shape[-1]))
    if params.top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
