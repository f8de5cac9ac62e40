"""Rotary position embeddings with HF's scaling variants (default, linear, llama3, yarn).

Frequencies depend only on the static config, so they are computed once in numpy (float64, cast to float32)
at trace time; angles and the rotation run in float32.
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np

from jaxswift.models.config import RopeConfig


def _default_inv_freq(theta: float, dim: int) -> np.ndarray:
    # Computed in float32 like transformers, so angles agree to the last bit at long positions.
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)


def _llama3_inv_freq(rope: RopeConfig, dim: int) -> np.ndarray:
    inv = _default_inv_freq(rope.theta, dim)
    old_len = rope.original_max_position_embeddings
    low_wavelen, high_wavelen = old_len / rope.low_freq_factor, old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(rope: RopeConfig, dim: int) -> tuple[np.ndarray, float]:
    base, factor = rope.theta, rope.factor
    if rope.attention_factor is not None:
        attention_factor = rope.attention_factor
    elif rope.mscale and rope.mscale_all_dim:
        attention_factor = _yarn_mscale(factor, rope.mscale) / _yarn_mscale(factor, rope.mscale_all_dim)
    else:
        attention_factor = _yarn_mscale(factor)

    def correction_dim(rotations):
        return dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    extrapolation = 1 - ramp  # 1 where the original frequency is kept
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv.astype(np.float32), float(attention_factor)


@functools.lru_cache(maxsize=64)
def rope_frequencies(rope: RopeConfig, head_dim: int) -> tuple[np.ndarray, float]:
    """(inverse frequencies [H/2] float32, attention scaling applied to cos and sin)."""
    if rope.type == "default":
        return _default_inv_freq(rope.theta, head_dim), 1.0
    if rope.type == "linear":
        return (_default_inv_freq(rope.theta, head_dim) / np.float32(rope.factor)).astype(np.float32), 1.0
    if rope.type == "llama3":
        return _llama3_inv_freq(rope, head_dim), 1.0
    return _yarn_inv_freq(rope, head_dim)


def apply_rope(x_BTNH: jnp.ndarray, positions_BT: jnp.ndarray, rope: RopeConfig) -> jnp.ndarray:
    """Rotates pairs (i, i + H/2) as HF's rotate_half does.

    positions [B, T], or [3, B, T] for multimodal RoPE (Qwen2-VL's M-RoPE): frequency i then takes its position
    from row (temporal, height, width) s % 3 of the section s of `rope.mrope_section` that holds i. Text tokens
    carry the same position in all three rows, which is plain RoPE.
    """
    head_dim = x_BTNH.shape[-1]
    inv_freq, scale = rope_frequencies(rope, head_dim)
    angles = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    if positions_BT.ndim == 3:
        angles = mrope_angles(angles, rope.mrope_section)
    return rotate_half_pairs(x_BTNH, jnp.cos(angles)[:, :, None, :] * scale, jnp.sin(angles)[:, :, None, :] * scale)


def mrope_angles(angles_3BTh: jnp.ndarray, section: tuple[int, ...]) -> jnp.ndarray:
    """[3, B, T, H/2] angles of the three position rows -> [B, T, H/2]: section s reads row s % 3."""
    if sum(section) != angles_3BTh.shape[-1]:
        raise ValueError(f"mrope_section {section} must sum to head_dim / 2 = {angles_3BTh.shape[-1]}")
    bounds = np.cumsum((0,) + tuple(section))
    return jnp.concatenate([angles_3BTh[s % 3, ..., bounds[s]:bounds[s + 1]] for s in range(len(section))], axis=-1)


def rotate_half_pairs(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """x * cos + rotate_half(x) * sin in float32; cos and sin [..., H/2] broadcast against x[..., :H/2]."""
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
