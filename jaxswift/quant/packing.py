"""Packing small unsigned integer codes into int32 words, as GPTQ and AWQ checkpoints store them.

`bits`-wide values are packed 32 // bits to a word along one axis; value j of a word sits at bit j * bits.
`order` (AWQ's GEMM layout) says which element of each run of 32 // bits goes to slot j.
"""

from __future__ import annotations

import numpy as np

from jaxswift.errors import CheckpointError


def pack_int32(values: np.ndarray, bits: int, axis: int, order: tuple[int, ...] | None = None) -> np.ndarray:
    """[.., n, ..] codes in [0, 2**bits) -> [.., n * bits / 32, ..] int32 packed along `axis`."""
    per_word = 32 // bits
    values = np.moveaxis(np.asarray(values, np.uint32), axis, 0)
    if values.shape[0] % per_word:
        raise CheckpointError(f"cannot pack {values.shape[0]} values of {bits} bits into int32 words "
                              f"(need a multiple of {per_word})")
    if values.size and values.max() >= 2 ** bits:
        raise CheckpointError(f"code {int(values.max())} does not fit in {bits} bits")
    runs = values.reshape(-1, per_word, *values.shape[1:])
    order = order or tuple(range(per_word))
    words = np.zeros(runs.shape[:1] + runs.shape[2:], np.uint32)
    for slot, element in enumerate(order):
        words |= runs[:, element] << np.uint32(slot * bits)
    return np.moveaxis(words.view(np.int32), 0, axis)


def unpack_int32(words: np.ndarray, bits: int, axis: int, order: tuple[int, ...] | None = None) -> np.ndarray:
    """The inverse of `pack_int32`: int32 words -> uint8 codes, `32 // bits` times longer along `axis`."""
    per_word = 32 // bits
    words = np.moveaxis(np.asarray(words).view(np.uint32), axis, 0)
    order = order or tuple(range(per_word))
    runs = np.empty((words.shape[0], per_word, *words.shape[1:]), np.uint8)
    mask = np.uint32(2 ** bits - 1)
    for slot, element in enumerate(order):
        runs[:, element] = (words >> np.uint32(slot * bits)) & mask
    return np.moveaxis(runs.reshape(-1, *words.shape[1:]), 0, axis)
