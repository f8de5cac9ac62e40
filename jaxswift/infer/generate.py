"""Plain batched generation: one prefill, then a jitted while-loop of decode steps over a KV cache.

Prompts are left-padded (padding has segment id 0, so no real token attends to it) to a length bucket, so a
handful of compiled shapes serve every prompt length.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxswift.errors import ConfigError
from jaxswift.infer.sampling import SamplingParams, sample
from jaxswift.models.config import ModelConfig
from jaxswift.models.transformer import hidden_states, init_cache, logits_from_hidden, unstack_layers

PREFILL_BUCKET = 64


def _bucket(n: int, multiple: int = PREFILL_BUCKET) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def stop_token_ids(config: ModelConfig, tokenizer=None) -> np.ndarray:
    """The ids that end a generation: config.json's eos ids plus the tokenizer's eos when it is another one."""
    ids = list(config.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ConfigError("the model has no eos token id (config.json eos_token_id or the tokenizer's eos)")
    return np.asarray(ids, np.int32)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, positions, segment_ids), each [B, bucket]."""
    length = _bucket(max(len(p) for p in prompts))
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    positions = np.zeros_like(tokens)
    segments = np.zeros_like(tokens)
    for row, ids in enumerate(prompts):
        n = len(ids)
        tokens[row, length - n:] = ids
        positions[row, length - n:] = np.arange(n)
        segments[row, length - n:] = 1
    return tokens, positions, segments


def last_logits(params, tokens, cfg, positions, segments, cache, rope_positions=None):
    """Logits [B, V] of each row's last position and the updated cache."""
    h, cache = hidden_states(params, tokens, cfg, positions=positions, segment_ids=segments, cache=cache,
                             rope_positions=rope_positions)
    return logits_from_hidden(params, h[:, -1:], cfg)[:, 0], cache


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "sampling", "prefill"))
def generate_tokens(params, tokens_BP, positions_BP, segments_BP, eos_ids, key, *, cfg: ModelConfig,
                    max_new_tokens: int, sampling: SamplingParams, prefill=None, prefill_inputs=None,
                    rope_offset_B=None):
    """New tokens [B, max_new_tokens] (eos included; after eos: the eos id again) and their count per row.

    prefill (static, hashable; default: the text model's): `prefill(params, tokens, positions, segments, cache,
    prefill_inputs) -> (last logits [B, V], cache)`, with params the text model's (layers unstacked). A
    vision-language model's runs its tower there (infer/generate_vlm.py). rope_offset_B: decoded tokens rotate
    by position + offset (Qwen2-VL's M-RoPE delta); None = by position.
    """
    B, P = tokens_BP.shape
    params = unstack_layers(params)  # once per call; the decode loop then reads every weight in place
    cache = init_cache(cfg, B, P + max_new_tokens, per_layer=True)
    if prefill is None:
        logits, cache = last_logits(params, tokens_BP, cfg, positions_BP, segments_BP, cache)
    else:
        logits, cache = prefill(params, tokens_BP, positions_BP, segments_BP, cache, prefill_inputs)
    next_pos = positions_BP[:, -1] + 1
    out = jnp.zeros((B, max_new_tokens), jnp.int32)
    done = jnp.zeros((B,), bool)
    lengths = jnp.zeros((B,), jnp.int32)
    fill = eos_ids[0]

    def cond(state):
        step, _, _, _, done, _, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, logits, cache, pos, done, out, lengths, key = state
        key, sub = jax.random.split(key)
        tok = jnp.where(done, fill, sample(logits, sub, sampling))
        out = out.at[:, step].set(tok)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(tok, eos_ids)
        rope = None if rope_offset_B is None else (pos + rope_offset_B)[:, None]
        logits, cache = last_logits(params, tok[:, None], cfg, pos[:, None], jnp.ones((B, 1), jnp.int32), cache,
                                    rope)
        return step + 1, logits, cache, pos + 1, done, out, lengths, key

    state = (jnp.zeros((), jnp.int32), logits, cache, next_pos, done, out, lengths, key)
    _, _, _, _, _, out, lengths, _ = jax.lax.while_loop(cond, body, state)
    return out, lengths
