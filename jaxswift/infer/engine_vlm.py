"""Images in the paged engine (engine.py): a request's images, preprocessed before it is queued, and the prefill that
runs the vision tower once over them.

A request with images carries `RequestImages`: the tower's inputs (the processor's `batch_vision` of its one
prompt) and, for Qwen2-VL's M-RoPE, the prompt's 3-D rope positions and rope delta. Prefill runs the tower, scatters
its features at the placeholder tokens (models/vision.vlm_hidden_states) and runs the LLM over the whole prompt,
right-padded to the engine's bucket like a text prompt, writing keys/values as the text prefill does; decoding is
then the text model's, each slot rotating by position + its rope delta (0 for text requests and 1-D families).

Image requests bypass the prefix cache (their placeholder ids are equal for every image, so token-id page hashes
would not tell two images apart) and chunked prefill (the tower's features are scattered over the whole prompt).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxswift.data.multimodal import MultimodalPrompt
from jaxswift.errors import ConfigError
from jaxswift.models.transformer import init_cache, logits_from_hidden
from jaxswift.models.vision import VisionInputs, VLMConfig, vlm_hidden_states
from jaxswift.models.vit import ViTInputs


@dataclasses.dataclass(eq=False)  # compared by identity: the n choices of one request share one object
class RequestImages:
    """The images of one request, ready for the tower: `vision` (every image of the prompt, in placeholder order),
    and for M-RoPE families the prompt's rope positions [3, n] and rope delta (None / 0 otherwise)."""
    vision: VisionInputs | ViTInputs
    rope_positions: np.ndarray | None
    rope_delta: int
    count: int  # images in the prompt


def request_images(processor, prompt: MultimodalPrompt) -> RequestImages | None:
    """The RequestImages of an encoded prompt (processor: the model's data/multimodal VLMProcessor); None when the
    prompt has no image."""
    if not prompt.patches:
        return None
    vision = processor.batch_vision([prompt])
    return RequestImages(vision, prompt.rope_positions, int(prompt.rope_delta), len(prompt.patches))


def _prefill_with_images(llm_params, tower_params, tokens_T, length, rope_3T, vision, *, cfg: VLMConfig):
    """prefill's outputs for a prompt with images: per-layer k [K, H, T], v [K, T, H], the logits after the prompt
    [1, V] and its token set [1, V]. The tower runs once; the prompt is right-padded (segment 0, position 0)."""
    T = tokens_T.shape[0]
    index = jnp.arange(T, dtype=jnp.int32)
    real = index < length
    positions, segments = jnp.where(real, index, 0)[None], real.astype(jnp.int32)[None]
    rope = None if rope_3T is None else rope_3T[:, None]
    cache = init_cache(cfg.text, 1, T, per_layer=True)
    h, cache = vlm_hidden_states({**tower_params, "llm": llm_params}, tokens_T[None], cfg, vision,
                                 rope_positions=rope, positions=positions, segment_ids=segments, cache=cache)
    last = jax.lax.dynamic_slice_in_dim(h, length - 1, 1, axis=1)
    logits = logits_from_hidden(llm_params, last, cfg.text)[:, 0]
    V = logits.shape[-1]
    prompt_ids = jnp.where(real, tokens_T, V)
    prompt_mask = jnp.zeros((1, V), bool).at[0, prompt_ids].set(True, mode="drop")
    return cache.k, cache.v, logits, prompt_mask


_prefill_with_images_jit = jax.jit(_prefill_with_images, static_argnames=("cfg",))


def prefill_with_images(llm_params, tower_params, padded_tokens: np.ndarray, length: int, images: RequestImages,
                        cfg: VLMConfig):
    """(k, v, logits, prompt_mask) of `_prefill_with_images` for a prompt padded by the engine's pad_prompt; a
    ConfigError when the prompt's placeholders do not match its images."""
    if not isinstance(images, RequestImages):
        raise ConfigError(f"images must be the RequestImages of engine_vlm.request_images, got "
                          f"{type(images).__name__}")
    placeholders = int(np.isin(padded_tokens[:length], cfg.placeholder_ids).sum())
    if placeholders == 0:
        raise ConfigError(f"the prompt has no image placeholder token for its {images.count} image(s)")
    rope = None
    if images.rope_positions is not None:
        if images.rope_positions.shape != (3, length):
            raise ConfigError(f"the images' rope positions have shape {images.rope_positions.shape}; the prompt "
                              f"has {length} tokens")
        rope = np.zeros((3, padded_tokens.shape[0]), np.int32)
        rope[:, :length] = images.rope_positions
    return _prefill_with_images_jit(llm_params, tower_params, padded_tokens, jnp.int32(length), rope, images.vision,
                                    cfg=cfg)
