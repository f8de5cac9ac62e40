"""Activation sharding hints, in logical axis names only.

Model code calls `constrain(x, ("batch", "seq", "embed"))` at block boundaries. Outside a mesh this is the
identity; `jaxswift.parallel.rules.activation_sharding(...)` installs the function that maps logical names to mesh
axes, so no physical axis name ever appears under models/.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable

_CONSTRAINT: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("jaxswift_constraint", default=None)


def constrain(x, logical_axes: tuple[str | None, ...]):
    fn = _CONSTRAINT.get()
    return x if fn is None else fn(x, logical_axes)


@contextlib.contextmanager
def use_constraint(fn: Callable | None):
    token = _CONSTRAINT.set(fn)
    try:
        yield
    finally:
        _CONSTRAINT.reset(token)
