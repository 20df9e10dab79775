"""Which worker probably holds which prefix pages: the policy's guess at the prefix caches.

A worker keeps each named KV page (memory.prefix_cache: a name stands for its model and the
whole prefix up to it) after its request ends, least recently used first out, until the
memory is needed. A policy cannot see those caches, so, like SGLang's cache-aware router with
its approximate radix tree, it keeps its own: per worker an LRU of the page names it sent
prefills of, bounded by the bytes of the worker's KV region, plus an index from a name to
the workers holding it, so that finding the longest cached prefix of a prompt costs the log
of its pages, not the pool's workers. Names carry their model, so one LRU serves every model, as one
KV region does.

Pure bookkeeping; the simulator's workers keep their true caches in the same `PageLRU`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

# Tokens per KV page: memory.slabs.BLOCK_SIZE, which schedulers/ may not import (a test
# checks that the two agree).
PAGE_TOKENS = 16


def reusable_tokens(cached_pages: int, prompt_len: int) -> int:
    """Prompt tokens served from `cached_pages` leading cached pages: a prompt's last token
    is always computed, for its logits, so at most `(prompt_len - 1) // 16` pages count."""
    usable = (prompt_len - 1) // PAGE_TOKENS
    return (cached_pages if cached_pages < usable else usable) * PAGE_TOKENS


class PageLRU:
    """Page names of one device, least recently used first, within a byte budget."""

    __slots__ = ("capacity_bytes", "used_bytes", "_pages")

    def __init__(self, capacity_bytes: int):
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self._pages: OrderedDict[int, int] = OrderedDict()  # name -> its page's bytes

    def __len__(self) -> int:
        return len(self._pages)

    def __contains__(self, name: int) -> bool:
        return name in self._pages

    def match(self, names: Sequence[int]) -> int:
        """How many leading `names` are held."""
        pages, n = self._pages, 0
        for name in names:
            if name not in pages:
                break
            n += 1
        return n

    def touch(self, names: Sequence[int], page_bytes: int) -> list[int]:
        """`names` were just computed or reused: held now, most recently used; returns the
        names evicted to make room. Touched last to first, so a prompt's first pages are
        the freshest: a shared prefix outlives the tails that extend it (vLLM frees a
        request's blocks in reverse for the same reason)."""
        pages = self._pages
        for name in reversed(names):
            if name in pages:
                pages.move_to_end(name)
            else:
                pages[name] = page_bytes
                self.used_bytes += page_bytes
        evicted = []
        while self.used_bytes > self.capacity_bytes and pages:
            name, size = pages.popitem(last=False)
            self.used_bytes -= size
            evicted.append(name)
        return evicted


class PrefixIndex:
    """Per worker a `PageLRU`, and for each name the workers that hold it."""

    def __init__(self, workers: Sequence[int], capacity_bytes: int):
        self.caches = {w: PageLRU(capacity_bytes) for w in workers}
        self.holders: dict[int, set[int]] = {}

    def add_worker(self, worker: int, capacity_bytes: int) -> None:
        """A worker new to the pool (or back from a loss: its cache died with it)."""
        self.forget_worker(worker)
        self.caches[worker] = PageLRU(capacity_bytes)

    def forget_worker(self, worker: int) -> None:
        cache = self.caches.pop(worker, None)
        for name in cache._pages if cache is not None else ():
            held = self.holders.get(name)
            if held is not None:
                held.discard(worker)
                if not held:
                    del self.holders[name]

    def cached_pages(self, worker: int, names: Sequence[int]) -> int:
        cache = self.caches.get(worker)
        return cache.match(names) if cache is not None else 0

    def longest(self, names: Sequence[int], limit: int,
                allowed: set[int] | None = None) -> tuple[set[int], int]:
        """The workers (of `allowed`, None: any) holding the longest run of leading
        `names`, at most `limit` pages, and that run's length; (empty, 0) if none holds the
        first. A binary search: a worker holding a page holds its parent too (`record`), so
        the holders of a prompt's pages only narrow along it."""
        holders = self.holders
        low, high = 0, min(limit, len(names))  # the first `low` pages have a holder
        while low < high:
            mid = (low + high + 1) // 2
            here = holders.get(names[mid - 1])
            if here and (allowed is None or not here.isdisjoint(allowed)):
                low = mid
            else:
                high = mid - 1
        if not low:
            return set(), 0
        here = holders[names[low - 1]]
        return (set(here) if allowed is None else here & allowed), low

    def record(self, worker: int, names: Sequence[int], page_bytes: int) -> None:
        """A prefill of a prompt with these page names, all of them from its first page
        (a request's page_hashes), was sent to `worker`. `PageLRU.touch` keeps each page
        fresher than the pages extending it, so a worker loses a page's extensions before
        the page: what `longest` relies on."""
        cache = self.caches.get(worker)
        if cache is None or not names:
            return
        holders = self.holders
        for name in names:
            if name not in cache:
                holders.setdefault(name, set()).add(worker)
        for name in cache.touch(names, page_bytes):
            held = holders.get(name)
            if held is not None:
                held.discard(worker)
                if not held:
                    del holders[name]
