"""GRPO on a vision-language model: the training layout of rollouts whose prompts carry images, and the policy /
reference log-probs of their completions with the image features in place.

A rollout row is its prompt (left-padded to P) and its completion (C tokens). Besides rollout.sequences' arrays,
the row carries what the tower and M-RoPE need (data/multimodal_batch.py's names):

  rope_positions   [N, 3, P + C]  the prompt's own M-RoPE positions (0 on padding); completion token j of a prompt
                                  of n tokens rotates by n + j + the prompt's rope delta, as the engine decodes it
  pixels, patch_rows_cols, patch_frames, patch_windows   [N, Q, ...]   the prompt's images (Q: the largest prompt's
                                  patches, rounded up to 64), the same for the G rows of a prompt

Only the prompt's placeholder tokens take image features: a completion that samples a placeholder id reads it as
the text token it was when it was decoded. The gradient step runs the tower once per group of G rows when its
micro-batches hold whole groups (else once per row); scoring without gradients (`grouped_vlm_completion_logps`)
runs each prompt, and its tower, once per group.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxswift.data.multimodal import MultimodalPrompt
from jaxswift.data.multimodal_batch import patch_budget
from jaxswift.infer.rollout import _fork_cache, _repeat_rows, _score
from jaxswift.models.transformer import hidden_states, init_cache, unstack_layers
from jaxswift.models.vision import VisionInputs, VLMConfig, row_vlm_hidden_states, vision_inputs

def rollout_vision_batch(prompts: Sequence[MultimodalPrompt], seqs: dict, prompt_width: int, num_generations: int,
                         cfg: VLMConfig) -> dict[str, np.ndarray]:
    """The vision keys (module docstring) of rollout rows laid out by rollout.sequences: prompt i's G rows are
    i*G .. i*G+G-1, its prompt the first `prompt_width` columns (seqs: tokens / positions / segment_ids [N, T])."""
    G, (N, T), P = num_generations, seqs["tokens"].shape, prompt_width
    if N != len(prompts) * G:
        raise ValueError(f"{N} rollout rows for {len(prompts)} prompts x {G} generations")
    vision = cfg.vision
    Q = patch_budget([sum(len(p) for p in prompt.patches) for prompt in prompts])
    batch = {"rope_positions": np.zeros((N, 3, T), np.int32),
             "pixels": np.zeros((N, Q, vision.patch_pixels), np.float32),
             "patch_rows_cols": np.zeros((N, Q, 2), np.int32), "patch_frames": np.zeros((N, Q), np.int32),
             "patch_windows": np.zeros((N, Q), np.int32)}
    for i, prompt in enumerate(prompts):
        rows, n = slice(i * G, (i + 1) * G), len(prompt)
        if n > P:
            raise ValueError(f"prompt {i} has {n} tokens; the rollout's prompts are {P} wide")
        batch["rope_positions"][rows, :, P - n:P] = prompt.rope_positions
        batch["rope_positions"][rows, :, P:] = (seqs["positions"][rows, None, P:] + prompt.rope_delta)
        if prompt.patches:
            v = vision_inputs(prompt.patches, prompt.grids, vision.merge_size, pad_to=Q, window=vision.window)
            batch["pixels"][rows], batch["patch_rows_cols"][rows] = v.pixels, v.patch_rows_cols
            batch["patch_frames"][rows], batch["patch_windows"][rows] = v.patch_frames, v.patch_windows
    return batch


def _vision(batch) -> VisionInputs:
    return VisionInputs(batch["pixels"], batch["patch_rows_cols"], batch["patch_frames"], batch["patch_windows"])


def _prompt_images(tokens_BT, cfg: VLMConfig, prompt_length: int):
    """Image tokens: placeholder ids inside the prompt only."""
    in_prompt = jnp.arange(tokens_BT.shape[1]) < prompt_length
    return jnp.isin(tokens_BT, jnp.asarray(cfg.placeholder_ids)) & in_prompt


def vlm_completion_logps(params, batch: dict, cfg: VLMConfig, *, prompt_length: int, temperature: float,
                         with_entropy: bool = False, num_generations: int = 1):
    """rollout.completion_logps of a vision-language model's rollout rows (batch: tokens, positions, segment_ids
    [B, T] and the vision keys), the features at the prompt's placeholders. num_generations = G > 1: the rows come
    in groups of G with one prompt's images (a rollout's layout, B a multiple of G), so the tower runs once per
    group (the gradient of the step); 1: once per row."""
    tokens = batch["tokens"]
    h, _ = row_vlm_hidden_states(params, tokens, cfg, _vision(batch),
                                 rope_positions=jnp.moveaxis(batch["rope_positions"], 1, 0),
                                 positions=batch["positions"], segment_ids=batch["segment_ids"],
                                 placeholder_mask_BT=_prompt_images(tokens, cfg, prompt_length),
                                 rows_per_image_set=num_generations)
    return _score(params["llm"], h[:, prompt_length - 1:-1], tokens[:, prompt_length:], cfg.text, temperature,
                  with_entropy)


@functools.partial(jax.jit, static_argnames=("cfg", "prompt_length", "temperature", "num_generations"))
def grouped_vlm_completion_logps(params, batch: dict, *, cfg: VLMConfig, prompt_length: int, temperature: float,
                                 num_generations: int):
    """vlm_completion_logps for rows in groups of num_generations sharing their prompt and images: each prompt
    (and its tower) runs once into a KV cache, copied to its G rows; then only the completions run. For scoring
    without gradients (reference and old log-probs)."""
    G, P = num_generations, prompt_length
    tokens, positions, segments = batch["tokens"], batch["positions"], batch["segment_ids"]
    B, T = tokens.shape
    U = B // G
    params = {**params, "llm": unstack_layers(params["llm"])}
    rope = jnp.moveaxis(batch["rope_positions"], 1, 0)  # [3, B, T]
    first = lambda x: x[::G]  # noqa: E731
    vision = jax.tree.map(first, _vision(batch))
    cache = init_cache(cfg.text, U, T, per_layer=True)
    prompt_tokens = first(tokens)[:, :P]
    h_prompt, cache = row_vlm_hidden_states(params, prompt_tokens, cfg, vision, rope_positions=rope[:, ::G, :P],
                                            positions=first(positions)[:, :P], segment_ids=first(segments)[:, :P],
                                            placeholder_mask_BT=_prompt_images(prompt_tokens, cfg, P), cache=cache)
    h_completion, _ = hidden_states(params["llm"], tokens[:, P:], cfg.text, positions=positions[:, P:],
                                    segment_ids=segments[:, P:], cache=_fork_cache(cache, G, U),
                                    rope_positions=rope[:, :, P:])
    h = jnp.concatenate([_repeat_rows(h_prompt[:, -1:], G, U), h_completion[:, :-1]], axis=1)
    return _score(params["llm"], h, tokens[:, P:], cfg.text, temperature, False)
