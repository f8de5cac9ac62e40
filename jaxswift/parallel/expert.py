"""Expert parallelism over the `expert` mesh axis: the "moe_experts" override (see models/moe.py).

Tokens are split over the batch mesh axes of the rule table plus `expert`; the E experts over `expert`, P devices
holding E / P each. Inside a shard_map each device (letters as models/moe.py; P devices, S slots):
  1. writes each of its assignments into a send buffer [P, S, D] at (device of its expert, next free slot),
     with the expert's local id beside it ([P, S]; E / P marks an empty slot);
  2. all-to-all over `expert`: device p receives the rows of every device meant for its experts;
  3. runs its experts as dropless grouped matmuls (models/moe.py `local_experts`);
  4. all-to-all back; each assignment reads its row where it sent it, weights it and adds it to its token.
Slots per (source, destination) pair: S = r * min(X, E / P) for r local rows (a row sends at most one assignment
per expert), or C * E / P when the per-expert capacity C is smaller. Drops by capacity are decided before
(models/moe.py, over all rows in order), so the result equals the single-device one.
Per MoE layer and device, the forward moves three all-to-alls (rows P*S*D, local ids P*S, results P*S*D); the
backward two more (the rows' and results' cotangents).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxswift.errors import ConfigError
from jaxswift.models.moe import local_experts

AXIS = "expert"


def token_axes(mesh, rules) -> tuple[str, ...]:
    """The mesh axes that split token rows inside the expert computation: the rules' batch axes, then `expert`."""
    batch = tuple(a for a in rules.activations.get("batch", ()) if a != AXIS and mesh.shape[a] > 1)
    return batch + ((AXIS,) if mesh.shape[AXIS] > 1 else ())


def send_slots(local_rows: int, top_k: int, local_experts_count: int, capacity: int | None) -> int:
    """S: the most assignments one device can send to one other device."""
    slots = local_rows * min(top_k, local_experts_count)
    return slots if capacity is None else min(slots, capacity * local_experts_count)


def _dispatch_compute_combine(x_rD, expert_rX, weight_rX, gate, up, down, *, devices: int, slots: int):
    """One device's part (inside shard_map): send assignments to their experts' devices, run the local experts,
    bring the results back. expert_rX holds global ids; E (or any id >= E) means no expert."""
    r, X = expert_rX.shape
    local_count = gate.shape[0]
    flat = expert_rX.reshape(-1)
    dest = flat // local_count  # == devices for dropped assignments: out of range, so never written
    onehot = dest[:, None] == jnp.arange(devices)[None, :]
    slot = jnp.sum(jnp.cumsum(onehot, axis=0) * onehot, axis=-1) - 1
    row = jnp.arange(r * X) // X
    send_x = jnp.zeros((devices, slots, x_rD.shape[-1]), x_rD.dtype).at[dest, slot].set(x_rD[row], mode="drop")
    send_id = jnp.full((devices, slots), local_count, jnp.int32).at[dest, slot].set(flat % local_count,
                                                                                     mode="drop")
    recv_x = jax.lax.all_to_all(send_x, AXIS, 0, 0, tiled=True)
    recv_id = jax.lax.all_to_all(send_id, AXIS, 0, 0, tiled=True)
    ones = jnp.ones((devices * slots, 1), jnp.float32)
    out = local_experts(recv_x.reshape(devices * slots, -1), recv_id.reshape(-1, 1), ones,
                        {"gate": gate, "up": up, "down": down})
    back = jax.lax.all_to_all(out.reshape(devices, slots, -1), AXIS, 0, 0, tiled=True)
    kept = dest < devices
    y_AD = back[jnp.where(kept, dest, 0), jnp.where(kept, slot, 0)]
    weight_A = jnp.where(kept, weight_rX.reshape(-1), 0.0).astype(y_AD.dtype)
    return jnp.zeros_like(x_rD).at[row].add(y_AD * weight_A[:, None])


def _current_mesh(mesh):
    """The mesh to shard_map over: inside another strategy's shard_map (the pipeline's, manual over `stage`) the
    context's abstract mesh, which records the manual axes; else ours."""
    context = jax.sharding.get_abstract_mesh()
    manual = jax.sharding.AxisType.Manual
    return context if not context.empty and manual in context.axis_types else mesh


def _local_body(x_rD, expert_rX, weight_rX, gate, up, down):
    return local_experts(x_rD, expert_rX, weight_rX, {"gate": gate, "up": up, "down": down})


def make_moe_experts(mesh, rules, options=None):
    """The "moe_experts" for this mesh and rule table (options: unused, for the common shape): expert-parallel
    over `expert` when it has more than one device; else each data shard runs all experts on its own rows (a
    shard_map, so that the sort and the grouped matmuls stay per shard instead of XLA gathering every row)."""
    devices = mesh.shape[AXIS]
    axes = token_axes(mesh, rules)
    if not axes:
        return local_experts
    shards = math.prod(mesh.shape[a] for a in axes)
    tokens = PartitionSpec(axes)

    def moe_experts(x_RD, expert_RX, weight_RX, experts: dict, capacity: int | None = None):
        E = experts["gate"].shape[0]
        if E % devices:
            raise ConfigError(f"--mesh expert={devices}: num_experts ({E}) must be divisible by the expert axis "
                              f"size ({devices})")
        R, X = expert_RX.shape
        pad = -R % shards  # rows added so that every device gets as many; they take no expert
        if pad:
            x_RD = jnp.pad(x_RD, ((0, pad), (0, 0)))
            expert_RX = jnp.pad(expert_RX, ((0, pad), (0, 0)), constant_values=E)
            weight_RX = jnp.pad(weight_RX, ((0, pad), (0, 0)))
        if devices > 1:
            slots = send_slots((R + pad) // shards, X, E // devices, capacity)
            body = functools.partial(_dispatch_compute_combine, devices=devices, slots=slots)
        else:
            body = _local_body
        experts_spec = PartitionSpec(AXIS if devices > 1 else None)
        fn = jax.shard_map(body, mesh=_current_mesh(mesh), in_specs=(tokens, tokens, tokens, experts_spec, experts_spec,
                                                      experts_spec), out_specs=tokens, check_vma=False)
        out = fn(x_RD, expert_RX, weight_RX, experts["gate"], experts["up"], experts["down"])
        return out[:R] if pad else out

    return moe_experts
