"""Moving a sequence's KV pages between the device arena and host swap slabs.

Pages are page-major (gpu_pool/kv_cache.py), so each page is one contiguous run of bytes and
a swap is one copy per page; runs of consecutive pages are merged into one copy. Bookkeeping
goes through the same BlockManager API on both sides, so a swapped-out sequence owns host
pages exactly as a running one owns device pages.
"""

from __future__ import annotations

import torch

from tokenpool.gpu_pool.kv_cache import PagedKVCache
from tokenpool.memory.block_manager import BlockManager


class KVSwapper:
    def __init__(self, device_kv: PagedKVCache, device_blocks: BlockManager,
                 host_kv: PagedKVCache, host_blocks: BlockManager):
        self.device_kv, self.device_blocks = device_kv, device_blocks
        self.host_kv, self.host_blocks = host_kv, host_blocks
        self.bytes_moved = 0

    def can_swap_out(self, seq_id: str) -> bool:
        pages = len(self.device_blocks.block_table(seq_id))
        return pages <= self.host_blocks.num_free

    def can_swap_in(self, seq_id: str, headroom: int = 0) -> bool:
        """Whether its pages, plus `headroom` more, are free on the device."""
        return len(self.host_blocks.block_table(seq_id)) + headroom <= \
            self.device_blocks.num_free

    def swap_out(self, seq_id: str) -> int:
        """Copy the sequence's pages to host slabs and free them on the device; bytes moved."""
        return self._move(seq_id, self.device_blocks, self.device_kv,
                          self.host_blocks, self.host_kv)

    def swap_in(self, seq_id: str) -> int:
        return self._move(seq_id, self.host_blocks, self.host_kv,
                          self.device_blocks, self.device_kv)

    def drop(self, seq_id: str) -> None:
        """Forget a swapped-out sequence (finished or aborted while on the host)."""
        self.host_blocks.free(seq_id)

    def _move(self, seq_id, src_blocks, src_kv, dst_blocks, dst_kv) -> int:
        src = list(src_blocks.block_table(seq_id))
        dst = dst_blocks.grow(seq_id, len(src) * src_blocks.block_size)
        for s, d, n in _runs(src, dst, src_kv.pages_per_slab, dst_kv.pages_per_slab):
            # Asynchronous to or from pinned host memory on CUDA; synchronised below so the
            # source pages can be reused as soon as this returns.
            dst_kv.page_bytes_view(d, n).copy_(src_kv.page_bytes_view(s, n), non_blocking=True)
        for kv in (src_kv, dst_kv):
            if kv.region.is_cuda:
                torch.cuda.current_stream(kv.region.device).synchronize()
        src_blocks.free(seq_id)
        moved = len(src) * src_kv.shape.page_bytes
        self.bytes_moved += moved
        return moved


def _runs(src: list[int], dst: list[int], src_per_slab: int, dst_per_slab: int):
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
