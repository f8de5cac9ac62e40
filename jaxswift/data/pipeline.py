"""The one step planner and the grain pipeline that feeds every trainer.

`StepPlan` says which rows make train step s: the epoch's rows come from `packing.epoch_rows` (a pure function of
the example lengths, the seed and the epoch: a huge random-access source is read lazily, one batch at a time), and
step s reads rows [k * R, (k + 1) * R) of epoch s // steps_per_epoch (k = s % steps_per_epoch, R the global rows of a
step). The data position is therefore just the step number: a resumed run sees exactly the batches an
uninterrupted one would have.

`make_grain_loader` maps steps to batches with grain's reader threads and prefetch, so a batch is assembled while
the device runs the previous step. A step's global batch is [A, B, T] (A gradient-accumulation microbatches of B
rows); each process assembles only its own block of the B rows (`rows`, from the batch sharding), so a process
never touches the examples of another. All processes agree on the row length, computed from the lengths alone.

Resuming: grain's iterator state (`it.get_state()`, `it.set_state(state)`, a small JSON-able dict), or equivalently
`make_grain_loader(..., start_step=step)` with the trainer's saved step counter.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import grain

from jaxswift.data.packing import Batch, assemble, epoch_rows
from jaxswift.errors import ConfigError

# Unpacked rows pad to the step's longest row, rounded up to a bucket: steps of 64 tokens up to 1024 (at most 64 pad
# tokens a row where CPU steps are slow and rows short), then a quarter of each power of two. Each bucket costs one
# compilation (seconds), so a bounded set of shapes covers every batch.
BUCKETS = (*range(64, 1024, 64), *(b for p in range(10, 16) for b in (2 ** p, 5 * 2 ** (p - 2), 3 * 2 ** (p - 1),
                                                                      7 * 2 ** (p - 2))), 2 ** 16)


def bucket_length(n: int, cap: int) -> int:
    return min(next((b for b in BUCKETS if b >= n), n), cap)


Assembler = Callable[[Any, Sequence[Sequence[int]], int], Batch]  # (source, rows, row length) -> [len(rows), T]


@dataclasses.dataclass(frozen=True, eq=False)
class StepPlan:
    """Which examples make each train step (see the module docstring)."""

    lengths: tuple[int, ...]  # every example's token count
    rows_per_step: int  # global rows of one step: microbatches x rows per microbatch
    length: int  # packing length, or the longest an unpacked row may be
    packing: bool
    seed: int
    micro_batches: int = 1
    _epochs: dict = dataclasses.field(default_factory=dict, repr=False)  # epoch -> rows, the latest two

    def __post_init__(self):
        if self.rows_per_step <= 0 or self.micro_batches <= 0 or self.rows_per_step % self.micro_batches:
            raise ConfigError(f"{self.rows_per_step} rows per step cannot split into {self.micro_batches} "
                              "microbatches")
        if not self.lengths:
            raise ConfigError("no examples to plan steps over")

    @functools.cached_property
    def steps_per_epoch(self) -> int:
        # Packing's row count depends only on the multiset of lengths, so it is the same every epoch.
        return -(-len(self.epoch(0)) // self.rows_per_step)

    def epoch(self, epoch: int) -> list[list[int]]:
        # Each step needs its epoch's plan; computing it once per epoch keeps a step O(batch). Reader threads may
        # race to compute it; both results are identical, so the race is harmless.
        rows = self._epochs.get(epoch)
        if rows is None:
            rows = epoch_rows(self.lengths, length=self.length, packing=self.packing, seed=self.seed, epoch=epoch)
            for old in [e for e in list(self._epochs) if e < epoch - 1]:
                self._epochs.pop(old, None)
            self._epochs[epoch] = rows
        return rows

    def rows_at(self, step: int) -> list[list[int]]:
        """Step `step`'s global rows (0-based), the last step of an epoch filled up with empty rows."""
        epoch, k = divmod(step, self.steps_per_epoch)
        rows = self.epoch(epoch)[k * self.rows_per_step:(k + 1) * self.rows_per_step]
        return rows + [[] for _ in range(self.rows_per_step - len(rows))]

    def row_length(self, rows: Sequence[Sequence[int]]) -> int:
        """Packed rows are `length` long; unpacked ones are cut to the step's longest example (bucketed)."""
        if self.packing:
            return self.length
        return bucket_length(max(self.lengths[r[0]] for r in rows if r), self.length)

    def batch_at(self, source, step: int, rows: tuple[int, int] | None = None,
                 assemble_fn: Assembler = assemble) -> Batch:
        """Step `step`'s [A, b, T] batch: rows rows[0]..rows[1] of each microbatch (default: all of them)."""
        global_rows = self.rows_at(step)
        A = self.micro_batches
        B = self.rows_per_step // A
        first, last = rows or (0, B)
        mine = [global_rows[a * B + b] for a in range(A) for b in range(first, last)]
        batch = assemble_fn(source, mine, self.row_length(global_rows))
        return {k: v.reshape(A, last - first, *v.shape[1:]) for k, v in batch.items()}


def shard_rows(rows_per_microbatch: int, shard_index: int, shard_count: int) -> tuple[int, int]:
    """Shard `shard_index`'s contiguous block of a microbatch's rows, for loaders outside a mesh."""
    if not 0 <= shard_index < shard_count:
        raise ConfigError(f"shard_index={shard_index} must lie in [0, shard_count={shard_count})")
    if rows_per_microbatch % shard_count:
        raise ConfigError(f"{rows_per_microbatch} rows per microbatch do not split into {shard_count} shards")
    per = rows_per_microbatch // shard_count
    return shard_index * per, (shard_index + 1) * per


def make_grain_loader(source: Sequence[Any], plan: StepPlan, *, num_steps: int, start_step: int = 0,
                      rows: tuple[int, int] | None = None, assemble_fn: Assembler = assemble,
                      num_threads: int = 2, prefetch: int = 4) -> grain.IterDataset:
    """Batches of steps start_step .. num_steps - 1 (0-based); `iter()` it for a checkpointable grain iterator.

    `source` is any random-access sequence of examples (len + getitem); `rows` this process's block of each
    microbatch's rows (default: all); `assemble_fn(source, rows, length)` lays rows out (SFT's by default)."""
    if not 0 <= start_step <= num_steps:
        raise ConfigError(f"start step {start_step} outside the run's {num_steps} steps")
    steps = grain.MapDataset.range(num_steps)[start_step:]
    batches = steps.map(functools.partial(_batch_at, plan, source, rows, assemble_fn))
    return batches.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))


def _batch_at(plan: StepPlan, source, rows, assemble_fn, step: int) -> Batch:
    return plan.batch_at(source, int(step), rows, assemble_fn)


def lengths_of(source) -> tuple[int, ...]:
    """Token counts of every example; a source with a `lengths` attribute spares one pass over it."""
    lengths = getattr(source, "lengths", None)
    return tuple(int(n) for n in (lengths if lengths is not None else map(len, source)))


def index_loader(count: int, fn: Callable[[int], Any], *, start: int = 0, num_threads: int = 1,
                 prefetch: int = 2) -> grain.IterDataset:
    """fn(start), fn(start + 1), ... fn(count - 1) through grain (for streams that are not row batches, such as the
    prompts of GRPO's generations)."""
    items = grain.MapDataset.range(count)[start:].map(lambda i: fn(int(i)))
    return items.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))

