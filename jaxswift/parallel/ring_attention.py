"""Sequence (context) parallelism: ring attention over the mesh axis `sequence` (the "self_attention" override).

Each of the n devices of the `sequence` axis holds T/n tokens of every row: its queries and its own block of keys
and values. The key/value blocks travel around the ring with `jax.lax.ppermute` (n - 1 hops) while every device folds
each block it sees into an online softmax (running max and sum in float32). The backward pass is a custom VJP in the
flash-attention style (only q, k, v, the output and its log-sum-exp are kept): k and v go around the ring again with
their gradient accumulators, which take one extra hop home. Per layer and step: 2 (n - 1) collective-permutes
forward, 2 (n - 1) + 2 n backward, each moving one [B, T/n, K, H] block (under remat, the recomputed forward's k, v
hops are the backward's own, and XLA keeps one copy).

The mask is the model's (same segment, causal by position, within the sliding window; segment 0 is padding),
computed from the explicit positions, so the result is exact for any token order. A pair of blocks whose mask is
empty is skipped (`jax.lax.cond`): that is where causal load balancing pays. `balance_sequence` permutes the tokens
of a batch before the model (every per-token array alike; the loss is a sum over tokens), so that each device holds
an equal share of the causal work (`--ring_attention_layout`):
  zigzag      device d holds chunks d and 2n-1-d of 2n (default); each block is split in two halves, and on every
              ring step but the first, two of the four half-block pairs are fully masked and skipped;
  striped     device d holds tokens d, d+n, d+2n, ...: every block pair is about half masked, none is skipped;
  contiguous  device d holds chunk d: blocks from later devices are skipped, but the last device does all the
              work of the others' ring steps (no balancing).
Other mesh axes stay as the rule table puts them: rows over its batch axes, heads over its heads axes (when both
query and kv heads divide). Forward and backward are each one `shard_map` over every mesh axis not already manual,
so the ring also runs inside a pipeline stage (stage x sequence meshes).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxswift.errors import ConfigError
from jaxswift.models.transformer import attention_mask
from jaxswift.parallel.strategies import ParallelOptions

AXIS = "sequence"
LAYOUTS = ("zigzag", "striped", "contiguous")
SEQUENCE_KEYS = ("tokens", "targets", "loss_weights", "segment_ids", "positions")  # per-token arrays of a batch
_MASKED = -0.7 * float(np.finfo(np.float32).max)  # finite: a fully masked row gives no NaN


# ---------------------------------------------------------------------------------------------------------------
# layouts: which tokens each device holds


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ConfigError(f"--ring_attention_layout {layout!r}: expected one of {' | '.join(LAYOUTS)}")


def check_sequence_length(T: int, n: int, layout: str) -> None:
    """T must split into the layout's chunks: 2n for zigzag, n otherwise."""
    check_layout(layout)
    parts = 2 * n if layout == "zigzag" else n
    if T % parts:
        why = f"2 x mesh axis sequence={n}" if layout == "zigzag" else f"mesh axis sequence={n}"
        raise ConfigError(f"ring attention (--ring_attention_layout {layout}): sequence length {T} is not divisible "
                          f"by {parts} ({why}); set --max_length / --packing_length to a multiple of {parts} "
                          f"(unpacked rows are padded to power-of-two buckets up to --max_length)")


