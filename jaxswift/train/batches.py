"""The deterministic stream of train steps: step k always gets the same rows, so a resumed run sees exactly the
batches an uninterrupted one would (the data position is just the step number)."""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np

from jaxswift.data.cache import example_lengths
from jaxswift.data.packing import assemble, epoch_rows
from jaxswift.data.templates import EncodedChat

# Unpacked row lengths: steps of 64 tokens up to 1024 (at most 64 pad tokens a row where CPU steps are slow and
# rows short), then a quarter of each power of two. Each bucket costs one compilation (seconds).
BUCKETS = (*range(64, 1024, 64), *(b for p in range(10, 16) for b in (2 ** p, 5 * 2 ** (p - 2), 3 * 2 ** (p - 1),
                                                                      7 * 2 ** (p - 2))), 2 ** 16)


def bucket_length(n: int, cap: int) -> int:
    """Unpacked rows pad to the next bucket, so a bounded set of shapes (compilations) covers every batch."""
    return min(next((b for b in BUCKETS if b >= n), n), cap)


@dataclasses.dataclass(frozen=True)
class StepPlan:
    examples: Sequence[EncodedChat]
    rows_per_step: int  # micro batches x global batch
    micro_batches: int
    length: int  # packing length, or max_length when unpacked
    packing: bool
    seed: int

    def epoch(self, epoch: int) -> list[list[int]]:
        return epoch_rows(example_lengths(self.examples).tolist(), length=self.length, packing=self.packing,
                          seed=self.seed, epoch=epoch)

    @property
    def steps_per_epoch(self) -> int:
        return -(-len(self.epoch(0)) // self.rows_per_step)

    def batches(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Endless stream of [A, B, T] step batches from `start_step` on (epochs reshuffle with the seed)."""
        per_epoch = self.steps_per_epoch
        epoch, offset = divmod(start_step, per_epoch)
        while True:
            rows = self.epoch(epoch)
            for k in range(offset, per_epoch):
                yield self._assemble(rows[k * self.rows_per_step:(k + 1) * self.rows_per_step])
            epoch, offset = epoch + 1, 0

    def _assemble(self, rows: list[list[int]]) -> dict[str, np.ndarray]:
        if self.packing:
            length = self.length
        else:
            length = bucket_length(max(len(self.examples[r[0]]) for r in rows), self.length)
        batch = assemble(self.examples, rows, length, self.rows_per_step)
        A = self.micro_batches
        return {k: v.reshape(A, v.shape[0] // A, *v.shape[1:]) for k, v in batch.items()}


def eval_batches(examples: Sequence[EncodedChat], batch_rows: int, max_length: int) -> Iterator[dict]:
    """Validation batches in order, one example per row, [1, B, T] (a single micro batch)."""
    for start in range(0, len(examples), batch_rows):
        chunk = list(range(start, min(start + batch_rows, len(examples))))
        length = bucket_length(max(len(examples[i]) for i in chunk), max_length)
        batch = assemble(examples, [[i] for i in chunk], length, batch_rows)
        yield {k: v[None] for k, v in batch.items()}
