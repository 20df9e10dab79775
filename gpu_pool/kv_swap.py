"""Moving a sequence's KV pages between the device arena and host swap slabs.

Pages are page-major (gpu_pool/kv_cache.py), so each page is one contiguous run of bytes and
a swap is one copy per page; runs of consecutive pages are merged into one copy. Bookkeeping
goes through the same BlockManager API on both sides, so a swapped-out sequence owns host
pages exactly as a running one owns device pages.
"""

from __future__ import annotations

import torch

from tokenpool.gpu_pool.step_batch import SwapOp, move_pages
from tokenpool.gpu_pool.kv_cache import PagedKVCache
from tokenpool.memory.block_manager import BlockManager


class KVSwapper:
    """Makes the copies the engine scheduler decides on (`copy`), and whole swaps at once
    (`swap_out`, `swap_in`) for callers outside a step."""

    def __init__(self, device_kv: PagedKVCache, device_blocks: BlockManager,
                 host_kv: PagedKVCache, host_blocks: BlockManager):
        self.device_kv, self.device_blocks = device_kv, device_blocks
        self.host_kv, self.host_blocks = host_kv, host_blocks
        self.bytes_moved = 0

    def swap_out(self, seq_id: str) -> int:
        """Copy the sequence's pages to host slabs and free them on the device; bytes moved."""
        return self.copy(move_pages(seq_id, self.device_blocks, self.host_blocks, True))

    def swap_in(self, seq_id: str) -> int:
        return self.copy(move_pages(seq_id, self.host_blocks, self.device_blocks, False))

    def copy(self, op: SwapOp) -> int:
        """Copy the pages of a move already booked; bytes moved."""
        src_kv, dst_kv = (self.device_kv, self.host_kv) if op.out else \
            (self.host_kv, self.device_kv)
        for s, d, n in _runs(op.src, op.dst, src_kv.pages_per_slab, dst_kv.pages_per_slab):
            # Asynchronous to or from pinned host memory on CUDA; synchronised below so the
            # source pages can be reused as soon as this returns.
            dst_kv.page_bytes_view(d, n).copy_(src_kv.page_bytes_view(s, n), non_blocking=True)
        for kv in (src_kv, dst_kv):
            if kv.region.is_cuda:
                torch.cuda.current_stream(kv.region.device).synchronize()
        moved = len(op.src) * src_kv.shape.page_bytes
        self.bytes_moved += moved
        return moved


def _runs(src, dst, src_per_slab: int, dst_per_slab: int):
    """(src start, dst start, length): runs consecutive on both sides, never crossing a slab."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst):
        if runs:
            s0, d0, n = runs[-1]
            if s == s0 + n and d == d0 + n and s % src_per_slab and d % dst_per_slab:
                runs[-1] = (s0, d0, n + 1)
                continue
        runs.append((s, d, 1))
    return runs
