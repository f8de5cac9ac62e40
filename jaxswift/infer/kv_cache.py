"""The paged KV cache: device pools of fixed-size pages and the host-side allocator that hands them out.

Each layer has one key pool and one value pool, each [K, pages, P, H] (see models/attention.py).
Page 0 is scratch: free slots write there and their page-table rows point there, so a finished request can
never write into a page that was handed to someone else. Pages 1..num_pages are allocated.

Admission reserves a request's worst case (prompt + max_tokens, capped by max_model_len), and pages are taken
lazily within that reservation (the prompt's at insert, one more each time the slot crosses a page boundary), so an
admitted request never runs out of pages and a request that does not fit waits instead of corrupting another.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxswift.models.config import ModelConfig

SCRATCH_PAGE = 0


def pages_for(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size)


def init_pools(cfg: ModelConfig, num_pages: int, page_size: int, dtype=None) -> tuple[tuple, tuple]:
    """(k pools, v pools), one per layer, with the scratch page in front of `num_pages` allocatable ones."""
    dtype = dtype or cfg.compute_dtype
    shape = (cfg.num_kv_heads, num_pages + 1, page_size, cfg.head_dim)
    return (tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
            tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)))


class PageAllocator:
    """Free list, per-slot page lists and reservations; the page table [slots, max_pages_per_slot] on the host."""

    def __init__(self, num_pages: int, slots: int, max_pages_per_slot: int):
        self.num_pages = num_pages
        self.free = list(range(num_pages, 0, -1))  # pop() hands out low page ids first
        self.table = np.full((slots, max_pages_per_slot), SCRATCH_PAGE, np.int32)
        self.owned: list[list[int]] = [[] for _ in range(slots)]
        self.reserved = [0] * slots  # worst-case pages of each slot's request (owned ones included)

    @property
    def used(self) -> int:
        return self.num_pages - len(self.free)

    @property
    def promised(self) -> int:
        """Pages reserved by running requests but not taken yet."""
        return sum(r - len(o) for r, o in zip(self.reserved, self.owned))

    def can_reserve(self, pages: int) -> bool:
        return pages <= len(self.free) - self.promised

    def reserve(self, slot: int, pages: int):
        if self.reserved[slot] or self.owned[slot]:
            raise RuntimeError(f"slot {slot} is still in use: free_resource it first")
        if not self.can_reserve(pages):
            raise RuntimeError(f"not enough free KV pages for {pages} more (free {len(self.free)}, promised "
                               f"{self.promised}): check can_admit before insert")
        self.reserved[slot] = pages

    def grow(self, slot: int, pages: int) -> list[int]:
        """Makes the slot own at least `pages` pages (within its reservation); returns the new ones."""
        owned = self.owned[slot]
        if pages > self.reserved[slot]:
            raise RuntimeError(f"slot {slot} needs {pages} pages but reserved {self.reserved[slot]}")
        new = [self.free.pop() for _ in range(pages - len(owned))]
        self.table[slot, len(owned):len(owned) + len(new)] = new
        owned.extend(new)
        return new

    def release(self, slot: int):
        self.free.extend(reversed(self.owned[slot]))
        self.owned[slot] = []
        self.reserved[slot] = 0
        self.table[slot] = SCRATCH_PAGE
