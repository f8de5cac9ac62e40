"""The paged KV cache: device pools of fixed-size pages and the host-side allocator that hands them out.

Each layer has one key pool and one value pool, each [K, pages, P, H] (see models/attention.py).
Page 0 is scratch: free slots write there and their page-table rows point there, so a finished request can
never write into a page that was handed to someone else. Pages 1..num_pages are allocated.

Admission reserves a request's worst case (prompt + max_tokens, capped by max_model_len), and pages are taken
lazily within that reservation (the prompt's at insert, one more each time the slot crosses a page boundary), so an
admitted request never runs out of pages and a request that does not fit waits instead of corrupting another.

Prefix caching (vLLM's automatic prefix caching): a full page of prompt tokens is keyed by a hash chained over every
token up to and including it, and over the LoRA adapter (an adapter changes the keys/values). Pages carry reference
counts: a request whose prompt starts with cached pages shares them instead of recomputing them. A page whose count
drops to 0 keeps its contents and its hash, on a least-recently-freed list; it is handed out again (and its hash
dropped) only when no never-cached page is left. Partial pages are never cached: only a full page's contents are
fixed by its hash.
"""

from __future__ import annotations

import collections
import hashlib

import jax.numpy as jnp
import numpy as np

from jaxswift.models.config import ModelConfig

SCRATCH_PAGE = 0


def pages_for(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size)


def init_pools(cfg: ModelConfig, num_pages: int, page_size: int, dtype=None) -> tuple[tuple, tuple]:
    """(k pools, v pools), one per layer, with the scratch page in front of `num_pages` allocatable ones."""
    dtype = dtype or cfg.compute_dtype
    shape = pool_shape(cfg, num_pages, page_size)
    return (tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
            tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)))


def pool_shape(cfg: ModelConfig, num_pages: int, page_size: int) -> tuple[int, int, int, int]:
    """One layer's k (or v) pool: [kv heads, the scratch page + num_pages, page_size, head_dim]."""
    return (cfg.num_kv_heads, num_pages + 1, page_size, cfg.head_dim)


def pool_sharding(cfg: ModelConfig, num_pages: int, page_size: int, rules, mesh):
    """How a pool lies on a mesh: split over kv heads as the rule table splits the k / v projections, so each device
    attends with its own heads (replicated where the mesh axis does not divide the kv heads)."""
    from jax.sharding import NamedSharding

    from jaxswift.parallel.rules import partition_spec

    return NamedSharding(mesh, partition_spec(("kv_heads", None, None, "head_dim"),
                                              pool_shape(cfg, num_pages, page_size), rules.params, mesh,
                                              "the engine's KV cache"))


def hash_seed(adapter: int = 0) -> bytes:
    """The parent of a prompt's first page: the adapter index (an adapter changes the keys/values)."""
    return adapter.to_bytes(8, "little", signed=True)


def next_page_hash(parent: bytes, page_token_ids) -> bytes:
    """The key of a full page given its parent's key: a 16-byte BLAKE2b digest, so two different prefixes never
    share a key in practice."""
    return hashlib.blake2b(parent + np.asarray(page_token_ids, np.int64).tobytes(), digest_size=16).digest()


