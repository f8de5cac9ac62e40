"""Encoded examples -> the batch every train step consumes: a dict of numpy arrays, all [B, T].

  tokens        int32    input ids; 0 in padding
  targets       int32    the next token of the same segment (0 where there is none)
  loss_weights  float32  the example's loss weight of the token `targets` holds (1.0 on the loss mask, or a pattern
                         loss scale's weight, data/templates.py), 0 where there is no real next token
  segment_ids   int32    1, 2, ... per example in a row; 0 for padding
  positions     int32    restart at 0 for each segment; 0 for padding

The shift is per segment, so the last token of an example never predicts the first token of the next one; with
`segment_ids` in the attention mask, a packed row trains exactly like its examples would one per row.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from jaxswift.data.templates import EncodedChat
from jaxswift.errors import ConfigError, DataError

Batch = dict[str, np.ndarray]
BATCH_DTYPES = {"tokens": np.int32, "targets": np.int32, "loss_weights": np.float32, "segment_ids": np.int32,
                "positions": np.int32}


def empty_batch(rows: int, length: int) -> Batch:
    """All-padding batch: every weight 0, so empty rows contribute nothing to the loss."""
    return {k: np.zeros((rows, length), dtype=dt) for k, dt in BATCH_DTYPES.items()}


def write_row(batch: Batch, row: int, examples: Sequence[EncodedChat]) -> None:
    """Lay `examples` end to end in `batch` row `row`, each its own segment with its own shift."""
    offset = 0
    for segment, ex in enumerate(examples, start=1):
        n = len(ex)
        span = slice(offset, offset + n)
        batch["tokens"][row, span] = ex.input_ids
        batch["targets"][row, offset: offset + n - 1] = ex.input_ids[1:]
        batch["loss_weights"][row, offset: offset + n - 1] = ex.weights[1:]
        batch["segment_ids"][row, span] = segment
        batch["positions"][row, span] = np.arange(n, dtype=np.int32)
        offset += n


def assemble(examples: Sequence[EncodedChat], rows: Sequence[Sequence[int]], length: int,
             num_rows: int | None = None) -> Batch:
    """Batch whose row r holds examples[rows[r]]; `num_rows` > len(rows) appends empty rows."""
    num_rows = len(rows) if num_rows is None else num_rows
    batch = empty_batch(num_rows, length)
    for r, members in enumerate(rows):
        chosen = [examples[i] for i in members]
        _check_fits(sum(len(e) for e in chosen), length)
        write_row(batch, r, chosen)
    return batch


def pad_rows(examples: Sequence[EncodedChat], length: int) -> Batch:
    """One example per row, padded at the tail."""
    return assemble(examples, [[i] for i in range(len(examples))], length)


def pack_rows(examples: Sequence[EncodedChat], length: int) -> tuple[Batch, float]:
    """Several examples per row by first-fit decreasing; returns the batch and its packing efficiency."""
    batch = assemble(examples, first_fit_decreasing([len(e) for e in examples], length), length)
    return batch, efficiency(batch)


def efficiency(batch: Batch) -> float:
    """Fraction of the batch's token slots holding real tokens (not padding)."""
    return float((batch["segment_ids"] > 0).mean()) if batch["segment_ids"].size else 0.0


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins (rows) of item indices: longest first, each into the lowest-numbered bin with room. Ties keep input
    order, so the result is deterministic. A max-tree over bins' free space makes each placement O(log n)."""
    for i, n in enumerate(lengths):
        _check_fits(n, capacity, f"example {i}")
    size = 1 << max(len(lengths) - 1, 0).bit_length()
    free = [0] * size + [capacity] * len(lengths) + [0] * (size - len(lengths))  # leaves at [size, 2*size)
    for node in range(size - 1, 0, -1):
        free[node] = max(free[2 * node], free[2 * node + 1])
    bins: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        node = 1
        while node < size:  # descend towards the leftmost bin with enough free space
            node = 2 * node if free[2 * node] >= lengths[i] else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        free[node] -= lengths[i]
        while node > 1:
            node //= 2
            free[node] = max(free[2 * node], free[2 * node + 1])
    return bins


def epoch_rows(lengths: Sequence[int], *, length: int, packing: bool, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's rows as lists of example indices: a seeded shuffle, then (with packing) first-fit decreasing over
    that order, then a shuffle of the packed rows so batches do not come sorted by length."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if not packing:
        return [[int(i)] for i in order]
    bins = first_fit_decreasing([lengths[i] for i in order], length)
    return [[int(order[j]) for j in bins[b]] for b in rng.permutation(len(bins))]


def iterate_batches(examples: Sequence[EncodedChat], *, batch_size: int, length: int, packing: bool, seed: int,
                    epoch: int) -> Iterator[Batch]:
    """One epoch of [batch_size, length] batches; the last partial batch is filled with empty (weight 0) rows."""
    if batch_size <= 0:
        raise ConfigError(f"batch_size={batch_size}; expected a positive number of rows")
    rows = epoch_rows([len(e) for e in examples], length=length, packing=packing, seed=seed, epoch=epoch)
    for start in range(0, len(rows), batch_size):
        yield assemble(examples, rows[start: start + batch_size], length, batch_size)


def _check_fits(n: int, length: int, what: str = "a row's examples") -> None:
    if n > length:
        raise DataError(f"{what}: {n} tokens do not fit a row of {length}; truncate examples to max_length first")
