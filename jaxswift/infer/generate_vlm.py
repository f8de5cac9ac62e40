"""Batched generation for vision-language models: the tower runs once, inside the prefill; decoding is the text
model's, with M-RoPE positions continuing as text (position + the prompt's rope delta).

Prompts are left-padded like text prompts (infer/generate.py): padding has segment 0 and rope position 0.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxswift.data.multimodal import MultimodalPrompt
from jaxswift.infer.sampling import SamplingParams, sample
from jaxswift.models.transformer import init_cache, logits_from_hidden, unstack_layers
from jaxswift.models.vision import VisionInputs, VLMConfig, vlm_hidden_states

PREFILL_BUCKET = 64


def left_pad_multimodal(prompts: Sequence[MultimodalPrompt], pad_id: int):
    """(tokens, positions, segments [B, P], rope positions [3, B, P], rope deltas [B]); P a multiple of 64."""
    n = max(len(p.ids) for p in prompts)
    length = max(PREFILL_BUCKET, -(-n // PREFILL_BUCKET) * PREFILL_BUCKET)
    B = len(prompts)
    tokens = np.full((B, length), pad_id, np.int32)
    positions, segments = np.zeros_like(tokens), np.zeros_like(tokens)
    rope = np.zeros((3, B, length), np.int32)
    for row, p in enumerate(prompts):
        k = len(p.ids)
        tokens[row, length - k:] = p.ids
        positions[row, length - k:] = np.arange(k)
        segments[row, length - k:] = 1
        rope[:, row, length - k:] = p.rope_positions
    return tokens, positions, segments, rope, np.asarray([p.rope_delta for p in prompts], np.int32)


def _last_logits(params, tokens, cfg: VLMConfig, vision, rope, positions, segments, cache):
    h, cache = vlm_hidden_states(params, tokens, cfg, vision, rope_positions=rope, positions=positions,
                                 segment_ids=segments, cache=cache)
    return logits_from_hidden(params["llm"], h[:, -1:], cfg.text)[:, 0], cache


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "sampling"))
def generate_vlm_tokens(params, tokens_BP, positions_BP, segments_BP, rope_3BP, rope_delta_B,
                        vision: VisionInputs | None, eos_ids, key, *, cfg: VLMConfig, max_new_tokens: int,
                        sampling: SamplingParams):
    """New tokens [B, max_new_tokens] (after eos: the eos id again) and their count per row."""
    B, P = tokens_BP.shape
    params = {**params, "llm": unstack_layers(params["llm"])}
    cache = init_cache(cfg.text, B, P + max_new_tokens, per_layer=True)
    logits, cache = _last_logits(params, tokens_BP, cfg, vision, rope_3BP, positions_BP, segments_BP, cache)
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
        # After the prompt every token is text: one position, the same in all three M-RoPE rows.
        logits, cache = _last_logits(params, tok[:, None], cfg, None, (pos + rope_delta_B)[:, None], pos[:, None],
                                     jnp.ones((B, 1), jnp.int32), cache)
        return step + 1, logits, cache, pos + 1, done, out, lengths, key

    state = (jnp.zeros((), jnp.int32), logits, cache, next_pos, done, out, lengths, key)
    _, _, _, _, _, out, lengths, _ = jax.lax.while_loop(cond, body, state)
    return out, lengths
