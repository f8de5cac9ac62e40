"""Sequence (context) parallelism: Ulysses attention over the mesh axis `sequence` (`--sequence_parallel ulysses`).

Outside attention every op is token-local, so the activations stay split along the sequence: each of the n devices
of the `sequence` axis holds T/n tokens of every row and all of their heads. Around attention, one all-to-all per
tensor swaps that split for a split over heads (DeepSpeed-Ulysses):

    q [B, T/n, N, H] --all-to-all--> [B, T, N/n, H]     (k and v alike, with their kv heads)
    attention of the whole sequence, n times fewer heads per device: the model's own `self_attention`
    out [B, T, N/n, H] --all-to-all--> [B, T/n, N, H]

The backward is autodiff's: the transpose of an all-to-all is the reverse all-to-all, so dq, dk, dv and d_out take
the same four. Per layer and step: 4 all-to-alls forward, 4 backward (4 more under remat, where the layer's forward
runs again), each moving (n-1)/n of one [B, T/n, heads, H] block off the device. Unlike the ring, the
volume per device does not grow with n, and no causal balancing is needed (every device attends over the whole
sequence for its heads), so the tokens stay in their order.

Positions and segment ids (packing, padding, causality, sliding windows) reach the attention whole, [B, T] on every
device of the axis: the trainers' batches are replicated over `sequence` (only activations are split), so the mask
of each device's heads is the model's mask of the whole row, built locally.

Heads: the query heads must split n ways; where they do not, the run is refused with a message naming
--sequence_parallel (the ring has no such limit). Kv heads (GQA) that do not split n ways are repeated first, each
r = n / gcd(K, n) times: K r = lcm(K, n) kv heads, which n divides and N (a multiple of K and of n) is a multiple of,
so every device still holds whole query groups with their kv head. That costs r times the bytes for k and v on the
wire and nothing in the result (a repeated head's gradients are summed back by autodiff). Under a `tensor` axis
these counts are those of one tensor shard (N / tensor, K / tensor).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxswift.errors import ConfigError
from jaxswift.models.transformer import self_attention as local_attention
from jaxswift.parallel.ring_attention import AXIS, _mesh_entry, _shard_map, _varying_like
from jaxswift.parallel.strategies import ParallelOptions


def kv_repeats(num_heads: int, num_kv_heads: int, n: int, where: str = "") -> int:
    """How many times each kv head is repeated so that n devices each get whole GQA groups (1: none). Raises a
    ConfigError naming --sequence_parallel when the query heads do not split n ways; `where` says whose heads.

    r = n / gcd(K, n) makes K r = lcm(K, n), which n divides; N is a multiple of both K and n, hence of K r, so each
    device's N / n query heads still read whole kv heads: only the query heads can make Ulysses impossible."""
    if num_heads % n:
        raise ConfigError(
            f"--sequence_parallel ulysses with mesh axis sequence={n}: the {num_heads} query heads{where} do not "
            f"divide by {n} (each device of the sequence axis attends with 1/{n} of the heads). Use a sequence size "
            f"that divides {num_heads}, or --sequence_parallel ring (which splits the tokens, not the heads)")
    return n // math.gcd(num_kv_heads, n)


def check_heads(num_heads: int, num_kv_heads: int, mesh, rules) -> int:
    """kv_repeats for the heads one device of the rule table's head axes (tensor) holds."""
    n = mesh.shape[AXIS]
    heads, kv_heads = local_heads(num_heads, num_kv_heads, mesh, rules)
    where = f" per {'x'.join(_head_axes(num_heads, num_kv_heads, mesh, rules))} shard" if heads != num_heads else ""
    return kv_repeats(heads, kv_heads, n, where)


def _head_axes(num_heads, num_kv_heads, mesh, rules) -> tuple[str, ...]:
    """The mesh axes query and kv heads are both split over (as the ring does: alike, or not at all)."""
    entry = _mesh_entry(rules, "heads", num_heads, mesh)
    if entry is None or entry != _mesh_entry(rules, "kv_heads", num_kv_heads, mesh):
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def local_heads(num_heads, num_kv_heads, mesh, rules) -> tuple[int, int]:
    """(query heads, kv heads) of one shard of the rule table's head axes (tensor): what the sequence axis splits."""
    ways = math.prod(mesh.shape[a] for a in _head_axes(num_heads, num_kv_heads, mesh, rules))
    return num_heads // ways, num_kv_heads // ways


def check_sequence_length(T: int, n: int) -> None:
    if T % n:
        raise ConfigError(f"--sequence_parallel ulysses: sequence length {T} is not divisible by mesh axis "
                          f"sequence={n}; set --max_length / --packing_length to a multiple of {n} (unpacked rows "
                          f"are padded to power-of-two buckets up to --max_length)")


