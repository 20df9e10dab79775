"""KV pages in fixed-size slabs, shared by models whose pages differ in shape.

Models differ in layers x kv heads x head dim x dtype, so one page size cannot serve a fleet.
The KV byte range is cut into equal slabs instead. A slab holds pages of one shape while any
of them is in use and returns to the shared pool, for any shape, once it is empty. The same
class keeps the device's KV region and the host's swap space.

Page ids are per shape: page `p` of a shape with `n` pages per slab is page `p % n` of slab
`p // n`. Its bytes start at `slab * slab_bytes + (p % n) * page_bytes`. Pure bookkeeping: it
owns no memory and imports no framework.

A page in use may be *retained*: no one holds it, but its bytes are kept (a prefix cache's
page) until the memory is needed. Retained pages count as free, and `alloc` takes them, least
recently retained first, only once truly free pages and empty slabs are gone, then empties
slabs of other shapes that hold nothing but retained pages. Each shape's `evict` callback
hears of the retained pages it loses.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

BLOCK_SIZE = 16


class OutOfPagesError(RuntimeError):
    """Asked for more pages than are free. Callers check `num_free` first."""


class PageOwnershipError(RuntimeError):
    """A page was freed that is not in use: a double free or a foreign page."""


@dataclass(frozen=True, slots=True)
class PageShape:
    """One KV page: BLOCK_SIZE tokens' K and V for every layer of one model."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    itemsize: int
    block_size: int = BLOCK_SIZE

    @property
    def row_elems(self) -> int:
        """Elements of one token's K (or V) in one layer."""
        return self.num_kv_heads * self.head_dim

    @property
    def page_elems(self) -> int:
        return 2 * self.num_layers * self.block_size * self.row_elems

    @property
    def page_bytes(self) -> int:
        return self.page_elems * self.itemsize


