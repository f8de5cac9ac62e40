"""Quantized weights for inference: `--quant_method int8|nf4` on load, and the int8 leaf the decode step reads.

`RowInt8Weight` keeps int8 codes in torch's orientation [.., O, I] (each output channel's inputs contiguous) with one
float32 scale per output channel, w[o, i] = codes[o, i] * scale[o]. int8 serving stores every attention and MLP
projection this way, and the output projection too (`int8_output_head`; a tied model keeps its float embedding for
the lookup). Its matmul never forms the whole float weight:

- few rows (decoding: up to DECODE_ROWS tokens x slots) on CPU: the int8 kernel (jaxswift/kernels/int8_matvec.cc,
  an XLA FFI custom call built on first use; docs/kernels.md), which streams each code once, converts it to float
  in a register and multiplies it into every row of x. Batch-1 decoding is memory-bound: SmolLM2 in int8 reads
  ~135 MB of weights per token instead of float32's 538 MB, and steps ~2.3x faster (benchmarks/serve_quant.py).
- few rows without the kernel (other platforms, JAXSWIFT_INT8_KERNEL=0, no C++ compiler, RowInt8Weight.kernel=False):
  plain XLA, `xla_matvec`. For a projection, x is multiplied into the codes and summed over I inside one reduction
  fusion that reads each code once (the inputs split into LANES-wide runs and the runs summed first, so the
  innermost loop adds whole vectors: XLA keeps float sums in order, and a plain sum over the contiguous I axis would
  be a scalar chain). For a wide weight (the output projection) that reduction is slow, so blocks of rows are
  converted to float and dotted one at a time. Same numbers as the kernel up to float summation order; on CPU about
  as fast as float32, no faster.
- many rows (prefill) convert the codes to the compute dtype and run one dot, where the conversion is paid once
  for many tokens; XLA allocates that one weight's float copy as a temporary.

XLA:CPU has no int8-weight dot: it converts an int8 operand to a whole float array before the dot (docs/DECISIONS.md),
which is why the decode path is a kernel of our own.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxswift.errors import ConfigError
from jaxswift.kernels import int8_matvec
from jaxswift.quant.nf4 import LINEAR_NAMES, QUANT_METHODS, apply_dequantized, quantize_params

F32 = jnp.float32
LANES = 16  # inputs summed as LANES-wide vectors in the reduction path
DECODE_ROWS = 8  # up to this many rows (tokens x slots) take the decode path (the int8 kernel, or xla_matvec)
WIDE_ROWS = 16384  # weights with this many outputs (output projections) take blocked_matmul without the kernel
BLOCK_ROWS = 4096


@struct.dataclass
class RowInt8Weight:
    """codes int8 [..., O, I]; scale float32 [..., O]; per-layer in/out shapes of our layout in static fields.
    kernel=False keeps this weight's decode matmul in plain XLA (`xla_matvec`) even where the int8 kernel runs:
    benchmarks and tests compare the two in one process (JAXSWIFT_INT8_KERNEL=0 turns the kernel off everywhere)."""
    codes: Any
    scale: Any
    in_shape: tuple = struct.field(pytree_node=False, default=())
    out_shape: tuple = struct.field(pytree_node=False, default=())
    kernel: bool = struct.field(pytree_node=False, default=True)

    @property
    def shape(self) -> tuple:
        """The float weight's shape in our layout, leading axes included."""
        return (*self.codes.shape[:-2], *self.in_shape, *self.out_shape)

    def dequantize(self, dtype=F32):
        w = self.codes.astype(F32) * self.scale[..., None]
        return jnp.swapaxes(w, -1, -2).reshape(self.shape).astype(dtype)

    def apply(self, equation: str, x):
        rows = math.prod(x.shape[:-len(self.in_shape)])
        if rows > DECODE_ROWS:
            y = apply_dequantized(equation, x, self.codes.astype(x.dtype), self.in_shape, self.out_shape)
            return (y * self.scale.reshape(self.out_shape).astype(y.dtype)).astype(x.dtype)
        _check_equation(equation, len(self.in_shape))
        kept = x.shape[:-len(self.in_shape)]
        x_RI = x.reshape(rows, -1)
        if self.kernel:
            y_RO = int8_matvec.matvec(x_RI, self.codes, self.scale, fallback=xla_matvec)
        else:
            y_RO = xla_matvec(x_RI, self.codes, self.scale)
        return y_RO.astype(x.dtype).reshape(*kept, *self.out_shape)