def page_hashes(token_ids, page_size: int, adapter: int = 0) -> list[bytes]:
    """The chained key of each full page of `token_ids`: page i's hash covers tokens [0, (i + 1) * page_size) and
    the adapter index."""
    ids = list(token_ids)
    parent, out = hash_seed(adapter), []
    for i in range(len(ids) // page_size):
        parent = next_page_hash(parent, ids[i * page_size:(i + 1) * page_size])
        out.append(parent)
    return out


class PageAllocator:
    """Reference-counted pages, per-slot page lists and reservations, the prefix cache (hash <-> page) and its
    least-recently-freed list; the page table [slots, max_pages_per_slot] on the host.

    A page is in exactly one of: `free` (never cached, or its hash dropped), `evictable` (count 0, still cached:
    oldest first), or in use (count > 0, owned by one slot or shared by several)."""

    def __init__(self, num_pages: int, slots: int, max_pages_per_slot: int):
        self.num_pages = num_pages
        self.free = list(range(num_pages, 0, -1))  # pop() hands out low page ids first
        self.evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.refs = np.zeros((num_pages + 1,), np.int64)
        self.cached: dict[bytes, int] = {}  # prefix hash -> page
        self.page_hash: dict[int, bytes] = {}  # page -> prefix hash
        self.table = np.full((slots, max_pages_per_slot), SCRATCH_PAGE, np.int32)
        self.owned: list[list[int]] = [[] for _ in range(slots)]
        self.reserved = [0] * slots  # worst-case pages of each slot's request (owned ones included)
        self.evictions = 0

    @property
    def available(self) -> int:
        """Pages a request may take: never-cached ones and cached ones nobody uses."""
        return len(self.free) + len(self.evictable)

    @property
    def used(self) -> int:
        """Pages some slot holds a reference to."""
        return self.num_pages - self.available

    @property
    def promised(self) -> int:
        """Pages reserved by running requests but not taken yet."""
        return sum(r - len(o) for r, o in zip(self.reserved, self.owned))

    def can_reserve(self, pages: int, held: int = 0) -> bool:
        """Whether a request of `pages` pages fits, `held` of which it will share with running requests (those
        take no page: only the rest must be available beyond what is promised)."""
        return pages - held <= self.available - self.promised

    def reserve(self, slot: int, pages: int, held: int = 0):
        if self.reserved[slot] or self.owned[slot]:
            raise RuntimeError(f"slot {slot} is still in use: free_resource it first")
        if not self.can_reserve(pages, held):
            raise RuntimeError(f"not enough free KV pages for {pages - held} more (available {self.available}, "
                               f"promised {self.promised}): check can_admit before insert")
        self.reserved[slot] = pages

    def held_pages(self, keys: list[bytes]) -> int:
        """How many of the cached pages of the longest run of `keys` running requests hold (sharing them takes
        no page)."""
        return sum(int(self.refs[page] > 0) for page in self.lookup(keys))

    def _take(self) -> int:
        """A page for new contents: a never-cached one, else the least recently freed cached one (its hash goes)."""
        if self.free:
            return self.free.pop()
        page, _ = self.evictable.popitem(last=False)
        del self.cached[self.page_hash.pop(page)]
        self.evictions += 1
        return page

    def _append(self, slot: int, page: int):
        owned = self.owned[slot]
        if len(owned) >= self.reserved[slot]:
            raise RuntimeError(f"slot {slot} needs {len(owned) + 1} pages but reserved {self.reserved[slot]}")
        self.refs[page] += 1
        self.table[slot, len(owned)] = page
        owned.append(page)

    def grow(self, slot: int, pages: int) -> list[int]:
        """Makes the slot own at least `pages` pages (within its reservation); returns the new ones."""
        if pages > self.reserved[slot]:
            raise RuntimeError(f"slot {slot} needs {pages} pages but reserved {self.reserved[slot]}")
        new = [self._take() for _ in range(pages - len(self.owned[slot]))]
        for page in new:
            self._append(slot, page)
        return new

    def share(self, slot: int, page: int):
        """Appends a cached page to the slot's pages (one more reference; no longer evictable)."""
        if page not in self.page_hash:
            raise RuntimeError(f"page {page} is not cached: only cached pages are shared")
        self.evictable.pop(page, None)
        self._append(slot, page)

    def release(self, slot: int):
        """Drops the slot's references; pages nobody holds go to the cache's evictable list (last page first, so a
        prompt's tail is evicted before its head) or, uncached, to the free list."""
        for page in reversed(self.owned[slot]):
            self.refs[page] -= 1
            if self.refs[page] == 0:
                if page in self.page_hash:
                    self.evictable[page] = None
                else:
                    self.free.append(page)
        self.owned[slot] = []
        self.reserved[slot] = 0
        self.table[slot] = SCRATCH_PAGE

    def register(self, page: int, key: bytes):
        """Caches a full page under its prefix hash (kept if the hash is already cached elsewhere: first wins)."""
        if key not in self.cached and page not in self.page_hash:
            self.cached[key] = page
            self.page_hash[page] = key

    def keep(self, keys) -> list[int]:
        """Pages for contents no slot holds, cached under `keys` and evictable at once (the last key's page
        first). Available pages stay as many: each comes from the free or the evictable list and goes back to the
        latter."""
        pages = []
        for key in keys:
            page = self._take()
            self.cached[key] = page
            self.page_hash[page] = key
            pages.append(page)
        for page in reversed(pages):
            self.evictable[page] = None
        return pages

    def lookup(self, keys: list[bytes]) -> list[int]:
        """The pages of the longest run of leading keys that are cached."""
        pages = []
        for key in keys:
            page = self.cached.get(key)
            if page is None:
                break
            pages.append(page)
        return pages

    def holds(self, page: int, key: bytes) -> bool:
        return self.page_hash.get(page) == key

    def clear_cache(self):
        """Forgets every cached hash (the pages' contents are no longer trusted); unused cached pages become free."""
        self.free.extend(sorted(self.evictable, reverse=True))
        self.evictable.clear()
        self.cached.clear()
        self.page_hash.clear()
