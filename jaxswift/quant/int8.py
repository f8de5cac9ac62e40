"""int8 weights, symmetric per output channel, as bitsandbytes' LLM.int8 stores a Linear8bitLt weight.

Per output feature (a row of torch's (out, in) weight) absmax = max |w|, q = round(w * 127 / absmax) in int8
(bitsandbytes' `int8_vectorwise_quant`, its `CB`; absmax is its `SCB`). Dequantized w = q * absmax / 127. Kept in
our layout [layers, *in, *out], so the matmul runs on the int8 codes cast to the compute dtype and the per-channel
scale multiplies its output (exact by linearity): the float weight is never formed.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import struct

F32 = jnp.float32


@struct.dataclass
class Int8Weight:
    """q int8 [..., *in, *out]; absmax float32 [..., *out] (bitsandbytes' SCB). Frozen: no float leaf to train."""
    q: Any
    absmax: Any
    n_out: int = struct.field(pytree_node=False, default=1)

    @property
    def shape(self) -> tuple:
        return self.q.shape

    def scale(self):
        """float32 [..., *out]: absmax / 127."""
        return self.absmax.astype(F32) / 127.0

    def dequantize(self, dtype=F32):
        n_in, lead = self.q.ndim - self.absmax.ndim, self.absmax.ndim - self.n_out
        scale = jnp.expand_dims(self.scale(), tuple(range(lead, lead + n_in)))
        return (self.q.astype(F32) * scale).astype(dtype)

    def apply(self, equation: str, x):
        from jaxswift.models.transformer import linear

        y = linear(equation, x, self.q.astype(x.dtype))
        return (y.astype(F32) * self.scale()).astype(x.dtype)


def quantize_int8(w, n_in: int, *, lead: int = 1) -> Int8Weight:
    """Our-layout weight [lead..., *in, *out] -> Int8Weight, per output channel over the input axes."""
    inputs = tuple(range(lead, lead + n_in))
    w32 = w.astype(F32)
    absmax = jnp.max(jnp.abs(w32), axis=inputs)
    safe = jnp.where(absmax > 0, absmax, 1.0)
    q = jnp.round(w32 * jnp.expand_dims(127.0 / safe, inputs))
    return Int8Weight(jnp.clip(q, -127, 127).astype(jnp.int8), absmax, n_out=w.ndim - lead - n_in)
