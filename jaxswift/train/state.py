"""The train state: trainable leaves, frozen leaves, optimizer state, step, RNG and skip counters.

Params are split by a boolean mask into two trees of the same structure (None where a leaf belongs to the other),
so gradients are taken w.r.t. the trainable part only and LoRA keeps a single copy of the frozen base.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class TrainState:
    step: jax.Array
    trainable: Any
    frozen: Any
    opt_state: Any
    rng: jax.Array
    skipped_steps: jax.Array  # non-finite steps skipped in total
    bad_streak: jax.Array  # consecutive non-finite steps

    @property
    def params(self):
        return combine(self.trainable, self.frozen)


def partition(params, mask):
    """(trainable, frozen): leaves where mask is True, and the rest; None fills the holes."""
    trainable = jax.tree.map(lambda x, m: x if m else None, params, mask)
    frozen = jax.tree.map(lambda x, m: None if m else x, params, mask)
    return trainable, frozen


def combine(trainable, frozen):
    return jax.tree.map(lambda a, b: b if a is None else a, trainable, frozen, is_leaf=lambda x: x is None)


def init_train_state(params, mask, optimizer, seed: int) -> TrainState:
    trainable, frozen = partition(params, mask)
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, trainable=trainable, frozen=frozen, opt_state=optimizer.init(trainable),
                      rng=jax.random.key_data(jax.random.key(seed)), skipped_steps=zero, bad_streak=zero)


def _is_float(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def _cast(x, dtype):
    if isinstance(x, jax.ShapeDtypeStruct):  # the planner's abstract params
        return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
    return x.astype(dtype)


def master_weights(params, mask, dtype):
    """The params with every trained float leaf (mask True) in `dtype` (float32 master weights), the frozen ones
    (LoRA bases, --freeze_parameters) left in the dtype they were loaded in. Arrays or ShapeDtypeStructs."""
    return jax.tree.map(lambda x, m: _cast(x, dtype) if m and _is_float(x) else x, params, mask)


def compute_view(tree, dtype):
    """Float leaves wider than the compute `dtype` cast down to it: the step's forward runs on this view of the
    float32 master weights (mixed precision as MaxText does it); gradients flow back through the cast in float32."""
    dtype = jnp.dtype(dtype)
    return jax.tree.map(lambda x: x.astype(dtype) if _is_float(x) and x.dtype.itemsize > dtype.itemsize else x, tree)


def count_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))