class SlabPool:
    def __init__(self, num_slabs: int, slab_bytes: int):
        if num_slabs < 0 or slab_bytes < 1:
            raise ValueError(f"need num_slabs >= 0 and slab_bytes >= 1, got {num_slabs}, "
                             f"{slab_bytes}")
        self.num_slabs = num_slabs
        self.slab_bytes = slab_bytes
        self._empty: list[int] = list(range(num_slabs - 1, -1, -1))  # pop() takes the lowest
        self._shape: dict[int, PageShape] = {}  # slabs in use -> their page shape
        self._free: dict[int, list[int]] = {}  # slabs in use -> free page slots, lowest last
        self._partial: dict[PageShape, list[int]] = {}  # slabs of a shape with free slots
        self._retained: dict[PageShape, OrderedDict[int, None]] = {}  # oldest first
        self._retained_in: dict[int, int] = {}  # slab -> its retained pages
        # Slabs whose pages in use are all retained, in the order they became so, and how
        # many of each shape: kept as pages move, so num_free, asked for every sequence of
        # every step, costs no walk over the slabs.
        self._reclaimable: dict[int, PageShape] = {}
        self._reclaimable_of: dict[PageShape, int] = {}
        self._evict: dict[PageShape, Callable[[list[int]], None]] = {}

    # -- capacity ---------------------------------------------------------------------------

    def pages_per_slab(self, shape: PageShape) -> int:
        return self.slab_bytes // shape.page_bytes

    def capacity(self, shape: PageShape) -> int:
        """Pages of `shape` that fit when every slab holds that shape."""
        return self.num_slabs * self.pages_per_slab(shape)

    def num_free(self, shape: PageShape) -> int:
        """Pages of `shape` that can be allocated now, retained ones included."""
        partial = sum(len(self._free[s]) for s in self._partial.get(shape, ()))
        slabs = len(self._empty) + len(self._reclaimable) - self._reclaimable_of.get(shape, 0)
        return partial + len(self._retained.get(shape, ())) + slabs * self.pages_per_slab(shape)

    def num_retained(self, shape: PageShape) -> int:
        return len(self._retained.get(shape, ()))

    def num_used(self, shape: PageShape) -> int:
        per_slab = self.pages_per_slab(shape)
        return sum(per_slab - len(self._free[s]) for s, sh in self._shape.items() if sh == shape)

    @property
    def num_empty_slabs(self) -> int:
        return len(self._empty)

    @property
    def used_bytes(self) -> int:
        """Bytes of pages held, retained ones not counted (nor a slab's unused tail)."""
        held = sum((self.pages_per_slab(sh) - len(self._free[s])) * sh.page_bytes
                   for s, sh in self._shape.items())
        return held - self.retained_bytes

    @property
    def retained_bytes(self) -> int:
        return sum(len(pages) * shape.page_bytes for shape, pages in self._retained.items())

    def shape_of(self, slab: int) -> PageShape | None:
        return self._shape.get(slab)

    # -- pages ------------------------------------------------------------------------------

    def alloc(self, shape: PageShape, n: int) -> list[int]:
        """`n` page ids of `shape`, filling slabs already holding that shape first; retained
        pages are taken only when free ones run out."""
        if n > self.num_free(shape):
            raise OutOfPagesError(f"{n} pages of {shape.page_bytes} B asked, "
                                  f"{self.num_free(shape)} free")
        per_slab = self.pages_per_slab(shape)
        partial = self._partial.setdefault(shape, [])
        pages = []
        while len(pages) < n:
            if not partial and not self._empty:
                if self._retained.get(shape):
                    pages.append(self._evict_oldest(shape))
                    continue
                self._reclaim_slab(shape)
            if not partial:
                partial.append(self._take_slab(shape))
            slab = partial[-1]
            slots = self._free[slab]
            while slots and len(pages) < n:
                pages.append(slab * per_slab + slots.pop())
            if not slots:
                partial.pop()
            self._mark(slab)
        return pages

    def free(self, shape: PageShape, pages: list[int]) -> None:
        """Return pages; checks them all first, so a bad list changes nothing."""
        per_slab = self.pages_per_slab(shape)
        located = [divmod(page, per_slab) for page in pages]
        retained = self._retained.get(shape, {})
        for page, (slab, slot) in zip(pages, located):
            if self._shape.get(slab) != shape or slot in self._free[slab] or page in retained:
                raise PageOwnershipError(f"page {page} of {shape} is not in use")
        if len(set(pages)) != len(pages):
            raise PageOwnershipError(f"pages freed twice in one call: {sorted(pages)}")
        for slab, slot in located:
            slots = self._free[slab]
            if not slots:
                self._partial[shape].append(slab)
            slots.append(slot)
            if len(slots) == per_slab:
                self._release_slab(slab)
        for slab in {slab for slab, _ in located}:
            self._mark(slab)

    # -- retained pages -------------------------------------------------------------------

    def on_evict(self, shape: PageShape, callback: Callable[[list[int]], None]) -> None:
        """`callback(pages)` hears of `shape`'s retained pages as `alloc` takes them."""
        self._evict[shape] = callback

    def retain(self, shape: PageShape, pages: list[int]) -> None:
        """In-use pages no one holds any more, kept until their memory is needed."""
        per_slab = self.pages_per_slab(shape)
        retained = self._retained.setdefault(shape, OrderedDict())
        for page in pages:  # all checked before any changes, as in free()
            slab, slot = divmod(page, per_slab)
            if self._shape.get(slab) != shape or slot in self._free[slab] or page in retained:
                raise PageOwnershipError(f"page {page} of {shape} is not in use")
        if len(set(pages)) != len(pages):
            raise PageOwnershipError(f"pages retained twice in one call: {sorted(pages)}")
        for page in pages:
            slab = page // per_slab
            retained[page] = None
            self._retained_in[slab] = self._retained_in.get(slab, 0) + 1
        for slab in {page // per_slab for page in pages}:
            self._mark(slab)

    def reuse(self, shape: PageShape, page: int) -> None:
        """A retained page is held again (a cache hit): it is in use, no longer evictable."""
        del self._retained[shape][page]
        self._forget_retained(page // self.pages_per_slab(shape))

    def drop_retained(self, shape: PageShape) -> int:
        """Free every retained page of `shape` (a cache flush); how many."""
        pages = list(self._retained.get(shape, ()))
        for page in pages:
            self.reuse(shape, page)
        self._notify(shape, pages)
        if pages:
            self.free(shape, pages)
        return len(pages)

    def _forget_retained(self, slab: int) -> None:
        left = self._retained_in[slab] - 1
        if left:
            self._retained_in[slab] = left
        else:
            del self._retained_in[slab]
        self._mark(slab)

    def _mark(self, slab: int) -> None:
        """Note whether `slab` now holds only retained pages (emptied, it serves any shape)."""
        shape = self._shape.get(slab)
        now = shape is not None and slab in self._retained_in and \
            len(self._free[slab]) + self._retained_in[slab] == self.pages_per_slab(shape)
        was = self._reclaimable.pop(slab, None)
        if was is not None:
            self._reclaimable_of[was] -= 1
        if now:
            self._reclaimable[slab] = shape
            self._reclaimable_of[shape] = self._reclaimable_of.get(shape, 0) + 1

    def _evict_oldest(self, shape: PageShape) -> int:
        """The least recently retained page of `shape`, now in use by the caller."""
        page, _ = self._retained[shape].popitem(last=False)
        self._forget_retained(page // self.pages_per_slab(shape))
        self._notify(shape, [page])
        return page

    def _reclaim_slab(self, shape: PageShape) -> None:
        """Empty the slab of another shape that has held only retained pages longest."""
        slab, other = next((s, sh) for s, sh in self._reclaimable.items() if sh != shape)
        per_slab = self.pages_per_slab(other)
        lost = [p for p in self._retained[other] if p // per_slab == slab]
        for p in lost:
            self.reuse(other, p)
        self._notify(other, lost)
        self.free(other, lost)

    def _notify(self, shape: PageShape, pages: list[int]) -> None:
        if pages and shape in self._evict:
            self._evict[shape](pages)

    def byte_offset(self, shape: PageShape, page: int) -> int:
        slab, slot = divmod(page, self.pages_per_slab(shape))
        return slab * self.slab_bytes + slot * shape.page_bytes

    def _take_slab(self, shape: PageShape) -> int:
        slab = self._empty.pop()
        self._shape[slab] = shape
        self._free[slab] = list(range(self.pages_per_slab(shape) - 1, -1, -1))
        return slab

    def _release_slab(self, slab: int) -> None:
        shape = self._shape.pop(slab)
        del self._free[slab]
        self._partial[shape].remove(slab)
        self._empty.append(slab)
        self._empty.sort(reverse=True)  # reuse low slabs first: keeps placement predictable


class ShapePages:
    """The pages of one shape in a SlabPool, as the page source of a BlockManager."""

    def __init__(self, pool: SlabPool, shape: PageShape):
        if pool.pages_per_slab(shape) < 1:
            raise ValueError(f"a {shape.page_bytes} B page does not fit a "
                             f"{pool.slab_bytes} B slab")
        self.pool = pool
        self.shape = shape

    @property
    def capacity(self) -> int:
        return self.pool.capacity(self.shape)

    @property
    def num_free(self) -> int:
        return self.pool.num_free(self.shape)

    def alloc(self, n: int) -> list[int]:
        return self.pool.alloc(self.shape, n)

    def free(self, pages: list[int]) -> None:
        self.pool.free(self.shape, pages)