def _to_heads(x_BTNH):
    """[B, T/n, N, H] (this device's tokens, all heads) -> [B, T, N/n, H] (all tokens, this device's heads)."""
    return jax.lax.all_to_all(x_BTNH, AXIS, split_axis=2, concat_axis=1, tiled=True)


def _to_tokens(x_BTNH):
    """The inverse: [B, T, N/n, H] -> [B, T/n, N, H]."""
    return jax.lax.all_to_all(x_BTNH, AXIS, split_axis=1, concat_axis=2, tiled=True)


def _forward(q_BTNH, k_BTKH, v_BTKH, positions_BT, segment_ids_BT, window, repeats):
    """One device's part (inside shard_map): its tokens of q, k, v in; the same tokens of the output, and q, k, v
    split over heads (the backward's residuals), out."""
    if repeats > 1:  # kv head j -> copies j*r ... j*r + r-1: query head i still reads kv head i // (N/K)
        k_BTKH, v_BTKH = jnp.repeat(k_BTKH, repeats, axis=2), jnp.repeat(v_BTKH, repeats, axis=2)
    q, k, v = _to_heads(q_BTNH), _to_heads(k_BTKH), _to_heads(v_BTKH)
    return _to_tokens(local_attention(q, k, v, positions_BT, segment_ids_BT, window)), q, k, v


def _backward(q, k, v, positions_BT, segment_ids_BT, window, d_out_BTNH, repeats):
    """dq, dk, dv of this device's tokens: d_out to heads, the local attention's VJP (its probabilities recomputed,
    as flash attention does, rather than kept from the forward), the gradients back to tokens."""
    _, vjp = jax.vjp(lambda q, k, v: local_attention(q, k, v, positions_BT, segment_ids_BT, window), q, k, v)
    dq, dk, dv = (_to_tokens(g) for g in vjp(_to_heads(d_out_BTNH)))
    if repeats > 1:  # a repeated kv head's gradient is the sum over its copies
        dk, dv = (g.reshape(*g.shape[:2], -1, repeats, g.shape[-1]).sum(3) for g in (dk, dv))
    return dq, dk, dv


def _with_recomputing_vjp(forward: Callable, backward: Callable) -> Callable:
    """(q, k, v, positions, segment_ids, window) -> out, keeping q, k, v split over heads for the backward (the
    layer's own q, k, v and the probabilities are not kept). Its own VJP also keeps autodiff out of the shard_maps,
    whose residuals a pipeline stage (a shard_map over `stage` around this one) cannot lay out."""
    @jax.custom_vjp
    def attend(q, k, v, positions, segment_ids, window):
        return _varying_like(forward(q, k, v, positions, segment_ids, window)[0], q)

    def fwd(q, k, v, positions, segment_ids, window):
        out, *heads = forward(q, k, v, positions, segment_ids, window)
        varying = q[:, :0]  # no bytes: carries the manual axes q (and k, v, from the same layer) vary over
        return _varying_like(out, q), (*heads, positions, segment_ids, window, varying)

    def bwd(residuals, d_out):
        *inputs, varying = residuals
        grads = backward(*inputs, d_out)
        return (*(_varying_like(g, varying) for g in grads), None, None, None)

    attend.defvjp(fwd, bwd)
    return attend


def make_self_attention(mesh, rules, options: ParallelOptions | None = None) -> Callable:
    """The "self_attention" override (see models/hints.py): Ulysses attention over the mesh axis `sequence`.
    Expects the tokens in their own order (no balancing)."""
    n = mesh.shape[AXIS]

    def self_attention(q_BTNH, k_BTKH, v_BTKH, positions_BT, segment_ids_BT, window):
        B, T, N, _ = q_BTNH.shape
        K = k_BTKH.shape[2]
        check_sequence_length(T, n)
        repeats = check_heads(N, K, mesh, rules)
        head_axes = _head_axes(N, K, mesh, rules)
        heads = None if not head_axes else head_axes[0] if len(head_axes) == 1 else head_axes
        rows = _mesh_entry(rules, "batch", B, mesh)
        blocks, sides = P(rows, AXIS, heads, None), P(rows, None)
        split_heads = P(rows, None, (*head_axes, AXIS), None)  # tensor shard major, then this device's share
        residuals = (split_heads,) * 3 + (sides, sides, P())
        forward = _shard_map(functools.partial(_forward, repeats=repeats), mesh,
                             (blocks, blocks, blocks, sides, sides, P()), (blocks, *residuals[:3]))
        backward = _shard_map(functools.partial(_backward, repeats=repeats), mesh, (*residuals, blocks),
                              (blocks, blocks, blocks))
        attend = _with_recomputing_vjp(forward, backward)
        return attend(q_BTNH, k_BTKH.astype(q_BTNH.dtype), v_BTKH.astype(q_BTNH.dtype),
                      positions_BT.astype(jnp.int32), segment_ids_BT.astype(jnp.int32),
                      jnp.asarray(window, jnp.int32))

    return self_attention
