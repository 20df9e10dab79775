"""Paged KV bookkeeping: which page belongs to which sequence. Pure Python, no torch.

A page holds BLOCK_SIZE consecutive tokens of one sequence's K and V for every layer. Page
ids index the engine's page pool tensor, so this class decides placement and the model runner
only follows the block tables it is given.
"""

from __future__ import annotations

from collections import deque

BLOCK_SIZE = 16


def blocks_needed(num_tokens: int, block_size: int = BLOCK_SIZE) -> int:
    return -(-num_tokens // block_size)


class OutOfPagesError(RuntimeError):
    """Asked for more pages than are free. Callers check `can_allocate` first."""


class BlockManager:
    """Free list plus per-sequence block tables over `num_pages` pages."""

    def __init__(self, num_pages: int, block_size: int = BLOCK_SIZE):
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        self.num_pages = num_pages
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_pages))
        self._tables: dict[str, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def block_table(self, seq_id: str) -> list[int]:
        return self._tables[seq_id]

    def pages_to_grow(self, seq_id: str, num_tokens: int) -> int:
        """Extra pages `seq_id` needs so that it can hold `num_tokens` tokens."""
        have = len(self._tables.get(seq_id, ()))
        return max(0, blocks_needed(num_tokens, self.block_size) - have)

    def can_grow(self, seq_id: str, num_tokens: int) -> bool:
        return self.pages_to_grow(seq_id, num_tokens) <= len(self._free)

    def grow(self, seq_id: str, num_tokens: int) -> list[int]:
        """Make `seq_id` able to hold `num_tokens` tokens; returns its block table."""
        need = self.pages_to_grow(seq_id, num_tokens)
        if need > len(self._free):
            raise OutOfPagesError(f"{seq_id}: needs {need} pages, {len(self._free)} free")
        table = self._tables.setdefault(seq_id, [])
        table.extend(self._free.popleft() for _ in range(need))
        return table

    def free(self, seq_id: str) -> int:
        """Return every page of `seq_id` to the free list; a no-op for unknown ids."""
        table = self._tables.pop(seq_id, [])
        self._free.extend(table)
        return len(table)
