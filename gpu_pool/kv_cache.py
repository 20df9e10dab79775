"""The paged KV cache of one page shape, as a view over a byte region cut into slabs.

The region (a worker arena's KV part, or host swap space) is divided into equal slabs
(`memory.SlabPool` decides who owns which). Seen through one model's page shape it is
`[slabs, pages_per_slab, layers, 2 (K, V), BLOCK_SIZE, kv_heads, head_dim]`: page-major, so a
page is one contiguous run of bytes and swapping it out or in is a plain copy. Slabs of other
shapes are simply never indexed through this view.

Page `p` is slot `p % pages_per_slab` of slab `p // pages_per_slab`, as in memory/slabs.py.
"""

from __future__ import annotations

import torch

from tokenpool.memory.slabs import PageShape


class PagedKVCache:
    def __init__(self, region: torch.Tensor, shape: PageShape, slab_bytes: int,
                 dtype: torch.dtype):
        if region.dtype != torch.uint8 or region.dim() != 1:
            raise ValueError("region must be a flat uint8 tensor")
        if slab_bytes % shape.itemsize or shape.page_bytes > slab_bytes:
            raise ValueError(f"slab of {slab_bytes} B cannot hold {shape.page_bytes} B pages")
        self.shape = shape
        self.region = region
        self.block_size = shape.block_size
        self.num_slabs = region.numel() // slab_bytes
        self.pages_per_slab = slab_bytes // shape.page_bytes
        self.slab_elems = slab_bytes // shape.itemsize
        self.page_elems = shape.page_elems
        elems = region[: self.num_slabs * slab_bytes].view(dtype)
        L, bs, kvh, d = shape.num_layers, shape.block_size, shape.num_kv_heads, shape.head_dim
        row = kvh * d
        self.data = elems.as_strided(
            (self.num_slabs, self.pages_per_slab, L, 2, bs, kvh, d),
            (self.slab_elems, self.page_elems, 2 * bs * row, bs * row, row, d, 1),
            elems.storage_offset())

    @property
    def num_pages(self) -> int:
        return self.num_slabs * self.pages_per_slab

    def locate(self, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(slab, slot) of each page id."""
        return pages // self.pages_per_slab, pages % self.pages_per_slab

    def page_offsets(self, pages: torch.Tensor) -> torch.Tensor:
        """Element offset of each page from page 0, for the fused decode kernel."""
        slab, slot = self.locate(pages)
        return slab * self.slab_elems + slot * self.page_elems

    def base(self, layer: int, kind: int) -> torch.Tensor:
        """Page 0's [BLOCK_SIZE, kv_heads, head_dim] block of K (kind 0) or V (kind 1)."""
        return self.data[0, 0, layer, kind]

    def token_index(self, slots: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(slab, slot, offset) of token slots `page * BLOCK_SIZE + offset`, for `write`."""
        pages, offsets = slots // self.block_size, slots % self.block_size
        return (*self.locate(pages), offsets)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor,
              index: tuple[torch.Tensor, ...]) -> None:
        """k, v: [N, kv_heads, head_dim] at tokens located by `token_index`."""
        slab, slot, offset = index
        self.data[slab, slot, layer, 0, offset] = k
        self.data[slab, slot, layer, 1, offset] = v

    def gather(self, layer: int, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of block tables [B, pages] as [B, pages * BLOCK_SIZE, kv_heads, D]."""
        slab, slot = self.locate(tables)
        keys = self.data[slab, slot, layer, 0]  # [B, pages, BLOCK_SIZE, KVH, D], a copy
        values = self.data[slab, slot, layer, 1]
        return keys.flatten(1, 2), values.flatten(1, 2)

    def page_bytes_view(self, page: int, count: int = 1) -> torch.Tensor:
        """The bytes of `count` pages from `page` on, all in one slab: what a swap copies."""
        slab, slot = divmod(page, self.pages_per_slab)
        if slot + count > self.pages_per_slab:
            raise ValueError(f"pages {page}..{page + count - 1} cross a slab boundary")
        start = slab * self.slab_elems * self.shape.itemsize + slot * self.shape.page_bytes
        return self.region[start: start + count * self.shape.page_bytes]
