"""GPTQ (Frantar et al. 2022): column-by-column quantization with second-order error feedback, and its checkpoint.

Per weight, with H = 2/N sum x x^T over the calibration inputs of the layer: dampen H by 0.01 * mean(diag H), take
the upper Cholesky factor U of H^-1, then quantize the input rows (columns of the HF weight) in blocks, spreading
each row's rounding error over the rows not yet quantized through U. Groups of `group_size` rows share a scale and
zero point computed when the group's first row comes up; with act-order (desc_act) rows go in order of decreasing
diag(H) and each row's group is recorded in g_idx.

Arrays here are numpy in our flattened layout w[I, O] (the HF weight transposed): GPTQ's rows are independent, so
weights that share an input (q/k/v, gate/up) are quantized in one call with their outputs concatenated.

Checkpoint layout (AutoGPTQ / optimum / vLLM "gptq", format v1): qweight int32 [I * bits / 32, O] packed along the
input, qzeros int32 [G, O * bits / 32] holding zero - 1, scales float16 [G, O], g_idx int32 [I].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxswift.errors import CheckpointError, ConfigError
from jaxswift.quant.packing import pack_int32, unpack_int32
from jaxswift.quant.qweight import QuantizedWeight, contiguous_groups

BITS = (4, 8)
DAMP = 0.01
BLOCK = 128


def check_bits(bits: int, method: str = "gptq", allowed: tuple[int, ...] = BITS):
    if bits not in allowed:
        raise ConfigError(f"--quant_bits {bits} is not supported by --quant_method {method} "
                          f"(supported: {', '.join(map(str, allowed))})")


def minmax_params(w_OC, bits: int, sym: bool):
    """Per output row scale and zero over a group of columns, GPTQ's min-max grid (zero included in the range).

    The scale is rounded to float16 here, as the checkpoint stores it, so the codes dequantize exactly. Zeros stay
    in [1, 2**bits - 1] so the v1 checkpoint's `zero - 1` never wraps.
    """
    maxq = 2 ** bits - 1
    low, high = jnp.minimum(w_OC.min(axis=1), 0), jnp.maximum(w_OC.max(axis=1), 0)
    if sym:
        high = jnp.maximum(-low, high)
        low = jnp.where(low < 0, -high, low)
    empty = (low == 0) & (high == 0)
    low, high = jnp.where(empty, -1.0, low), jnp.where(empty, 1.0, high)
    scale = ((high - low) / maxq).astype(jnp.float16).astype(jnp.float32)
    scale = jnp.where(scale == 0, float(np.finfo(np.float16).tiny), scale)
    zero = jnp.full_like(scale, (maxq + 1) // 2) if sym else jnp.clip(jnp.round(-low / scale), 1, maxq)
    return scale, zero


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "sym"))
def _quantize_block(w_OB, u_BB, *, bits: int, group_size: int, sym: bool):
    """GPTQ over one block of whole groups: codes [O, Bk], the scaled errors [O, Bk], scales and zeros [Gb, O].

    u_BB is upper triangular, so subtracting err * u[j] from the whole block only touches columns j and later.
    """
    codes, errors, scales, zeros = [], [], [], []
    w = w_OB
    for start in range(0, w_OB.shape[1], group_size):
        scale, zero = minmax_params(w[:, start:start + group_size], bits, sym)

        def column(j, carry):
            w, group_codes, group_errors = carry
            col = jax.lax.dynamic_index_in_dim(w, start + j, axis=1, keepdims=False)
            code = jnp.clip(jnp.round(col / scale) + zero, 0, 2 ** bits - 1)
            err = (col - (code - zero) * scale) / u_BB[start + j, start + j]
            w = w - err[:, None] * jax.lax.dynamic_index_in_dim(u_BB, start + j, axis=0)
            return w, group_codes.at[:, j].set(code), group_errors.at[:, j].set(err)

        empty = jnp.zeros((w.shape[0], group_size), jnp.float32)
        w, group_codes, group_errors = jax.lax.fori_loop(0, group_size, column, (w, empty, empty))
        codes.append(group_codes)
        errors.append(group_errors)
        scales.append(scale)
        zeros.append(zero)
    return jnp.concatenate(codes, axis=1), jnp.concatenate(errors, axis=1), jnp.stack(scales), jnp.stack(zeros)


def _upper_cholesky_of_inverse(hessian: np.ndarray) -> np.ndarray:
    """U upper triangular with U^T U = H^-1, from one Cholesky: with J the index reversal and J H J = R R^T,
    H^-1 = (J R^-1 J)^T (J R^-1 J), and J R^-1 J is upper triangular."""
    from scipy.linalg import solve_triangular

    r = np.linalg.cholesky(np.asarray(hessian[::-1, ::-1], np.float32))  # float32, as the reference does
    r_inv = solve_triangular(r, np.eye(len(r), dtype=np.float32), lower=True)
    return np.ascontiguousarray(r_inv[::-1, ::-1])


def _prepared_hessian(hessian: np.ndarray, w_OI: np.ndarray, damp: float):
    h = np.array(hessian, np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w_OI[:, dead] = 0.0
    h[np.diag_indices_from(h)] += damp * np.mean(np.diag(h))
    return h


def gptq_quantize(w_IO: np.ndarray, hessian: np.ndarray, *, bits: int, group_size: int, sym: bool = True,
                  desc_act: bool = False, damp: float = DAMP, shape: tuple | None = None,
                  where: str = "gptq") -> QuantizedWeight:
    """Quantizes w [I, O] against the input Hessian [I, I]; returns numpy codes, float16-exact scales, g_idx."""
    check_bits(bits)
    I, O = w_IO.shape
    contiguous_groups(I, group_size, where)  # checks that the group size divides I
    w = np.array(w_IO.T, np.float32)  # [O, I]: GPTQ walks the columns of the HF weight
    h = _prepared_hessian(hessian, w, damp)
    perm = np.argsort(-np.diag(h), kind="stable") if desc_act else np.arange(I)
    w, h = w[:, perm], h[np.ix_(perm, perm)]
    u = _upper_cholesky_of_inverse(h)
    gs = I if group_size == -1 else group_size
    block = gs * max(1, BLOCK // gs)
    codes, scales, zeros = [], [], []
    for start in range(0, I, block):
        end = min(start + block, I)
        c, err, s, z = _quantize_block(jnp.asarray(w[:, start:end]), jnp.asarray(u[start:end, start:end]),
                                       bits=bits, group_size=gs, sym=sym)
        w[:, end:] -= np.asarray(err) @ u[start:end, end:]
        codes.append(np.asarray(c))
        scales.append(np.asarray(s))
        zeros.append(np.asarray(z))
    inverse = np.argsort(perm)
    g_idx = (np.arange(I) // gs).astype(np.int32)[inverse]
    return QuantizedWeight(np.concatenate(codes, axis=1)[:, inverse].T.astype(np.uint8), np.concatenate(scales),
                           np.concatenate(zeros), g_idx, shape or (I, O))


# ---------------------------------------------------------------- checkpoint layout

def to_gptq_tensors(q: QuantizedWeight, bits: int) -> dict[str, np.ndarray]:
    """qweight / qzeros / scales / g_idx of one linear (v1 format: zeros stored minus one)."""
    return {
        "qweight": pack_int32(np.asarray(q.codes), bits, axis=0),
        "qzeros": pack_int32(np.asarray(q.zero).astype(np.int64) - 1, bits, axis=1),
        "scales": np.asarray(q.scale).astype(np.float16),
        "g_idx": np.asarray(q.g_idx, np.int32),
    }


def from_gptq_tensors(tensors: dict[str, np.ndarray], bits: int, shape: tuple, where: str) -> QuantizedWeight:
    """The leaf for one linear of a GPTQ checkpoint; `shape` is the weight in our per-layer layout."""
    codes = unpack_int32(tensors["qweight"], bits, axis=0)
    zero = (unpack_int32(tensors["qzeros"], bits, axis=1).astype(np.int32) + 1) & (2 ** bits - 1)
    scale = np.asarray(tensors["scales"], np.float32)
    g_idx = np.asarray(tensors["g_idx"], np.int32) if "g_idx" in tensors else \
        contiguous_groups(codes.shape[0], codes.shape[0] // scale.shape[0], where)
    if codes.shape[1] != scale.shape[1] or g_idx.shape[0] != codes.shape[0] or g_idx.max() >= scale.shape[0]:
        raise CheckpointError(f"{where}: GPTQ tensors do not agree (qweight unpacks to {codes.shape}, scales "
                          f"{scale.shape}, g_idx {g_idx.shape})")
    return QuantizedWeight(codes, scale, zero[:, :scale.shape[1]].astype(np.float32), g_idx, shape)


def gptq_config(bits: int, group_size: int, desc_act: bool, sym: bool) -> dict:
    return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym,
            "true_sequential": False, "damp_percent": DAMP, "checkpoint_format": "gptq"}
