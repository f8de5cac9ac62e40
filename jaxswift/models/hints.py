"""Activation sharding hints and parallel overrides, in logical terms only.

Model code calls `constrain(x, ("batch", "seq", "embed"))` at block boundaries. Outside a mesh this is the
identity; `jaxswift.parallel.rules.activation_sharding(...)` installs the function that maps logical names to mesh
axes, so no physical axis name ever appears under models/.

The same goes for the parts of the forward that a parallel strategy replaces wholesale: the model asks
`override(name, default)` and gets the default unless jaxswift/parallel/ installed one with `use_overrides`:
  "run_layers"      (layer_fn, x_BTD, side, layer_xs) -> (x_BTD, aux): run the stacked layers (pipeline).
                    layer_fn(x_BTD, side, xs) -> (x_BTD, aux); `side` is a tuple of per-row [B, ...] arrays
                    (positions, segment ids, M-RoPE positions, parent segment ids; the last two may be None)
                    that a microbatching runner splits along with x.
  "self_attention"  (q_BTNH, k_BTKH, v_BTKH, positions_BT, segment_ids_BT, window) -> out_BTNH (ring attention).
  "moe_experts"     expert computation of an MoE block (expert parallelism); see models/moe.py.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable

_CONSTRAINT: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("jaxswift_constraint", default=None)
_OVERRIDES: contextvars.ContextVar[dict] = contextvars.ContextVar("jaxswift_overrides", default={})


def constrain(x, logical_axes: tuple[str | None, ...]):
    fn = _CONSTRAINT.get()
    return x if fn is None else fn(x, logical_axes)


def sharded() -> bool:
    """Whether activation sharding hints are installed: the model is traced for a mesh of several devices
    (`parallel.rules.activation_sharding` installs none for one device)."""
    return _CONSTRAINT.get() is not None


@contextlib.contextmanager
def use_constraint(fn: Callable | None):
    token = _CONSTRAINT.set(fn)
    try:
        yield
    finally:
        _CONSTRAINT.reset(token)


def override(name: str, default: Callable) -> Callable:
    return _OVERRIDES.get().get(name, default)


@contextlib.contextmanager
def use_overrides(**fns: Callable | None):
    """Installs (or, with None, removes) overrides for the code traced inside; others stay as they were."""
    merged = {**_OVERRIDES.get(), **fns}
    token = _OVERRIDES.set({k: v for k, v in merged.items() if v is not None})
    try:
        yield
    finally:
        _OVERRIDES.reset(token)
