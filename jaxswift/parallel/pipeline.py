"""Pipeline parallelism over the mesh axis `stage`: the "run_layers" override (see models/hints.py).

Layout. The stacked layers [L, ...] are cut into C = S * V chunks of Lc = L / C consecutive layers (S stages,
V virtual stages); chunk c = v * S + s runs on stage s as its v-th chunk. Each leaf becomes [S, V, Lc, ...], and
`jax.shard_map` over `stage` alone gives every stage its own [V, Lc, ...]; the other mesh axes (data, fsdp, tensor)
stay with XLA's SPMD partitioner inside (a partial-manual shard_map), so batch, weights and heads keep their rule
table shardings. With GPipe (V = 1) the chunks are the contiguous blocks that `layers: stage` (sharding/
pipeline.yaml) already keeps on each stage, so the reshape moves nothing. The circular schedule runs chunks
round-robin while they are stored by block: `block_to_round_robin` moves each chunk to its stage once per step with
V collective-permutes per weight (and the gradients back the same way). Weights stored replicated over `stage`
(default.yaml) are simply sliced, with no movement but no memory saved. Embedding, final norm and loss run
replicated over `stage` (outside the pipeline).

Schedule. The batch [B, ...] (x and the side arrays) is split into M microbatches of B / M rows (row i * M + m
goes to microbatch m, so each microbatch keeps the batch's data sharding). A work item k = v * P + m (P = max(M,
S) slots, slots m >= M idle) is microbatch m's pass through chunk row v. At iteration t stage s works on item
t - s, then every stage hands its output to the next with one `ppermute`; stage 0 takes fresh microbatches for the
first P items, and afterwards (circular) the last stage's output of item k - P, kept in a buffer since it arrived.
Items run in order, so N = V * P + S - 1 iterations finish all of them: the bubble is (S - 1) / N of the work,
which virtual stages shrink by V. Both schedules are this one loop (GPipe: V = 1, no wrap-around).
Gradients come from differentiating the loop (ppermute's transpose sends cotangents back a stage).

Why shard_map + ppermute (not vmap over stages with spmd_axis_name): the collectives are exactly the ones written
here (one collective-permute of a microbatch's activations per iteration, each way), which the collectives test
checks against a formula, and the per-stage code stays plain (dynamic indexing of this stage's own chunks)
instead of relying on the partitioner to turn a roll of a stage-sharded array into a permute.

MoE aux: each layer's aux of each microbatch, summed over layers and averaged over microbatches (a per-token mean
aux then equals the full batch's).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxswift.errors import ConfigError
from jaxswift.models import hints
from jaxswift.parallel.rules import partition_spec

log = logging.getLogger(__name__)
SCHEDULES = ("auto", "gpipe", "circular")
AXIS = "stage"


@dataclasses.dataclass(frozen=True)
class PipelinePlan:
    stages: int  # S
    virtual_stages: int  # V (chunks per stage)
    microbatches: int  # M
    layers_per_chunk: int  # Lc

    @property
    def slots(self) -> int:
        """P: item slots per chunk row; slots >= M are idle (the circular loop needs P >= S)."""
        return max(self.microbatches, self.stages) if self.virtual_stages > 1 else self.microbatches

    @property
    def iterations(self) -> int:
        return self.virtual_stages * self.slots + self.stages - 1


def resolve_schedule(options) -> str:
    """gpipe | circular from --pipeline_schedule and --virtual_stages; ConfigError on a contradiction."""
    schedule, virtual = options.pipeline_schedule, options.virtual_stages
    if schedule not in SCHEDULES:
        raise ConfigError(f"--pipeline_schedule {schedule!r}: expected one of {' | '.join(SCHEDULES)}")
    if not isinstance(virtual, int) or virtual < 1:
        raise ConfigError(f"--virtual_stages must be a positive integer, got {virtual!r}")
    if schedule == "circular" and virtual == 1:
        raise ConfigError("--pipeline_schedule circular needs --virtual_stages > 1 (layer chunks per stage)")
    if schedule == "gpipe" and virtual > 1:
        raise ConfigError(f"--pipeline_schedule gpipe runs one chunk per stage: --virtual_stages {virtual} needs "
                          "--pipeline_schedule circular (or auto)")
    if options.num_microbatches is not None and options.num_microbatches < 1:
        raise ConfigError(f"--num_microbatches must be positive, got {options.num_microbatches}")
    return "circular" if virtual > 1 else "gpipe"


def plan_pipeline(num_layers: int, batch_rows: int, stages: int, options) -> PipelinePlan:
    """The pipeline's shape for these layers and rows; ConfigError when they do not divide."""
    resolve_schedule(options)
    virtual = options.virtual_stages
    if num_layers % (stages * virtual):
        raise ConfigError(f"pipeline: {num_layers} layers are not divisible by mesh axis stage={stages} x "
                          f"--virtual_stages {virtual} (each stage runs {virtual} chunk(s) of equal depth)")
    microbatches = options.num_microbatches or default_microbatches(batch_rows, stages)
    if batch_rows % microbatches:
        raise ConfigError(f"pipeline: the batch of {batch_rows} rows (per-device batch size x data x fsdp) "
                          f"is not divisible by --num_microbatches {microbatches}")
    return PipelinePlan(stages, virtual, microbatches, num_layers // (stages * virtual))


def default_microbatches(batch_rows: int, stages: int) -> int:
    """One microbatch per stage, or the most that divide the rows when they are fewer (e.g. one row a step)."""
    microbatches = max(m for m in range(1, stages + 1) if batch_rows % m == 0)
    if microbatches < stages:
        log.warning("pipeline: %d rows a step give %d microbatch(es) for %d stages; the stages idle %.0f%% of the "
                    "step (raise --per_device_train_batch_size, or set --num_microbatches)", batch_rows,
                    microbatches, stages, 100 * (stages - 1) / (microbatches + stages - 1))
    return microbatches


# --- layouts ------------------------------------------------------------------------------------------------------


def round_robin_layout(a, plan: PipelinePlan):
    """[L, ...] -> [S, V, Lc, ...]: chunk c = v * S + s (layers c * Lc ...) at [s, v], the chunks stage s runs."""
    S, V, Lc = plan.stages, plan.virtual_stages, plan.layers_per_chunk
    return jnp.swapaxes(a.reshape(V, S, Lc, *a.shape[1:]), 0, 1)


def block_layout(a, plan: PipelinePlan):
    """[L, ...] -> [S, V, Lc, ...]: chunk c = s * V + i at [s, i], the contiguous block `layers: stage` keeps on
    stage s (a reshape that moves nothing)."""
    S, V, Lc = plan.stages, plan.virtual_stages, plan.layers_per_chunk
    return a.reshape(S, V, Lc, *a.shape[1:])


def relayout_rounds(stages: int, virtual: int) -> list[list[tuple[int, int, int]]]:
    """Moves from block to round-robin layout in `virtual` rounds, each a permutation of the stages:
    rounds[r][s] = (slot stage s sends, stage it goes to, slot it lands in). Chunk c goes from (c // V, c % V) to
    (c % S, c // S) in round (c + c // lcm(S, V)) mod V: a stage's V chunks are consecutive (distinct rounds),
    and the chunks one stage receives, c = d + k S, cover each residue mod V once (the c // lcm term shifts
    each lcm-block of them to the next coset of gcd(S, V))."""
    period = math.lcm(stages, virtual)
    rounds = [[None] * stages for _ in range(virtual)]
    for c in range(stages * virtual):
        source, slot = divmod(c, virtual)
        rounds[(c + c // period) % virtual][source] = (slot, c % stages, c // stages)
    return rounds


def block_to_round_robin(chunks, plan: PipelinePlan):
    """Inside the stage region: this stage's block chunks [V, Lc, ...] -> its round-robin chunks, with V
    collective-permutes per leaf (each chunk moves once; the gradient moves back the same way)."""
    stage = jax.lax.axis_index(AXIS)
    received, lands_in = [], []
    for moves in relayout_rounds(plan.stages, plan.virtual_stages):
        send = jnp.asarray([slot for slot, _, _ in moves])[stage]
        perm = [(s, to) for s, (_, to, _) in enumerate(moves)]
        received.append(jax.lax.ppermute(_take(chunks, send), AXIS, perm))
        lands_in.append({to: slot for _, to, slot in moves})
    # order[d][v]: the round in which stage d receives its chunk row v
    order = jnp.asarray([[next(r for r, land in enumerate(lands_in) if land[d] == v)
                          for v in range(plan.virtual_stages)] for d in range(plan.stages)])[stage]
    return jax.tree.map(lambda *rows: jnp.take(jnp.stack(rows), order, axis=0), *received)


def split_microbatches(a, microbatches: int):
    """[B, ...] -> [M, B / M, ...]; row i * M + m goes to microbatch m, so the rows stay where they were sharded."""
    return jnp.swapaxes(a.reshape(a.shape[0] // microbatches, microbatches, *a.shape[1:]), 0, 1)


def merge_microbatches(a):
    """Inverse of `split_microbatches`."""
    return jnp.swapaxes(a, 0, 1).reshape(a.shape[0] * a.shape[1], *a.shape[2:])


def _take(tree, i):
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), tree)


def _put(buffer, i, value, write):
    """buffer[i] = value where `write`, else unchanged."""
    old = jax.lax.dynamic_index_in_dim(buffer, i, keepdims=False)
    return jax.lax.dynamic_update_index_in_dim(buffer, jnp.where(write, value, old), i, 0)


def _scan_chunk(layer_fn, x_BTD, side, layer_xs):
    """`transformer.scan_layers` inside the stage region: its aux starts varying over stages, as the layers' is."""
    def body(carry, xs):
        x, aux = carry
        x, layer_aux = layer_fn(x, side, xs)
        return (x, aux + layer_aux), None
    aux = jax.lax.pcast(jnp.zeros((), jnp.float32), AXIS, to="varying")
    (x_BTD, aux), _ = jax.lax.scan(body, (x_BTD, aux), layer_xs)
    return x_BTD, aux


def _per_microbatch_keys(tree, micro):
    """PRNG keys among the layer inputs (LoRA dropout: one per layer) folded with the microbatch index, so each
    microbatch draws its own dropout masks instead of repeating one mask shape-for-shape."""
    def fold(a):
        if not jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            return a
        return jax.vmap(jax.random.fold_in, in_axes=(0, None))(a.reshape(-1), micro).reshape(a.shape)
    return jax.tree.map(fold, tree)


# --- the schedule (inside shard_map: one stage's view) ------------------------------------------------------------


def _stage_loop(layer_fn, plan: PipelinePlan, chunks, x_MbTD, side_M):
    """One stage's part of the pipeline -> (outputs [M, b, T, D] on the last stage (zeros elsewhere), its aux).

    chunks: this stage's (params, windows), each leaf [V, Lc, ...]; x_MbTD and side_M: all microbatches.
    """
    S, V, M, Pn = plan.stages, plan.virtual_stages, plan.microbatches, plan.slots
    stage = jax.lax.axis_index(AXIS)
    is_first, is_last = stage == 0, stage == S - 1
    to_next = [(s, (s + 1) % S) for s in range(S if V > 1 else S - 1)]
    varying = lambda a: jax.lax.pcast(a, AXIS, to="varying")  # noqa: E731  carries differ per stage

    def iteration(carry, t):
        received, loop_buf, out_buf, aux = carry
        item = t - stage
        valid = (item >= 0) & (item < V * Pn) & (item % Pn < M)
        item = jnp.clip(item, 0, V * Pn - 1)
        row, slot = item // Pn, item % Pn
        micro = jnp.minimum(slot, M - 1)
        fresh = jax.lax.dynamic_index_in_dim(x_MbTD, micro, keepdims=False)
        looped = jax.lax.dynamic_index_in_dim(loop_buf, slot, keepdims=False) if V > 1 else fresh
        x_in = jnp.where(is_first, jnp.where(row == 0, fresh, looped), received)
        xs = _per_microbatch_keys(_take(chunks, row), micro)
        y, layer_aux = _scan_chunk(layer_fn, x_in, _take(side_M, micro), xs)
        aux = aux + jnp.where(valid, layer_aux, 0.0)
        out_buf = _put(out_buf, micro, y, valid & is_last & (row == V - 1))
        received = jax.lax.ppermute(y, AXIS, to_next)
        if V > 1:  # stage 0 keeps what comes round from the last stage until its next chunk row needs it
            arrived = t - (S - 1)
            loop_buf = _put(loop_buf, jnp.mod(arrived, Pn), received, is_first & (arrived >= 0))
        return (received, loop_buf, out_buf, aux), None

    zeros = lambda *shape: jnp.zeros(shape, x_MbTD.dtype)  # noqa: E731
    one_micro = x_MbTD.shape[1:]
    init = (zeros(*one_micro), zeros(Pn if V > 1 else 1, *one_micro), zeros(*x_MbTD.shape),
            jnp.zeros((), jnp.float32))
    # x varying once here, so the backward sums its cotangent over the stages once rather than every iteration
    x_MbTD, init = varying(x_MbTD), tuple(map(varying, init))
    (_, _, out_buf, aux), _ = jax.lax.scan(iteration, init, jnp.arange(plan.iterations))
    return out_buf, aux


def stage_constraint(rules, mesh):
    """`hints.constrain` inside the stage region: the rule table's activation sharding over the mesh axes the
    partitioner still handles (`stage` is manual there, so the sharding names the context's abstract mesh)."""
    def constrain(x, logical):
        spec = partition_spec(logical, x.shape, rules.activations, mesh)
        spec = P(*(_without_stage(entry) for entry in spec))
        return jax.lax.with_sharding_constraint(x, NamedSharding(jax.sharding.get_abstract_mesh(), spec))
    return constrain


def _without_stage(entry):
    axes = tuple(a for a in ((entry,) if isinstance(entry, str) else entry or ()) if a != AXIS)
    return None if not axes else axes[0] if len(axes) == 1 else axes


def make_run_layers(mesh, rules, options):
    """The "run_layers" override for a mesh with stage > 1 (see the module docstring)."""
    stages = mesh.shape[AXIS]
    resolve_schedule(options)

    # layers stored in contiguous blocks on their stage (sharding/pipeline.yaml) enter the stage region as they
    # are; replicated ones (e.g. default.yaml) are sliced straight into the round-robin layout
    stored_on_stage = AXIS in rules.params.get("layers", ())

    def run_layers(layer_fn, x_BTD, side, layer_xs):
        num_layers = jax.tree.leaves(layer_xs)[0].shape[0]
        plan = plan_pipeline(num_layers, x_BTD.shape[0], stages, options)
        relayout = stored_on_stage and plan.virtual_stages > 1
        weights, rest = layer_xs[0], layer_xs[1:]  # (params, windows): windows are constants, never stored
        layout = block_layout if relayout else round_robin_layout
        chunks = (jax.tree.map(lambda a: layout(a, plan), weights),
                  jax.tree.map(lambda a: round_robin_layout(a, plan), rest))
        x_M = split_microbatches(x_BTD, plan.microbatches)
        side_M = jax.tree.map(lambda a: split_microbatches(a, plan.microbatches), side)

        def per_stage(chunks, x_M, side_M):
            weights, rest = jax.tree.map(lambda a: a[0], chunks)  # this stage's [V, Lc, ...]
            if relayout:
                weights = block_to_round_robin(weights, plan)
            chunks = (weights, *rest)
            with hints.use_constraint(stage_constraint(rules, mesh)):
                out, aux = _stage_loop(layer_fn, plan, chunks, x_M, side_M)
            return jax.lax.psum(out, AXIS), jax.lax.psum(aux, AXIS) / plan.microbatches

        staged = jax.shard_map(per_stage, mesh=mesh, in_specs=(P(AXIS), P(), P()), out_specs=(P(), P()),
                               axis_names={AXIS})
        out_M, aux = staged(chunks, x_M, side_M)
        return merge_microbatches(out_M), aux

    return run_layers
