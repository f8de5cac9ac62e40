"""A grain pipeline over the packing functions, sharded by process, resumable.

Every step's batch is a pure function of (seed, step, shard): the epoch's rows come from `packing.epoch_rows`
(computed from example lengths only, so a huge random-access source is read lazily, one batch at a time), each
shard takes every `shard_count`-th row, and step s reads batch s % steps_per_epoch of epoch s // steps_per_epoch.
grain maps steps to batches with reader threads and prefetch.

Resuming: grain's iterator state (`it.get_state()`, `it.set_state(state)`, a small JSON-able dict that here is
just `{"next_index": step}`), or equivalently `make_grain_loader(..., start_step=step)` with the trainer's saved
step counter. Both continue with exactly the batches an uninterrupted run would have produced.

Every shard yields the same number of batches per epoch (short shards get empty, weight-0 rows), so processes of
one job always step in lockstep. `batch_size` is per process: the global batch is batch_size * shard_count rows.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import grain

from jaxswift.data.packing import Batch, assemble, epoch_rows
from jaxswift.errors import ConfigError


@dataclasses.dataclass(frozen=True, eq=False)
class ShardPlan:
    """Which rows shard `shard_index` of `shard_count` reads at each step."""

    lengths: tuple[int, ...]
    batch_size: int
    length: int
    packing: bool
    seed: int
    shard_index: int
    shard_count: int
    _epochs: dict = dataclasses.field(default_factory=dict, repr=False)  # epoch -> rows, the latest two

    @functools.cached_property
    def rows_per_shard(self) -> int:
        # Packing's row count depends only on the multiset of lengths, so it is the same every epoch.
        total = len(self._epoch(0))
        return -(-total // self.shard_count)

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.rows_per_shard // self.batch_size)

    def rows_at(self, step: int) -> list[list[int]]:
        epoch, k = divmod(step, self.steps_per_epoch)
        mine = self._epoch(epoch)[self.shard_index:: self.shard_count]
        return mine[k * self.batch_size: (k + 1) * self.batch_size]

    def _epoch(self, epoch: int) -> list[list[int]]:
        # Each step needs its epoch's plan; computing it once per epoch keeps a step O(batch). Reader threads may
        # race to compute it; both results are identical, so the race is harmless.
        rows = self._epochs.get(epoch)
        if rows is None:
            rows = epoch_rows(self.lengths, length=self.length, packing=self.packing, seed=self.seed, epoch=epoch)
            for old in [e for e in list(self._epochs) if e < epoch - 1]:
                self._epochs.pop(old, None)
            self._epochs[epoch] = rows
        return rows


def make_grain_loader(examples_or_source: Sequence[Any], *, batch_size: int, length: int, packing: bool, seed: int,
                      num_epochs: int, shard_index: int | None = None, shard_count: int | None = None,
                      start_step: int = 0, num_threads: int = 2, prefetch: int = 8) -> grain.IterDataset:
    """An iterable of batch dicts for `num_epochs` epochs; `iter()` it for a checkpointable grain iterator.

    `examples_or_source` is a list of `EncodedChat` or any random-access source (len + getitem -> EncodedChat);
    a source with a `lengths` attribute spares one pass over it. Shards default to this JAX process's place.
    """
    shard_index, shard_count = _shard(shard_index, shard_count)
    if batch_size <= 0 or num_epochs <= 0:
        raise ConfigError(f"batch_size={batch_size}, num_epochs={num_epochs}; both must be positive")
    lengths = getattr(examples_or_source, "lengths", None)
    lengths = tuple(int(n) for n in (lengths if lengths is not None else map(len, examples_or_source)))
    plan = ShardPlan(lengths, batch_size, length, packing, seed, shard_index, shard_count)
    steps = grain.MapDataset.range(plan.steps_per_epoch * num_epochs)[start_step:]
    batches = steps.map(functools.partial(_batch_at, plan, examples_or_source))
    return batches.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))


def _batch_at(plan: ShardPlan, source, step: int) -> Batch:
    return assemble(source, plan.rows_at(step), plan.length, plan.batch_size)


def _shard(index: int | None, count: int | None) -> tuple[int, int]:
    # Resolved at call time, not as default arguments, so importing this module does not start a JAX backend.
    if index is None or count is None:
        import jax
        index = jax.process_index() if index is None else index
        count = jax.process_count() if count is None else count
    if not 0 <= index < count:
        raise ConfigError(f"shard_index={index} must lie in [0, shard_count={count})")
    return index, count
