"""Batched generation for vision-language models: `generate_tokens` (infer/generate.py) with a prefill that runs
the tower once; decoding is the text model's, with M-RoPE positions continuing as text (position + the prompt's
rope delta).

Prompts are left-padded like text prompts (infer/generate.py): padding has segment 0 and rope position 0.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jaxswift.data.multimodal import MultimodalPrompt
from jaxswift.infer.generate import generate_tokens
from jaxswift.infer.sampling import SamplingParams
from jaxswift.models.transformer import logits_from_hidden
from jaxswift.models.vision import VisionInputs, VLMConfig, vlm_hidden_states
from jaxswift.models.vit import ViTInputs

PREFILL_BUCKET = 64


def left_pad_multimodal(prompts: Sequence[MultimodalPrompt], pad_id: int):
    """(tokens, positions, segments [B, P], rope positions [3, B, P], rope deltas [B]); P a multiple of 64. The
    families without M-RoPE (prompts with rope_positions None) get None for both: they rotate by position."""
    n = max(len(p.ids) for p in prompts)
    length = max(PREFILL_BUCKET, -(-n // PREFILL_BUCKET) * PREFILL_BUCKET)
    B = len(prompts)
    tokens = np.full((B, length), pad_id, np.int32)
    positions, segments = np.zeros_like(tokens), np.zeros_like(tokens)
    mrope = prompts[0].rope_positions is not None
    rope = np.zeros((3, B, length), np.int32) if mrope else None
    for row, p in enumerate(prompts):
        k = len(p.ids)
        tokens[row, length - k:] = p.ids
        positions[row, length - k:] = np.arange(k)
        segments[row, length - k:] = 1
        if mrope:
            rope[:, row, length - k:] = p.rope_positions
    deltas = np.asarray([p.rope_delta for p in prompts], np.int32) if mrope else None
    return tokens, positions, segments, rope, deltas


@dataclasses.dataclass(frozen=True)
class VLMPrefill:
    """The prefill of `generate_tokens` for a VLM (hashable, so static under jit): the tower runs once over every
    image of the batch and its features replace the placeholder embeddings. prefill_inputs = (the params' vision
    and aligner parts, VisionInputs / ViTInputs or None, rope positions [3, B, P] or None)."""
    cfg: VLMConfig

    def __call__(self, llm_params, tokens, positions, segments, cache, prefill_inputs):
        tower_params, vision, rope = prefill_inputs
        h, cache = vlm_hidden_states({**tower_params, "llm": llm_params}, tokens, self.cfg, vision,
                                     rope_positions=rope, positions=positions, segment_ids=segments, cache=cache)
        return logits_from_hidden(llm_params, h[:, -1:], self.cfg.text)[:, 0], cache


def generate_vlm_tokens(params, tokens_BP, positions_BP, segments_BP, rope_3BP, rope_delta_B,
                        vision: VisionInputs | ViTInputs | None, eos_ids, key, *, cfg: VLMConfig,
                        max_new_tokens: int, sampling: SamplingParams):
    """New tokens [B, max_new_tokens] (after eos: the eos id again) and their count per row: `generate_tokens` on
    the LLM with the VLM's prefill; decoded tokens are text, rotated by position + the prompt's rope delta."""
    tower = {k: v for k, v in params.items() if k != "llm"}
    return generate_tokens(params["llm"], tokens_BP, positions_BP, segments_BP, eos_ids, key, cfg=cfg.text,
                           max_new_tokens=max_new_tokens, sampling=sampling, prefill=VLMPrefill(cfg),
                           prefill_inputs=(tower, vision, rope_3BP), rope_offset_B=rope_delta_B)