def _check_equation(equation: str, n_in: int):
    inputs, out = equation.replace(" ", "").split("->")
    x_spec, w_spec = inputs.split(",")
    if x_spec[-n_in:] != w_spec[:n_in] or out != x_spec[:-n_in] + w_spec[n_in:]:
        raise ValueError(f"quantized weights need x's trailing axes to be the weight's inputs, got {equation!r}")


def reduce_matmul(x_RI, codes_OI):
    """float32 [R, O] = x @ codes.T as one reduction over int8 codes read in place (no float copy of them)."""
    R, I = x_RI.shape
    lanes = LANES if I % LANES == 0 else 1
    # Tied to this weight, x is a value of its own: XLA would otherwise share one broadcast of x between the
    # projections that read the same input (q/k/v, gate/up) and write it out whole, as large as a float weight.
    x_RI, _ = jax.lax.optimization_barrier((x_RI, codes_OI))
    x = x_RI.astype(F32).reshape(R, 1, I // lanes, lanes)
    codes = codes_OI.reshape(codes_OI.shape[0], I // lanes, lanes)
    return jnp.sum(jnp.sum(x * codes.astype(F32), axis=2), axis=-1)


def xla_matvec(x_RI, codes_OI, scale_O):
    """float32 [R, O] = x @ codes.T * scale in plain XLA: the decode matmul where the int8 kernel does not run.
    A reduction over the codes, or for a wide weight (an output projection) dots over row blocks."""
    block = _row_block(codes_OI.shape[0])
    y_RO = reduce_matmul(x_RI, codes_OI) if block is None else blocked_matmul(x_RI, codes_OI, block)
    return y_RO * scale_O


def _row_block(rows: int) -> int | None:
    """The divisor of `rows` nearest BLOCK_ROWS in [BLOCK_ROWS / 4, 2 * BLOCK_ROWS], for weights of at least
    WIDE_ROWS outputs; None: the reduction (narrower weights, or no such divisor)."""
    if rows < WIDE_ROWS:
        return None
    divisors = [d for d in range(BLOCK_ROWS // 4, 2 * BLOCK_ROWS + 1) if rows % d == 0]
    return min(divisors, key=lambda d: abs(d - BLOCK_ROWS)) if divisors else None


def blocked_matmul(x_RI, codes_OI, block: int):
    """float32 [R, O] = x @ codes.T, converting one block of `block` code rows to float at a time inside a loop: the
    float copy XLA makes before a dot is one block's (10 MB at 4096 x 576), not the weight's. XLA's reduction over
    SmolLM2's 49152-row output projection ran ~10x slower than its float matvec; these block dots run about as fast."""
    blocks_NBI = codes_OI.reshape(-1, block, codes_OI.shape[1])
    x_RI = x_RI.astype(F32)
    y_NRB = jax.lax.map(lambda c_BI: x_RI @ c_BI.astype(F32).T, blocks_NBI)
    return jnp.moveaxis(y_NRB, 0, 1).reshape(x_RI.shape[0], -1)


def row_int8(w, n_in: int, *, lead: int = 1) -> RowInt8Weight:
    """Our-layout float weight [lead..., *in, *out] -> RowInt8Weight: symmetric, per output channel,
    scale = absmax / 127 (the compressed-tensors int8 scheme `jaxswift export --quant_method int8` writes)."""
    in_shape, out_shape = tuple(w.shape[lead:lead + n_in]), tuple(w.shape[lead + n_in:])
    w_OI = jnp.swapaxes(w.astype(F32).reshape(*w.shape[:lead], math.prod(in_shape), -1), -1, -2)
    absmax = jnp.max(jnp.abs(w_OI), axis=-1)
    scale = jnp.where(absmax > 0, absmax, 1.0) / 127.0
    codes = jnp.clip(jnp.round(w_OI / scale[..., None]), -127, 127).astype(jnp.int8)
    return RowInt8Weight(codes, scale, in_shape, out_shape)


def quantize_on_load(params: dict, cfg, method: str, where: str) -> dict:
    """params with every attention and MLP projection stored quantized for inference: `int8` (RowInt8Weight) or
    `nf4` (bitsandbytes' NF4, quant.nf4). int8 quantizes the output projection too (`int8_output_head`); embeddings
    (the lookup), norms, and nf4's output projection stay float."""
    if method not in QUANT_METHODS:
        raise ConfigError(f"--quant_method {method!r}: expected one of {' | '.join(QUANT_METHODS)}")
    layers = params["layers"]
    quantized = [name for name in LINEAR_NAMES if name in layers and hasattr(layers[name], "apply")]
    if quantized:
        raise ConfigError(f"--quant_method {method}: {where} is already quantized ({', '.join(quantized)} are "
                          f"{type(layers[quantized[0]]).__name__}); drop --quant_method to serve it as it is")
    if method == "nf4":
        return quantize_params(params, cfg, "nf4")
    from jaxswift.models.spec import param_specs

    specs = param_specs(cfg)["layers"]
    names = tuple((name, len(specs[name].fan_in_axes)) for name in LINEAR_NAMES if name in layers)
    params = {**params, "layers": {**layers, **_row_int8_all({name: layers[name] for name, _ in names}, names)}}
    return int8_output_head(params, cfg)


def int8_output_head(params: dict, cfg) -> dict:
    """params whose output projection is a RowInt8Weight `lm_head` (per vocabulary row, as the projections).

    Decoding one token reads the whole output projection (SmolLM2: 49152 x 576, 113 MB in float32, more than all
    its int8 projections' 107 MB), so int8 serving quantizes it as well. SmolLM2's held-out perplexity in int8 is
    +0.35% of float32's with it, +0.55% without (benchmarks/serve_quant.py). A tied model keeps its float embedding
    for the token lookup and gets the int8 copy beside it (models.transformer.output_weight reads it)."""
    from jaxswift.models.transformer import output_weight

    w_DV = output_weight(params, cfg)
    if hasattr(w_DV, "apply"):  # already quantized (a folder's lm_head)
        return params
    return {**params, "lm_head": jax.jit(lambda w: row_int8(w, 1, lead=0))(w_DV)}


def _row_int8_all(weights: dict, names: tuple) -> dict:
    return jax.jit(lambda ws: {name: row_int8(ws[name], n_in) for name, n_in in names})(weights)


def as_row_int8(leaf, key: str):
    """A loaded int8 QuantizedWeight with one scale per output channel (compressed-tensors int8, what `jaxswift
    export --quant_method int8` writes) as the same codes in a RowInt8Weight; any other leaf unchanged."""
    from jaxswift.quant.qweight import QuantizedWeight, input_axes

    if not isinstance(leaf, QuantizedWeight) or leaf.zero is not None or leaf.scale.shape[-2] != 1 \
            or np.dtype(leaf.codes.dtype) != np.int8:
        return leaf
    n_in = input_axes(key)
    return RowInt8Weight(jnp.swapaxes(leaf.codes, -1, -2), leaf.scale[..., 0, :].astype(F32),
                         tuple(leaf.shape[:n_in]), tuple(leaf.shape[n_in:]))


def inference_params(params: dict, cfg, quant_method: str | None, where: str) -> dict:
    """The params a server or `jaxswift infer` runs: quantized on load with `quant_method`, or, without it, a
    quantized folder's int8 leaves in the decode-friendly RowInt8Weight, plus an int8 output projection when there
    are any (as `--quant_method int8` gives); other formats as loaded."""
    if quant_method is not None:
        return quantize_on_load(params, cfg, quant_method, where)
    layers = params.get("layers")
    if not isinstance(layers, dict):
        return params
    layers = {key: as_row_int8(leaf, key) if key in LINEAR_NAMES else leaf for key, leaf in layers.items()}
    params = {**params, "layers": layers}
    if any(isinstance(leaf, RowInt8Weight) for leaf in layers.values()):
        return int8_output_head(params, cfg)
    return params
