"""llama.cpp's k-quant block formats Q4_K and Q6_K, written with numpy (the `gguf` package, 0.19, only reads them).

The search is llama.cpp's reference quantizer (ggml-quants.c: `quantize_row_q4_K_ref` with `make_qkx2_quants`,
`quantize_row_q6_K_ref` with `make_qx_quants`, no importance matrix), vectorised over blocks: every loop below runs
over search steps, never over blocks. Arithmetic is float32 as in C, rounding is C's `nearest_int` (round half to
even, = np.rint); sums are numpy's (pairwise, not C's running order), so a value on a rounding edge can land one
step apart from llama.cpp's output; the block layout is exact (checked with `gguf.quants.dequantize`).

Super-blocks of QK_K = 256 values, one row's values in order:
  Q4_K (144 bytes): d f16, dmin f16, 12 bytes of 6-bit sub-block scales and mins (8 sub-blocks of 32), 128 bytes of
        4-bit codes; value = d * scale_j * q - dmin * min_j.
  Q6_K (210 bytes): 128 bytes low 4 bits, 64 bytes high 2 bits, 16 int8 sub-block scales (16 sub-blocks of 16),
        d f16; value = d * scale_j * (q - 32).
"""

from __future__ import annotations

import numpy as np

QK_K = 256
GROUP_MAX_EPS = np.float32(1e-15)
f32 = np.float32


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """[..., n] float (n a multiple of 256) -> uint8 [..., n / 256 * 144], llama.cpp's Q4_K bytes."""
    blocks, lead = _superblocks(x)
    sub = blocks.reshape(-1, 8, 32)
    av_x = np.sqrt(_sum(sub * sub)[..., None] / f32(32))
    weights = av_x + np.abs(sub)
    scales, mins, codes = _make_qkx2_quants(sub, weights, nmax=15, rmin=f32(-1.0), rdelta=f32(0.1), nstep=20)
    max_scale = np.maximum(scales.max(-1), f32(0))
    max_min = np.maximum(mins.max(-1), f32(0))
    inv_scale = np.where(max_scale > 0, f32(63) / np.where(max_scale > 0, max_scale, f32(1)), f32(0))
    inv_min = np.where(max_min > 0, f32(63) / np.where(max_min > 0, max_min, f32(1)), f32(0))
    ls = np.clip(np.rint(inv_scale[:, None] * scales), 0, 63).astype(np.uint8)
    lm = np.clip(np.rint(inv_min[:, None] * mins), 0, 63).astype(np.uint8)
    d = (max_scale / f32(63)).astype(np.float16)
    dmin = (max_min / f32(63)).astype(np.float16)
    # the codes again, against the scales as stored (f16 super-scales times 6-bit sub-scales)
    sub_d = d.astype(np.float32)[:, None] * ls
    sub_m = dmin.astype(np.float32)[:, None] * lm
    safe = np.where(sub_d != 0, sub_d, f32(1))[..., None]
    requant = np.clip(np.rint((sub + sub_m[..., None]) / safe), 0, 15)
    codes = np.where((sub_d != 0)[..., None], requant, codes).astype(np.uint8)  # d == 0: llama.cpp keeps the search's
    # four 64-value groups: 32 bytes each, low nibble from the group's first 32 values, high from its last 32
    pairs = codes.reshape(-1, 4, 2, 32)
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    out = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2),
                          _pack_scales_k4(ls, lm), qs], axis=1)
    return out.reshape(*lead, -1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """[..., n] float (n a multiple of 256) -> uint8 [..., n / 256 * 210], llama.cpp's Q6_K bytes."""
    blocks, lead = _superblocks(x)
    sub = blocks.reshape(-1, 16, 16)
    scales, codes = _make_qx_quants(sub, nmax=32)
    pick = np.abs(scales).argmax(-1)  # first of the largest, as C's strict `>`
    max_scale = np.take_along_axis(scales, pick[:, None], -1)[:, 0]
    zero = np.abs(max_scale) < GROUP_MAX_EPS
    iscale = np.where(zero, f32(0), f32(-128) / np.where(zero, f32(1), max_scale))
    d = np.where(zero, f32(0), f32(1) / np.where(zero, f32(1), iscale)).astype(np.float16)
    sc = np.minimum(np.rint(iscale[:, None] * scales), 127).astype(np.int8)
    sub_d = d.astype(np.float32)[:, None] * sc
    safe = np.where(sub_d != 0, sub_d, f32(1))[..., None]
    requant = np.clip(np.rint(sub / safe), -32, 31) + 32
    codes = np.where((sub_d != 0)[..., None], requant, codes).astype(np.uint8)
    codes = np.where(zero[:, None, None], 0, codes).reshape(-1, 2, 4, 32)  # two halves of 128: four 32-value rows
    ql = np.concatenate([codes[:, :, 0] & 0xF | (codes[:, :, 2] & 0xF) << 4,
                         codes[:, :, 1] & 0xF | (codes[:, :, 3] & 0xF) << 4], axis=2).reshape(-1, 128)
    qh = (codes[:, :, 0] >> 4 | (codes[:, :, 1] >> 4) << 2 | (codes[:, :, 2] >> 4) << 4
          | (codes[:, :, 3] >> 4) << 6).reshape(-1, 64)
    sc = np.where(zero[:, None], 0, sc).astype(np.int8)
    out = np.concatenate([ql.astype(np.uint8), qh.astype(np.uint8), sc.view(np.uint8),
                          d.view(np.uint8).reshape(-1, 2)], axis=1)
    return out.reshape(*lead, -1)


def _sum(a: np.ndarray) -> np.ndarray:
    """Sum over the last axis in C's order (a running float32 sum, not numpy's pairwise one): the searches compare
    errors, so the order decides ties and near-ties the way llama.cpp does."""
    return np.cumsum(a, axis=-1, dtype=np.float32)[..., -1]


def _superblocks(x: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 0 or x.shape[-1] % QK_K:
        raise ValueError(f"k-quants need rows of a multiple of {QK_K} values, got shape {x.shape}")
    return x.reshape(-1, QK_K), x.shape[:-1]


def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """8 six-bit scales and 8 six-bit mins in 12 bytes (the inverse of llama.cpp's get_scale_min_k4): bytes 0-3 and
    4-7 hold scales / mins 0-3 with the high 2 bits of scales / mins 4-7 on top; bytes 8-11 hold the low nibbles of
    scales 4-7 (low) and mins 4-7 (high)."""
    packed = np.zeros((ls.shape[0], 12), np.uint8)
    packed[:, 0:4] = ls[:, :4] | (ls[:, 4:] >> 4) << 6
    packed[:, 4:8] = lm[:, :4] | (lm[:, 4:] >> 4) << 6
    packed[:, 8:12] = (ls[:, 4:] & 0xF) | (lm[:, 4:] & 0xF) << 4
    return packed


def _make_qkx2_quants(x, weights, *, nmax: int, rmin, rdelta, nstep: int):
    """Asymmetric codes 0..nmax per row of x [..., n] (scale, min = -offset): start from the min-max grid, then try
    nstep + 1 stretched grids (each from the best offset so far), each refit by weighted least squares, keeping the
    lowest weighted squared error.
    Returns (scale [...], the_min [...] >= 0, codes [..., n]) with x ~ scale * code - the_min."""
    lo = np.minimum(x.min(-1), f32(0))
    hi = x.max(-1)
    flat = hi == lo
    span = np.where(flat, f32(1), hi - lo)
    sum_w = _sum(weights)
    sum_x = _sum(weights * x)

    iscale = f32(nmax) / span
    scale = f32(1) / iscale
    codes = np.clip(np.rint(iscale[..., None] * (x - lo[..., None])), 0, nmax)
    best = _sum(weights * np.square(scale[..., None] * codes + lo[..., None] - x))
    the_min = lo
    for step in range(nstep + 1):
        # each trial grid starts from the best offset found so far (llama.cpp updates `min` in the loop)
        reach = hi - the_min
        reach = np.where(reach > 0, reach, f32(1))
        trial_iscale = (rmin + rdelta * f32(step) + f32(nmax)) / reach
        trial = np.clip(np.rint(trial_iscale[..., None] * (x - the_min[..., None])), 0, nmax)
        sum_l = _sum(weights * trial)
        sum_l2 = _sum(weights * trial * trial)
        sum_xl = _sum(weights * trial * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        safe_det = np.where(ok, det, f32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe_det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe_det
        clamp = this_min > 0  # a positive offset is not allowed: refit the scale alone through zero
        this_scale = np.where(clamp, sum_xl / np.where(sum_l2 > 0, sum_l2, f32(1)), this_scale)
        this_min = np.where(clamp, f32(0), this_min)
        error = _sum(weights * np.square(this_scale[..., None] * trial + this_min[..., None] - x))
        better = ok & (error < best)
        codes = np.where(better[..., None], trial, codes)
        best = np.where(better, error, best)
        scale = np.where(better, this_scale, scale)
        the_min = np.where(better, this_min, the_min)
    scale = np.where(flat, f32(0), scale).astype(np.float32)
    codes = np.where(flat[..., None], 0, codes)
    the_min = np.where(flat, lo, the_min)
    return scale, (-the_min).astype(np.float32), codes


def _make_qx_quants(x, *, nmax: int):
    """Symmetric codes -nmax..nmax-1 (stored + nmax) per row of x [..., n], llama.cpp's rmse_type 1 (weights x^2):
    the grid through the largest-magnitude value, then 18 grids with nmax moved by +-0.1 .. 0.9, each with its
    least-squares scale, keeping the best fit. Returns (scale [...] (signed), codes [..., n] in 0..2 nmax - 1)."""
    pick = np.abs(x).argmax(-1)
    peak = np.take_along_axis(x, pick[..., None], -1)[..., 0]
    zero = np.abs(peak) < GROUP_MAX_EPS
    peak = np.where(zero, f32(1), peak)
    w = x * x

    def fit(iscale):
        levels = np.clip(np.rint(iscale[..., None] * x), -nmax, nmax - 1)
        return levels, _sum(w * x * levels), _sum(w * levels * levels)

    levels, sumlx, suml2 = fit(f32(-nmax) / peak)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, f32(1)), f32(0))
    best = scale * sumlx
    for step in (*range(-9, 0), *range(1, 10)):
        trial, t_sumlx, t_suml2 = fit(-(f32(nmax) + f32(0.1) * f32(step)) / peak)
        better = (t_suml2 > 0) & (t_sumlx * t_sumlx > best * t_suml2)
        levels = np.where(better[..., None], trial, levels)
        scale = np.where(better, t_sumlx / np.where(t_suml2 > 0, t_suml2, f32(1)), scale)
        best = np.where(better, scale * t_sumlx, best)
    scale = np.where(zero, f32(0), scale).astype(np.float32)
    codes = np.where(zero[..., None], 0, levels + nmax)
    return scale, codes


__all__ = ["QK_K", "quantize_q4_k", "quantize_q6_k"]
