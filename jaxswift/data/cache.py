"""Tokenize once, to disk: encoded examples live in two memory-mapped files, so a dataset larger than memory
trains with only its offsets in RAM, and every step reads just the rows it needs.

  tokens.bin  int32, all examples end to end      mask.bin  bool, the loss masks, same layout
  offsets.npy int64 [n + 1] example boundaries     weights.bin float32, the loss weights, same layout (only when
                                                   some example has weights other than its 0/1 mask)
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from jaxswift.data.formats import DatasetStats, _stats, iter_sft_examples
from jaxswift.data.templates import EncodedChat

_FLUSH_TOKENS = 1 << 20  # write in ~4 MB chunks


class TokenCache(Sequence[EncodedChat]):
    """A read-only sequence of EncodedChat views into the memory-mapped files of `folder`."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        self.offsets = np.load(folder / "offsets.npy")
        total = int(self.offsets[-1])
        self.tokens = np.memmap(folder / "tokens.bin", np.int32, "r", shape=(total,)) if total else np.zeros(0, np.int32)
        self.mask = np.memmap(folder / "mask.bin", np.bool_, "r", shape=(total,)) if total else np.zeros(0, bool)
        weights = folder / "weights.bin"
        self.weights = np.memmap(weights, np.float32, "r", shape=(total,)) if total and weights.exists() else None
        self.lengths = np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        begin, end = int(self.offsets[i]), int(self.offsets[i + 1])
        weights = None if self.weights is None else np.asarray(self.weights[begin:end])
        return EncodedChat(np.asarray(self.tokens[begin:end]), np.asarray(self.mask[begin:end]), weights)


class Subset(Sequence[EncodedChat]):
    """Some examples of a sequence, by index, without materializing them (train/val splits of a cache)."""

    def __init__(self, examples: Sequence[EncodedChat], indices: Sequence[int]):
        self.examples, self.indices = examples, np.asarray(indices, np.int64)
        self.lengths = example_lengths(examples)[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        return self.examples[int(self.indices[i])]


def example_lengths(examples: Sequence[EncodedChat]) -> np.ndarray:
    """Token counts of every example, without touching the tokens when the sequence knows them."""
    lengths = getattr(examples, "lengths", None)
    return np.asarray(lengths if lengths is not None else [len(e) for e in examples], np.int64)


def split_indices(n: int, ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices for --split_dataset_ratio, like `formats.split_train_val` but without the examples."""
    from jaxswift.errors import ConfigError

    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"--split_dataset_ratio={ratio}; expected a fraction in [0, 1)")
    n_val = 0 if ratio == 0 else max(1, int(round(n * ratio)))
    if n_val and n_val >= n:
        raise ConfigError(f"--split_dataset_ratio={ratio} leaves no training examples out of {n}")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def write_token_cache(examples: Iterable[EncodedChat], folder: str | Path) -> TokenCache:
    """Streams examples to disk (bounded memory) and returns the cache over them. The weights file is written from
    the first example that carries weights on (earlier examples' weights are their masks, written then)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "weights.bin").unlink(missing_ok=True)
    offsets, pending, count = [0], [], 0
    weights_file = None
    with open(folder / "tokens.bin", "wb") as tok_file, open(folder / "mask.bin", "wb") as mask_file:
        def flush():
            nonlocal weights_file
            if not pending:
                return
            tok_file.write(np.concatenate([e.input_ids for e in pending]).astype(np.int32).tobytes())
            mask_file.write(np.concatenate([e.loss_mask for e in pending]).astype(np.bool_).tobytes())
            if weights_file is None and any(e.loss_weights is not None for e in pending):
                weights_file = open(folder / "weights.bin", "wb")
                before = offsets[-1] - sum(len(e) for e in pending)
                if before:  # examples flushed before this chunk: their masks are their weights
                    mask_file.flush()
                    written = np.memmap(folder / "mask.bin", np.bool_, "r", shape=(before,))
                    weights_file.write(np.asarray(written, np.float32).tobytes())
            if weights_file is not None:
                weights_file.write(np.concatenate([e.weights for e in pending]).astype(np.float32).tobytes())
            pending.clear()

        try:
            for ex in examples:
                pending.append(ex)
                offsets.append(offsets[-1] + len(ex))
                count += len(ex)
                if count >= _FLUSH_TOKENS:
                    flush()
                    count = 0
            flush()
        finally:
            if weights_file is not None:
                weights_file.close()
    np.save(folder / "offsets.npy", np.asarray(offsets, np.int64))
    return TokenCache(folder)


def cache_sft_dataset(specs: list[str], tokenizer, folder: str | Path, **encode) -> tuple[TokenCache, DatasetStats]:
    """`build_sft_examples`, streamed into a token cache: (examples on disk, stats)."""
    tally: collections.Counter = collections.Counter()
    cache = write_token_cache(iter_sft_examples(specs, tokenizer, tally, **encode), folder)
    stats = DatasetStats(rows=sum(tally.values()), examples=len(cache), tokens=int(cache.offsets[-1]),
                         loss_tokens=int(np.count_nonzero(cache.mask)), truncated=tally["truncated"],
                         skipped=_stats([], tally).skipped)
    (Path(folder) / "stats.json").write_text(json.dumps({"summary": stats.summary()}))
    return cache, stats
