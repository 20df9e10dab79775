"""What one engine step runs (`StepBatch`) and the KV copies booked before it (`SwapOp`).
No torch: the engine scheduler builds these, the model runner and the swapper read them.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenpool.gpu_pool.sequence import Sequence
from tokenpool.memory.block_manager import BlockManager


@dataclass(frozen=True, slots=True)
class SwapOp:
    """Copy one sequence's KV from `src` pages to `dst` pages: device to host if `out`."""

    seq_id: str
    out: bool
    src: tuple[int, ...]
    dst: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class StepBatch:
    """Sequences to run this step: prefills first, then one-token decodes.

    Prefill `i` computes tokens `[start, start + count)` of its sequence, `chunks[i]` (no
    chunks: every prefill computes all its tokens). `swaps` are made before the step runs,
    in order: the bookkeeping already moved the pages, so a later copy may write a page an
    earlier one read."""

    prefills: tuple[Sequence, ...]
    decodes: tuple[Sequence, ...]
    block_tables: dict[str, list[int]]
    swaps: tuple[SwapOp, ...] = ()
    chunks: tuple[tuple[int, int], ...] = ()

    def chunk(self, i: int) -> tuple[int, int]:
        return self.chunks[i] if self.chunks else (0, self.prefills[i].num_tokens)

    @property
    def sequences(self) -> tuple[Sequence, ...]:
        """The sequences that sample a token this step, in batch order."""
        if not self.chunks:
            return self.prefills + self.decodes
        done = tuple(s for s, (start, n) in zip(self.prefills, self.chunks)
                     if start + n == s.num_tokens)
        return done + self.decodes

    def __bool__(self) -> bool:
        return bool(self.prefills or self.decodes)


def move_pages(seq_id: str, src: BlockManager, dst: BlockManager, out: bool) -> SwapOp:
    """Give `seq_id` as many pages in `dst` as it holds in `src`, and free those in `src`.

    The bytes are not moved: the caller makes the returned copy before the freed pages are
    written again."""
    pages = tuple(src.block_table(seq_id))
    table = tuple(dst.grow(seq_id, len(pages) * src.block_size))
    src.free(seq_id)
    return SwapOp(seq_id, out, pages, table)