def token_order(T: int, n: int, layout: str) -> np.ndarray:
    """[T] original token index at each position of the balanced order; device d holds positions d*T/n ...."""
    check_sequence_length(T, n, layout)
    index = np.arange(T)
    if layout == "contiguous":
        return index
    if layout == "striped":
        return index.reshape(T // n, n).T.reshape(-1)
    chunks = index.reshape(2 * n, T // (2 * n))
    return np.concatenate([np.concatenate([chunks[d], chunks[2 * n - 1 - d]]) for d in range(n)])


def balance_sequence(batch: dict, n: int, layout: str, keys=SEQUENCE_KEYS) -> dict:
    """The batch with the per-token arrays (`keys`, last axis T) put in the layout's order; other entries as they
    are. Exact for the SFT loss (a sum over tokens) because attention masks by the explicit positions."""
    if n == 1 or layout == "contiguous":
        return batch
    if "positions" not in batch or "segment_ids" not in batch:
        raise ValueError("balance_sequence needs explicit positions and segment_ids in the batch")
    order = token_order(batch["tokens"].shape[-1], n, layout)
    return {k: (v[..., order] if k in keys else v) for k, v in batch.items()}


def balanced_step(step: Callable, mesh, options: ParallelOptions | None = None) -> Callable:
    """step(first, batch, *rest) that first balances the batch's tokens over the `sequence` axis (the identity
    when sequence == 1, and under Ulysses, where every device attends over the whole row). For steps whose result
    is a sum over tokens (SFT train and eval)."""
    n = mesh.shape.get(AXIS, 1)
    options = options or ParallelOptions()
    layout = options.ring_attention_layout
    if n == 1 or options.sequence_parallel == "ulysses":
        return step

    def balanced(first, batch, *rest):
        return step(first, balance_sequence(batch, n, layout), *rest)

    return balanced


# ---------------------------------------------------------------------------------------------------------------
# one pair of blocks: online softmax forward, flash-style backward


def _scores(q_BTKGH, k_BSKH, mask_BTS):
    H = q_BTKGH.shape[-1]
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32) * H ** -0.5
    return jnp.where(mask_BTS[:, None, None], scores, _MASKED)


def _fold(stats, q, k, v, mask):
    """(running max m, sum l [B, K, G, T], weighted values acc [B, K, G, T, H]) after one more block of keys."""
    def update(stats):
        m, l, acc = stats
        scores = _scores(q, k, mask)
        m_new = jnp.maximum(m, scores.max(-1))
        p = jnp.where(mask[:, None, None], jnp.exp(scores - m_new[..., None]), 0.0)
        correction = jnp.exp(m - m_new)
        pv = jnp.einsum("BKGTS,BSKH->BKGTH", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return m_new, l * correction + p.sum(-1), acc * correction[..., None] + pv
    return jax.lax.cond(jnp.any(mask), update, lambda s: s, stats)


def _pair_grads(grads, q, k, v, do, delta, lse, mask):
    """(dq [B, T, K, G, H], dk, dv [B, S, K, H]) plus this pair's share; p recomputed from the log-sum-exp."""
    def update(grads):
        dq, dk, dv = grads
        H = q.shape[-1]
        p = jnp.where(mask[:, None, None], jnp.exp(_scores(q, k, mask) - lse[..., None]), 0.0)
        dv = dv + jnp.einsum("BKGTS,BKGTH->BSKH", p, do)
        dp = jnp.einsum("BKGTH,BSKH->BKGTS", do, v.astype(jnp.float32))
        ds = p * (dp - delta[..., None]) * H ** -0.5
        dq = dq + jnp.einsum("BKGTS,BSKH->BTKGH", ds, k.astype(jnp.float32))
        dk = dk + jnp.einsum("BKGTS,BTKGH->BSKH", ds, q.astype(jnp.float32))
        return dq, dk, dv
    return jax.lax.cond(jnp.any(mask), update, lambda g: g, grads)


# ---------------------------------------------------------------------------------------------------------------
# the ring, on one device's blocks (inside shard_map)


def _rotate(x, n: int):
    """Each device's block to the next device of the ring."""
    return jax.lax.ppermute(x, AXIS, [(i, (i + 1) % n) for i in range(n)])


def _block(x_BT, index, size):
    return jax.lax.dynamic_slice_in_dim(x_BT, index * size, size, axis=1)


def _split(x, parts: int, axis: int):
    return jnp.split(x, parts, axis=axis) if parts > 1 else [x]


def _masks(positions, segment_ids, window, q_index, k_index, size, parts):
    """masks[i][j] [B, size/parts, size/parts]: part i of block q_index's queries against part j of k_index's keys
    (positions, segment_ids: every token's [B, T], replicated over the ring)."""
    q_pos, q_seg = _block(positions, q_index, size), _block(segment_ids, q_index, size)
    k_pos, k_seg = _block(positions, k_index, size), _block(segment_ids, k_index, size)
    q_sides = zip(_split(q_pos, parts, 1), _split(q_seg, parts, 1))
    k_sides = list(zip(_split(k_pos, parts, 1), _split(k_seg, parts, 1)))
    return [[attention_mask(qp, qs, kp, ks, window) for kp, ks in k_sides] for qp, qs in q_sides]


def _ring_forward(q, k, v, positions, segment_ids, window, n, parts):
    """(out [B, T/n, N, H], lse [B, K, G, T/n]) of this device's queries over every block of the ring."""
    B, Tl, N, H = q.shape
    K = k.shape[2]
    q = q.reshape(B, Tl, K, N // K, H)
    me = jax.lax.axis_index(AXIS)
    q_parts = _split(q, parts, 1)
    rows = Tl // parts
    stats = [(jnp.full((B, K, N // K, rows), _MASKED, jnp.float32), jnp.zeros((B, K, N // K, rows), jnp.float32),
              jnp.zeros((B, K, N // K, rows, H), jnp.float32)) for _ in range(parts)]
    for step in range(n):
        masks = _masks(positions, segment_ids, window, me, (me - step) % n, Tl, parts)
        k_parts, v_parts = _split(k, parts, 1), _split(v, parts, 1)
        for i in range(parts):
            for j in range(parts):
                stats[i] = _fold(stats[i], q_parts[i], k_parts[j], v_parts[j], masks[i][j])
        if step < n - 1:
            k, v = _rotate(k, n), _rotate(v, n)
    m, l, acc = (jnp.concatenate(x, axis=3) for x in zip(*stats))
    seen = l > 0
    out = acc / jnp.where(seen, l, 1.0)[..., None]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, Tl, N, H).astype(q.dtype), lse


def _ring_backward(q, k, v, positions, segment_ids, window, out, lse, d_out, n, parts):
    B, Tl, N, H = q.shape
    K = k.shape[2]
    q = q.reshape(B, Tl, K, N // K, H)
    do = d_out.astype(jnp.float32).reshape(B, Tl, K, N // K, H).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    o = out.astype(jnp.float32).reshape(B, Tl, K, N // K, H).transpose(0, 2, 3, 1, 4)
    delta = jnp.sum(do * o, axis=-1)
    me = jax.lax.axis_index(AXIS)
    q_parts, do_parts = _split(q, parts, 1), _split(do, parts, 3)
    delta_parts, lse_parts = _split(delta, parts, 3), _split(lse, parts, 3)
    dq = [jnp.zeros(x.shape, jnp.float32) for x in q_parts]
    dk, dv = jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    for step in range(n):
        masks = _masks(positions, segment_ids, window, me, (me - step) % n, Tl, parts)
        k_parts, v_parts = _split(k, parts, 1), _split(v, parts, 1)
        dk_parts, dv_parts = _split(dk, parts, 1), _split(dv, parts, 1)
        for i in range(parts):
            for j in range(parts):
                dq[i], dk_parts[j], dv_parts[j] = _pair_grads(
                    (dq[i], dk_parts[j], dv_parts[j]), q_parts[i], k_parts[j], v_parts[j], do_parts[i],
                    delta_parts[i], lse_parts[i], masks[i][j])
        dk, dv = jnp.concatenate(dk_parts, axis=1), jnp.concatenate(dv_parts, axis=1)
        if step < n - 1:
            k, v = _rotate(k, n), _rotate(v, n)
        dk, dv = _rotate(dk, n), _rotate(dv, n)  # with their block; after the last step, home
    dq = jnp.concatenate(dq, axis=1).reshape(B, Tl, N, H)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


# ---------------------------------------------------------------------------------------------------------------
# the override


def _mesh_entry(rules, logical: str, dim: int, mesh):
    """The rule table's mesh axes for a dimension (size-1 axes and `sequence` dropped; None when they do not
    divide it), as one PartitionSpec entry."""
    axes = tuple(a for a in rules.activations.get(logical, ()) if mesh.shape[a] > 1 and a != AXIS)
    if not axes or dim % math.prod(mesh.shape[a] for a in axes):
        return None
    return axes[0] if len(axes) == 1 else axes


def _varying_like(x, like):
    """x, varying over the manual mesh axes `like` varies over. Inside a pipeline stage (a shard_map over `stage`)
    what comes out of the ring's shard_map has lost that type, and left so, JAX would treat the output as the same on
    every stage (summing its cotangent over them) and reject the gradients."""
    missing = tuple(sorted(jax.typeof(like).mat.varying - jax.typeof(x).mat.varying))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def _with_flash_vjp(forward: Callable, backward: Callable) -> Callable:
    """(q, k, v, positions, segment_ids, window) -> out, keeping only the inputs, out and its log-sum-exp for the
    backward, which recomputes the probabilities block by block."""
    @jax.custom_vjp
    def ring(q, k, v, positions, segment_ids, window):
        return _varying_like(forward(q, k, v, positions, segment_ids, window)[0], q)

    def fwd(*args):
        out, lse = forward(*args)
        return _varying_like(out, args[0]), (*args, out, lse)

    def bwd(residuals, d_out):
        grads = backward(*residuals, d_out)
        return (*(_varying_like(g, x) for g, x in zip(grads, residuals)), None, None, None)

    ring.defvjp(fwd, bwd)
    return ring


def _shard_map(fn, mesh, in_specs, out_specs):
    """shard_map over every mesh axis not already manual: inside a pipeline stage (a shard_map over `stage`), the
    ring takes the remaining axes of the context's mesh."""
    manual = set(jax.sharding.get_abstract_mesh().manual_axes)
    if manual:
        return jax.shard_map(fn, in_specs=in_specs, out_specs=out_specs, check_vma=False,
                             axis_names=set(mesh.axis_names) - manual)
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def make_self_attention(mesh, rules, options: ParallelOptions | None = None) -> Callable:
    """The "self_attention" override (see models/hints.py): ring attention over the mesh axis `sequence`.
    Expects the tokens in the layout's order (`balance_sequence`); any order gives the same result, only slower."""
    layout = (options or ParallelOptions()).ring_attention_layout
    check_layout(layout)
    n = mesh.shape[AXIS]
    parts = 2 if layout == "zigzag" else 1

    def self_attention(q_BTNH, k_BTKH, v_BTKH, positions_BT, segment_ids_BT, window):
        B, T, N, _ = q_BTNH.shape
        K = k_BTKH.shape[2]
        check_sequence_length(T, n, layout)
        rows = _mesh_entry(rules, "batch", B, mesh)
        heads = _mesh_entry(rules, "heads", N, mesh)
        if heads != _mesh_entry(rules, "kv_heads", K, mesh):
            heads = None  # query and kv heads must split alike for each device to keep whole GQA groups
        blocks, sides, lse = P(rows, AXIS, heads, None), P(rows, None), P(rows, heads, None, AXIS)
        inputs = (blocks, blocks, blocks, sides, sides, P())
        forward = _shard_map(functools.partial(_ring_forward, n=n, parts=parts), mesh, inputs, (blocks, lse))
        backward = _shard_map(functools.partial(_ring_backward, n=n, parts=parts), mesh,
                              (*inputs, blocks, lse, blocks), (blocks, blocks, blocks))
        ring = _with_flash_vjp(forward, backward)
        return ring(q_BTNH, k_BTKH.astype(q_BTNH.dtype), v_BTKH.astype(q_BTNH.dtype), positions_BT.astype(jnp.int32),
                    segment_ids_BT.astype(jnp.int32), jnp.asarray(window, jnp.int32))

    return self_attention
