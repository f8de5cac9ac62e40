"""Q-GaLore (Zhang et al., 2024) the way VITA-Group/Q-GaLore computes it: GaLore with quantized weights and
projectors and lazily refreshed subspaces.

- Weights of the projected layers are kept as 8-bit codes, asymmetric min-max per group of 256 values
  (`GroupQuantized`, Q-GaLore's QGaLoreLinear); the forward dequantizes them inside `linear`. After each update the
  float weight (dequantized + update) is quantized again with fresh per-group scales and stochastic rounding:
  floor(w / s) + 1 with probability frac(w / s), so E[dequantized] = w and small updates are not rounded away.
- Projectors P are stored with 4 bits, asymmetric min-max per group of 256 (Q-GaLore's `_quantize(n_bit=4)`), two
  codes per byte.
- Lazy subspace updates: at each refresh the cosine similarity between the new and the previous projector's first
  singular vector joins a queue of the last `queue_size`; when the queue is full and its mean is >= cos_threshold,
  that layer's refresh interval is multiplied by gamma_proj. A refresh happens when step % interval == 0. Layers of a
  stacked leaf keep their own intervals; the SVD runs only on steps where at least one of them is due.

jax.grad cannot differentiate integer codes, so the train step differentiates at `float_view(trainable)` (the
dequantized weights, formed inside the jitted step) and `apply_updates` writes the result back as codes: the
persistent state holds 1 byte per weight, the step's transient buffers hold float32 weights and gradients (the
PyTorch version avoids those with per-layer backward hooks).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jaxswift.errors import ConfigError
from jaxswift.optim.galore import (Matrix, MaskTree, _adam_moments, _back, _check_args, _low_rank_shapes,
                                   _lr_and_trailing_decay, _one_minus_pow, _project, _projector, _resolve, _to_torch)
from jaxswift.quant.nf4 import pack_nibbles, unpack_nibbles

F32 = jnp.float32
MAX_INTERVAL = 2 ** 30


# --- group quantization -------------------------------------------------------------------------------------------


@struct.dataclass
class GroupQuantized:
    """An array stored as `bits`-bit codes, asymmetric min-max per group of `group` values of each lead index's
    flattened trailing axes (zero-padded to whole groups): w = scale * (code - zero).

    codes uint8 [..., groups * group] (bits 8) or [..., groups * group / 2] (bits 4, two per byte, high nibble
    first); scales, zeros float32 [..., groups]. `shape` is the trailing shape, `dtype` the float dtype it stands
    for.
    """
    codes: Any
    scales: Any
    zeros: Any
    shape: tuple = struct.field(pytree_node=False, default=())
    bits: int = struct.field(pytree_node=False, default=8)
    group: int = struct.field(pytree_node=False, default=256)
    dtype: str = struct.field(pytree_node=False, default="float32")

    def dequantize(self, dtype=None):
        lead = self.scales.shape[:-1]
        n = math.prod(self.shape)
        codes = unpack_nibbles(self.codes, self.scales.shape[-1] * self.group) if self.bits == 4 else self.codes
        q = codes.reshape(*lead, -1, self.group).astype(F32)
        w = (q - self.zeros[..., None]) * self.scales[..., None]
        return w.reshape(*lead, -1)[..., :n].reshape(*lead, *self.shape).astype(dtype or self.dtype)

    def apply(self, equation: str, x):
        from jaxswift.models.transformer import linear

        return linear(equation, x, self.dequantize(x.dtype))


def is_group_quantized(x) -> bool:
    return isinstance(x, GroupQuantized)


def _groups(x, lead: int, group: int):
    flat = x.reshape(*x.shape[:lead], -1).astype(F32)
    pad = -flat.shape[-1] % group
    if pad:
        flat = jnp.pad(flat, [(0, 0)] * lead + [(0, pad)])
    return flat.reshape(*flat.shape[:-1], -1, group)


def quantize_groups(x, *, lead: int, bits: int = 8, group: int = 256, key=None, uniform=None) -> GroupQuantized:
    """Q-GaLore's min-max quantization: scale = max(max - min, 1e-5) / (2^bits - 1), zero = clip(-round(min /
    scale)), code = clip(round(x / scale) + zero). With `key` (or `uniform`: U[0, 1) draws shaped [..., groups,
    group]), stochastic rounding instead of round."""
    if bits not in (4, 8):
        raise ConfigError(f"group quantization supports 4 or 8 bits, got {bits}")
    g = _groups(x, lead, group)
    max_int = 2 ** bits - 1
    lo, hi = jnp.min(g, axis=-1), jnp.max(g, axis=-1)
    scales = jnp.maximum(hi - lo, 1e-5) / max_int
    zeros = jnp.clip(-jnp.round(lo / scales), 0, max_int)
    scaled = g / scales[..., None]
    if key is not None:
        uniform = jax.random.uniform(key, scaled.shape)
    if uniform is None:
        q = jnp.round(scaled)
    else:
        down = jnp.floor(scaled)
        q = down + (uniform < scaled - down)
    codes = jnp.clip(q + zeros[..., None], 0, max_int).astype(jnp.uint8).reshape(*g.shape[:-2], -1)
    if bits == 4:
        codes = pack_nibbles(codes, fill=0)
    return GroupQuantized(codes, scales, zeros, tuple(x.shape[lead:]), bits, group, jnp.dtype(x.dtype).name)


def requantize_stochastic(w: GroupQuantized, new_value, uniform) -> GroupQuantized:
    """`new_value` (float, w's shape) as w's kind of codes, with fresh scales and stochastic rounding driven by
    `uniform` (U[0, 1) of shape [..., groups, group])."""
    lead = w.scales.ndim - 1
    out = quantize_groups(new_value.astype(F32), lead=lead, bits=w.bits, group=w.group, uniform=uniform)
    return out.replace(dtype=w.dtype)


# --- the train-state side: quantized weights, their float view, stochastic write-back ---------------------------


def quantize_weights(params, layout, group: int = 256):
    """params with each leaf that `layout` marks with a galore Matrix stored as 8-bit GroupQuantized codes
    (per-layer groups: the leading batch axes of the Matrix stay lead axes)."""
    def one(mat, x):
        if not isinstance(mat, Matrix):
            return x
        return quantize_groups(x, lead=mat.batch_dims, bits=8, group=group)
    return jax.jit(lambda p: jax.tree.map(one, layout, p))(params)  # one compile, not one per eager op


def float_view(tree):
    """The tree with every GroupQuantized leaf dequantized (what the step differentiates); others unchanged."""
    return jax.tree.map(lambda x: x.dequantize() if is_group_quantized(x) else x, tree, is_leaf=is_group_quantized)


def apply_updates(params, updates, key):
    """optax.apply_updates, except that a GroupQuantized leaf gets dequantize + update, stored again with
    stochastic rounding (one key per leaf)."""
    leaves, treedef = jax.tree.flatten(params, is_leaf=is_group_quantized)
    if not any(map(is_group_quantized, leaves)):
        return optax.apply_updates(params, updates)
    ups = treedef.flatten_up_to(updates)
    shapes = [(*x.scales.shape, x.group) if is_group_quantized(x) else (0,) for x in leaves]
    sizes = [math.prod(shape) for shape in shapes]
    draws = jax.random.uniform(key, (sum(sizes),))  # one random call site: each costs seconds of compile on CPU
    starts = np.cumsum([0] + sizes[:-1])
    out = []
    for x, u, shape, start, size in zip(leaves, ups, shapes, starts, sizes):
        if is_group_quantized(x):
            uniform = jax.lax.dynamic_slice_in_dim(draws, int(start), size).reshape(shape)
            out.append(requantize_stochastic(x, x.dequantize(F32) + u.astype(F32), uniform))
        elif x is None:
            out.append(None)
        else:
            out.append(jnp.asarray(x + u).astype(x.dtype))
    return jax.tree.unflatten(treedef, out)


# --- the optimizer ------------------------------------------------------------------------------------------------


class ProjectorState(NamedTuple):
    proj: GroupQuantized  # P, 4-bit (or 8-bit) codes
    past: jax.Array  # [batch..., k] first singular vector at the last refresh
    queue: jax.Array  # [batch..., queue_size] cosine similarities of successive refreshes (latest last)
    queued: jax.Array  # [batch...] int32 entries in the queue (<= queue_size)
    interval: jax.Array  # [batch...] int32 refresh interval


class QGaloreState(NamedTuple):
    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates
    proj: optax.Updates  # ProjectorState per GaLore leaf; MaskedNode for the rest


def _first_vector(p, m: int, n: int):
    """The projector's leading singular vector: P's first row (right P, m >= n) or first column (left P)."""
    return p[..., 0, :] if m >= n else p[..., :, 0]


def _cosine(a, b):
    return jnp.sum(a * b, -1) / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-12)


def qgalore(rank: int = 128, update_proj_gap: int = 200, scale: float = 0.25, *, b1: float = 0.9,
            b2: float = 0.999, eps: float = 1e-6, galore_mask: MaskTree = True, proj_bits: int = 4,
            proj_group_size: int = 256, cos_threshold: float = 0.4, gamma_proj: int = 2,
            queue_size: int = 5) -> optax.GradientTransformation:
    """galore.galore's normalized Adam direction with quantized projectors and lazy refreshes (module docstring).
    Takes float gradients and params (see `float_view`)."""
    _check_args(rank, update_proj_gap)

    def new_projector_state(mat, x):
        batch, m, n = mat.split(x.shape)
        p_shape = _low_rank_shapes(mat, x.shape, rank)[1]
        proj = quantize_groups(jnp.zeros(p_shape, F32), lead=len(batch), bits=proj_bits, group=proj_group_size)
        return ProjectorState(proj, jnp.zeros((*batch, n if m >= n else m), F32),
                              jnp.zeros((*batch, queue_size), F32), jnp.zeros(batch, jnp.int32),
                              jnp.full(batch, update_proj_gap, jnp.int32))

    def init_fn(params):
        layout = _resolve(galore_mask, params)

        def moment(mat, x):
            return jnp.zeros(_low_rank_shapes(mat, x.shape, rank)[0] if isinstance(mat, Matrix) else x.shape, F32)

        mu = jax.tree.map(moment, layout, params)
        proj = jax.tree.map(lambda mat, x: new_projector_state(mat, x) if isinstance(mat, Matrix)
                            else optax.MaskedNode(), layout, params)
        return QGaloreState(jnp.zeros([], jnp.int32), mu, jax.tree.map(jnp.zeros_like, mu), proj)

    def refresh(x, ps: ProjectorState, due, count):
        """New projector where `due` (per batch index), with the lazy-interval bookkeeping."""
        m, n = x.shape[-2:]
        p_new = _projector(x, min(rank, m, n))
        v_new = _first_vector(p_new, m, n)
        pushed = due & (count > 0)
        queue = jnp.where(pushed[..., None], jnp.concatenate([ps.queue[..., 1:], _cosine(v_new, ps.past)[..., None]],
                                                             -1), ps.queue)
        queued = jnp.where(pushed, jnp.minimum(ps.queued + 1, queue_size), ps.queued)
        grow = pushed & (queued == queue_size) & (jnp.mean(queue, -1) >= cos_threshold)
        interval = jnp.where(grow, jnp.minimum(ps.interval * gamma_proj, MAX_INTERVAL), ps.interval)
        q_new = quantize_groups(p_new, lead=p_new.ndim - 2, bits=proj_bits, group=proj_group_size)
        proj = jax.tree.map(lambda new, old: jnp.where(due.reshape(due.shape + (1,) * (new.ndim - due.ndim)), new,
                                                       old), q_new, ps.proj)
        past = jnp.where(due[..., None], v_new, ps.past)
        return ProjectorState(proj, past, queue, queued, interval)

    def leaf_update(mat, g, mu, nu, ps, count, step_scale):
        x = g.astype(F32)
        if isinstance(mat, Matrix):
            x = _to_torch(x, mat)
            due = count % ps.interval == 0
            ps = jax.lax.cond(jnp.any(due), lambda: refresh(x, ps, due, count), lambda: ps)
            p = ps.proj.dequantize(F32)
            x = _project(x, p)
        n, mu, nu = _adam_moments(x, mu, nu, b1, b2, eps, step_scale)
        if isinstance(mat, Matrix):
            n = scale * _back(n, p, g.shape, mat)
        return n.astype(g.dtype), mu, nu, ps

    def update_fn(updates, state, params=None):
        del params
        leaves, treedef = jax.tree.flatten(updates)
        layout = treedef.flatten_up_to(_resolve(galore_mask, updates))
        t = (state.count + 1).astype(F32)
        step_scale = jnp.sqrt(_one_minus_pow(b2, t)) / _one_minus_pow(b1, t)
        out = [leaf_update(mat, g, mu, nu, ps, state.count, step_scale)
               for mat, g, mu, nu, ps in zip(layout, leaves, treedef.flatten_up_to(state.mu),
                                             treedef.flatten_up_to(state.nu), treedef.flatten_up_to(state.proj))]
        new, mu, nu, proj = (treedef.unflatten(list(col)) for col in zip(*out))
        return new, QGaloreState(state.count + 1, mu, nu, proj)

    return optax.GradientTransformation(init_fn, update_fn)


def qgalore_adamw(learning_rate, *, rank: int = 128, update_proj_gap: int = 200, scale: float = 0.25,
                  weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
                  galore_mask: MaskTree, decay_mask: MaskTree | None = None, proj_bits: int = 4,
                  proj_group_size: int = 256, cos_threshold: float = 0.4, gamma_proj: int = 2,
                  queue_size: int = 5) -> optax.GradientTransformation:
    """Q-GaLore AdamW: `qgalore` on the masked leaves, AdamW on the rest, galore_torch's trailing weight decay.
    init/update accept params holding GroupQuantized weights (they see their float view); write the updates back
    with `apply_updates`."""
    inner = optax.chain(
        qgalore(rank, update_proj_gap, scale, b1=b1, b2=b2, eps=eps, galore_mask=galore_mask, proj_bits=proj_bits,
                proj_group_size=proj_group_size, cos_threshold=cos_threshold, gamma_proj=gamma_proj,
                queue_size=queue_size),
        _lr_and_trailing_decay(learning_rate, weight_decay, decay_mask))

    def init_fn(params):
        return inner.init(float_view(params))

    def update_fn(updates, state, params=None):
        return inner.update(updates, state, None if params is None else float_view(params))

    return optax.GradientTransformation(init_fn, update_fn)
