"""Token sampling from logits — pure and jittable.

`SamplingParams` / `sample`: one setting for a whole batch (jaxswift.generate). `SlotSampling` / `sample_slots`:
per-request settings as per-slot arrays, for the serving engine, with vLLM's penalties, min_p and order.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

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


CDF_BLOCK = 256  # vocabulary entries per block of the two-level inverse CDF


def _pick(cdf_BN, u_B1, mass_BN):
    """Index of the first entry whose cumulative mass exceeds u, never one of zero mass (float rounding may put
    u past the last sum: then the last entry with mass)."""
    n = cdf_BN.shape[-1]
    index = jnp.sum(cdf_BN <= u_B1, axis=-1)
    last = n - 1 - jnp.argmax((mass_BN > 0)[:, ::-1], axis=-1)
    return jnp.minimum(index, last)


def categorical_with_logprob(key: jax.Array, logits_BV: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(one draw per row from softmax(logits) [B], its log-prob [B] in float32).

    Inverts the cumulative distribution with one uniform per row, in two levels: the mass of each block of
    CDF_BLOCK entries, a cumulative sum over the blocks to pick one, then over that block's entries. The same
    distribution as `jax.random.categorical` (a Gumbel variate for every vocabulary entry: 1.5M threefry numbers a
    step for 32 rows of a 49k vocabulary), without its cost, nor that of a cumulative sum across the whole
    vocabulary (XLA:CPU's cumsum over 49k entries costs as much as a tenth of the model). The log-prob reuses the
    softmax's normalizer, so sampling and scoring read the logits once."""
    x = logits_BV.astype(jnp.float32)
    B, V = x.shape
    block = min(CDF_BLOCK, V)
    blocks = -(-V // block)
    top = jnp.max(x, axis=-1, keepdims=True)
    mass = jnp.pad(jnp.exp(x - top), ((0, 0), (0, blocks * block - V))).reshape(B, blocks, block)
    block_mass = jnp.sum(mass, axis=-1)
    block_cdf = jnp.cumsum(block_mass, axis=-1)
    total = block_cdf[:, -1:]
    u = jax.random.uniform(key, (B, 1)) * total
    chosen = _pick(block_cdf, u, block_mass)
    inside = jnp.take_along_axis(mass, chosen[:, None, None], axis=1)[:, 0]
    before = jnp.take_along_axis(block_cdf - block_mass, chosen[:, None], axis=1)
    token = chosen * block + _pick(before + jnp.cumsum(inside, axis=-1), u, inside)
    logprob = jnp.take_along_axis(x, token[:, None], axis=-1)[:, 0] - top[:, 0] - jnp.log(total[:, 0])
    return token.astype(jnp.int32), logprob


def categorical(key: jax.Array, logits_BV: jax.Array) -> jax.Array:
    """One draw per row from softmax(logits) [B] (see categorical_with_logprob)."""
    return categorical_with_logprob(key, logits_BV)[0]


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
    return categorical(key, logits)


# --- per-request sampling inside the engine's jitted step (vLLM semantics) -----------------------------------------

MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs, and vLLM's default max_logprobs


class SlotSampling(NamedTuple):
    """Each slot's sampling parameters as arrays [S] (seed [S, 2]: a 64-bit seed as two uint32 words)."""
    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array
    min_p: jax.Array
    repetition_penalty: jax.Array
    presence_penalty: jax.Array
    frequency_penalty: jax.Array
    seed: jax.Array


def apply_penalties(logits_SV, prompt_mask_SV, output_counts_SV, s: SlotSampling) -> jax.Array:
    """vLLM's penalties: repetition over prompt and output tokens (divides positive logits, multiplies negative
    ones), then frequency (times the output count) and presence (once per output token) subtracted."""
    output_mask = output_counts_SV > 0
    repetition = jnp.where(prompt_mask_SV | output_mask, s.repetition_penalty[:, None], 1.0)
    logits = jnp.where(logits_SV > 0, logits_SV / repetition, logits_SV * repetition)
    logits = logits - s.frequency_penalty[:, None] * output_counts_SV.astype(jnp.float32)
    return logits - s.presence_penalty[:, None] * output_mask.astype(jnp.float32)


def apply_min_p(logits_SV, min_p_S) -> jax.Array:
    """Drops tokens whose probability is below min_p times the most likely token's."""
    probs = jax.nn.softmax(logits_SV, axis=-1)
    threshold = min_p_S[:, None] * jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(probs >= threshold, logits_SV, -jnp.inf)


def apply_top_k_top_p(logits_SV, top_k_S, top_p_S) -> jax.Array:
    """top-k (0: off; ties with the k-th logit stay), then top-p over what top-k kept: the smallest set of
    tokens whose mass reaches top_p, always at least the best one."""
    V = logits_SV.shape[-1]
    sorted_SV = jnp.sort(logits_SV, axis=-1)[:, ::-1]
    k = jnp.where((top_k_S > 0) & (top_k_S < V), top_k_S, V)
    kth = jnp.take_along_axis(sorted_SV, k[:, None] - 1, axis=-1)
    sorted_SV = jnp.where(sorted_SV >= kth, sorted_SV, -jnp.inf)
    probs = jax.nn.softmax(sorted_SV, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (mass_before < top_p_S[:, None]) & (sorted_SV > -jnp.inf)
    threshold = jnp.min(jnp.where(keep, sorted_SV, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits_SV >= threshold, logits_SV, -jnp.inf)


def _when(pred, fn, x):
    """fn(x) if pred else x, skipped at run time (the whole batch usually needs none of it)."""
    return jax.lax.cond(pred, fn, lambda y: y, x)


def penalized_logits(logits_SV, prompt_mask_SV, output_counts_SV, s: SlotSampling) -> jax.Array:
    """float32 logits after the penalties (what greedy slots take the argmax of)."""
    logits = logits_SV.astype(jnp.float32)
    needed = jnp.any((s.repetition_penalty != 1) | (s.presence_penalty != 0) | (s.frequency_penalty != 0))
    return _when(needed, lambda x: apply_penalties(x, prompt_mask_SV, output_counts_SV, s), logits)


def sampling_logits(penalized_SV, s: SlotSampling) -> jax.Array:
    """The distribution random slots draw from: temperature, then min_p, then top-k and top-p (vLLM's order)."""
    temperature = jnp.where(s.temperature > 0, s.temperature, 1.0)
    logits = penalized_SV / temperature[:, None]
    logits = _when(jnp.any(s.min_p > 0), lambda x: apply_min_p(x, s.min_p), logits)
    truncating = jnp.any(((s.top_k > 0) & (s.top_k < logits.shape[-1])) | (s.top_p < 1))
    return _when(truncating, lambda x: apply_top_k_top_p(x, s.top_k, s.top_p), logits)


def slot_keys(seed_S2, token_index_S) -> jax.Array:
    """One PRNG key per slot from the request's seed and the index of the token being sampled, so a request's
    samples do not depend on what else shares the batch."""
    base = jax.random.wrap_key_data(seed_S2.astype(jnp.uint32), impl="threefry2x32")
    return jax.vmap(jax.random.fold_in)(base, token_index_S)


def sample_slots(logits_SV, prompt_mask_SV, output_counts_SV, s: SlotSampling, token_index_S) -> jax.Array:
    """Next token per slot [S]: argmax of the penalized logits where temperature is 0, else a seeded draw.
    output_counts_SV None: no slot has penalties (the step compiled without them; prompt_mask_SV is unused)."""
    penalized = (logits_SV.astype(jnp.float32) if output_counts_SV is None
                 else penalized_logits(logits_SV, prompt_mask_SV, output_counts_SV, s))
    random = s.temperature > 0
    zeros = jnp.zeros(random.shape, jnp.int32)

    def draw():
        keys = slot_keys(s.seed, token_index_S)
        return jax.vmap(lambda k, row: categorical(k, row[None])[0])(keys, sampling_logits(penalized, s))

    # Each branch runs only when some slot needs it (GRPO rollouts are all random, chat traffic often all greedy).
    drawn = jax.lax.cond(jnp.any(random), draw, lambda: zeros)
    greedy = jax.lax.cond(jnp.all(random), lambda: zeros,
                          lambda: jnp.argmax(penalized, axis=-1).astype(jnp.int32))
    return jnp.where(random, drawn, greedy)


def apply_token_mask(logits_SV, allowed_SW) -> jax.Array:
    """Structured output: -inf where the slot's bitmask (uint32 [S, ceil(V / 32)], bit v % 32 of word v // 32)
    forbids the token; an unconstrained slot's row is all ones."""
    v = jnp.arange(logits_SV.shape[-1])
    bits = (allowed_SW[:, v // 32] >> (v % 32).astype(jnp.uint32)) & 1
    return jnp.where(bits.astype(bool), logits_SV, -jnp.inf)


def token_logprobs(logits_SV, tokens_S, num_top: int):
    """(log-prob of each chosen token [S], top ids [S, num_top], their log-probs [S, num_top]) under the raw
    logits (vLLM's default logprobs mode), in float32."""
    logits = logits_SV.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    chosen = jnp.take_along_axis(logits, tokens_S[:, None], axis=-1)[:, 0] - log_z
    if num_top == 0:
        empty = jnp.zeros((logits_SV.shape[0], 0))
        return chosen, empty.astype(jnp.int32), empty.astype(jnp.float32)
    top_logits, top_ids = jax.lax.top_k(logits, num_top)
    return chosen, top_ids.astype(jnp.int32), top_logits - log_z[:, None]
