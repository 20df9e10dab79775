"""Automatic prefix caching: full KV pages named by a hash chain, shared by reference count.

A full page's name is a hash of (the model, its parent page's name, the page's tokens), so a
name stands for the whole prefix up to and including that page, and equal names mean equal
KV. Pages are shared by reference count; when the last holder lets go, a named page is
retained in its SlabPool rather than freed, and a later request whose prompt starts with the
same tokens takes it back. Retained pages are evicted, least recently released first, only
when the memory is needed, by any model (slabs.py). Nothing here touches the pages' bytes:
the engine writes a page before it names it, and never writes a named page again.

`PrefixCache` is the page source of the BlockManagers of every engine with one page shape on
a worker; names carry the model, so models of one shape never share a page.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence

from tokenpool.memory.slabs import (BLOCK_SIZE, PageOwnershipError, PageShape, ShapePages,
                                    SlabPool)

__all__ = ["PrefixCache", "page_hashes", "extend_hashes"]


def _chain(parent: bytes, tokens: Sequence[int]) -> bytes:
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(b"".join(t.to_bytes(4, "little") for t in tokens))
    return h.digest()


def extend_hashes(hashes: list[int], model: str, token_ids: Sequence[int],
                  block_size: int = BLOCK_SIZE) -> list[int]:
    """Append the names of the full pages of `token_ids` past the `len(hashes)` named
    already; returns `hashes`. Names are ints (128-bit digests): collisions are not a
    concern at any realistic cache size."""
    parent = hashes[-1].to_bytes(16, "little") if hashes else \
        hashlib.blake2b(model.encode(), digest_size=16).digest()
    for i in range(len(hashes), len(token_ids) // block_size):
        parent = _chain(parent, token_ids[i * block_size: (i + 1) * block_size])
        hashes.append(int.from_bytes(parent, "little"))
    return hashes


def page_hashes(model: str, token_ids: Sequence[int],
                block_size: int = BLOCK_SIZE) -> tuple[int, ...]:
    """The names of the full pages of `token_ids` for `model`, in order."""
    return tuple(extend_hashes([], model, token_ids, block_size))


class PrefixCache(ShapePages):
    """Named pages of one shape: a BlockManager's page source that shares and retains them.

    Unnamed pages behave exactly as the SlabPool's own: allocated, freed. A named page has a
    reference count; at zero it is retained (evictable) instead of freed, and `num_free`
    counts it.
    """

    def __init__(self, pool: SlabPool, shape: PageShape):
        super().__init__(pool, shape)
        self._page_of: dict[int, int] = {}  # name -> page
        self._name_of: dict[int, int] = {}  # page -> name
        self._model_of: dict[int, str] = {}  # page -> model, for per-model counts
        self._refs: dict[int, int] = {}  # named page -> holders (0: retained)
        pool.on_evict(shape, self._evicted)

    def free(self, pages: list[int]) -> None:
        """A holder lets go: unnamed pages are freed, named ones lose a reference and are
        retained at zero. Checks the whole list first, so a bad one changes nothing."""
        named = Counter(page for page in pages if page in self._refs)
        for page, n in named.items():
            if n > self._refs[page]:
                raise PageOwnershipError(f"named page {page} of {self.shape} is not held")
        plain = [page for page in pages if page not in named]
        if plain:
            self.pool.free(self.shape, plain)  # checks them all before freeing any
        retained = []
        for page, n in named.items():
            self._refs[page] -= n
            if self._refs[page] == 0:
                retained.append(page)
        if retained:
            self.pool.retain(self.shape, retained)

    def releasable(self, pages: list[int]) -> int:
        """How many pages freeing `pages` (holder by holder) would make allocatable: an
        unnamed page, or a named one whose every holder is among them."""
        counts = Counter(pages)
        return sum(1 for page, n in counts.items()
                   if page not in self._refs or self._refs[page] == n)

    # -- naming and finding pages -----------------------------------------------------------

    def match(self, names: Sequence[int]) -> int:
        """How many leading names of `names` have a cached page (held or retained)."""
        n = 0
        for name in names:
            if name not in self._page_of:
                break
            n += 1
        return n

    def acquire(self, names: Sequence[int]) -> list[int]:
        """The pages of the leading cached names of `names`, each now held once more."""
        pages = []
        for name in names[: self.match(names)]:
            page = self._page_of[name]
            if self._refs[page] == 0:
                self.pool.reuse(self.shape, page)
            self._refs[page] += 1
            pages.append(page)
        return pages

    def name(self, page: int, name: int, model: str) -> bool:
        """`page` (held by the caller, its KV written) now holds the prefix `name`. False,
        and nothing changes, when another page has that name already or `page` has one."""
        if name in self._page_of or page in self._name_of:
            return False
        self._page_of[name] = page
        self._name_of[page] = name
        self._model_of[page] = model
        self._refs[page] = 1
        return True

    def cached_pages(self) -> dict[str, int]:
        """Named pages per model, held or retained."""
        counts: dict[str, int] = {}
        for model in self._model_of.values():
            counts[model] = counts.get(model, 0) + 1
        return counts

    @property
    def num_retained(self) -> int:
        return self.pool.num_retained(self.shape)

    def flush(self) -> int:
        """Free every retained page (held ones stay named); how many were freed."""
        return self.pool.drop_retained(self.shape)

    def _evicted(self, pages: list[int]) -> None:
        for page in pages:
            name = self._name_of.pop(page)
            del self._page_of[name], self._model_of[page], self._refs[page]
