"""Paged KV bookkeeping: which pages belong to which sequence. Pure Python, no torch.

A page holds BLOCK_SIZE consecutive tokens of one sequence's K and V for every layer. Pages
come from a page source (a shape's view of a SlabPool), so this class decides which page ids
a sequence owns and the model runner only follows the block tables it is given.
"""

from __future__ import annotations

from typing import Protocol

from tokenpool.memory.slabs import BLOCK_SIZE, OutOfPagesError

__all__ = ["BLOCK_SIZE", "BlockManager", "OutOfPagesError", "PageSource", "blocks_needed"]


def blocks_needed(num_tokens: int, block_size: int = BLOCK_SIZE) -> int:
    return -(-num_tokens // block_size)


class PageSource(Protocol):
    capacity: int
    num_free: int

    def alloc(self, n: int) -> list[int]: ...

    def free(self, pages: list[int]) -> None: ...


def distinct_pages(pages: list[int]) -> int:
    """What freeing `pages` gains a page source whose pages have one holder each."""
    return len(set(pages))


class BlockManager:
    """Per-sequence block tables over the pages of one page source."""

    def __init__(self, pages: PageSource, block_size: int = BLOCK_SIZE):
        self.pages = pages
        self.block_size = block_size
        self._tables: dict[str, list[int]] = {}

    @property
    def num_pages(self) -> int:
        return self.pages.capacity

    @property
    def num_free(self) -> int:
        return self.pages.num_free

    @property
    def num_used(self) -> int:
        """Distinct pages held by this manager's sequences (a shared prefix page once)."""
        return len(set().union(*self._tables.values()))

    def releasable(self, seq_ids: list[str]) -> int:
        """Pages that freeing these sequences would make allocatable: a page another holder
        keeps (a shared prefix page) counts for nothing."""
        pages = [p for s in seq_ids for p in self._tables.get(s, ())]
        return getattr(self.pages, "releasable", distinct_pages)(pages)

    def has(self, seq_id: str) -> bool:
        return seq_id in self._tables

    def block_table(self, seq_id: str) -> list[int]:
        return self._tables[seq_id]

    def pages_to_grow(self, seq_id: str, num_tokens: int) -> int:
        """Extra pages `seq_id` needs so that it can hold `num_tokens` tokens."""
        have = len(self._tables.get(seq_id, ()))
        return max(0, blocks_needed(num_tokens, self.block_size) - have)

    def can_grow(self, seq_id: str, num_tokens: int) -> bool:
        return self.pages_to_grow(seq_id, num_tokens) <= self.pages.num_free

    def adopt(self, seq_id: str, pages: list[int]) -> list[int]:
        """Start `seq_id`'s table with pages it already holds (a cached prefix's)."""
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id!r} already has pages")
        self._tables[seq_id] = list(pages)
        return self._tables[seq_id]

    def grow(self, seq_id: str, num_tokens: int) -> list[int]:
        """Make `seq_id` able to hold `num_tokens` tokens; returns its block table."""
        need = self.pages_to_grow(seq_id, num_tokens)
        new = self.pages.alloc(need) if need else []
        table = self._tables.setdefault(seq_id, [])
        table.extend(new)
        return table

    def free(self, seq_id: str) -> int:
        """Return every page of `seq_id` to its source; a no-op for unknown ids."""
        table = self._tables.pop(seq_id, [])
        if table:
            self.pages.free(table)
        return len(table)
