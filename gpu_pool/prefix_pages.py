"""One model's use of its worker's prefix cache: finding a prompt's cached pages at admission
and naming pages once their KV is written. No torch: the engine scheduler calls it.
"""

from __future__ import annotations

from tokenpool.gpu_pool.sequence import Sequence
from tokenpool.memory.prefix_cache import PrefixCache, extend_hashes


class PrefixPages:
    def __init__(self, cache: PrefixCache, model: str):
        self.cache = cache
        self.model = model
        self.block_size = cache.shape.block_size

    def reusable(self, seq: Sequence) -> int:
        """Leading pages of `seq` that are cached. Its last token is always computed (a step
        must sample from it), so a prompt that is all cached pages reuses one page less."""
        limit = (seq.num_tokens - 1) // self.block_size
        if len(seq.page_names) < limit:
            extend_hashes(seq.page_names, self.model, seq.all_ids(), self.block_size)
        return self.cache.match(seq.page_names[:limit])

    def acquire(self, seq: Sequence, num_pages: int) -> list[int]:
        """Hold `seq`'s first `num_pages` cached pages (reusable() said they are there)."""
        pages = self.cache.acquire(seq.page_names[:num_pages])
        assert len(pages) == num_pages, "cached pages vanished between match and acquire"
        return pages

    def name_computed(self, seq: Sequence, table: list[int]) -> None:
        """Name `seq`'s pages that are full and written, so later prompts can share them. A
        page whose prefix another page holds already stays unnamed (freed when `seq` ends)."""
        full = seq.num_computed // self.block_size
        if full <= seq.num_named:
            return
        if len(seq.page_names) < full:
            extend_hashes(seq.page_names, self.model, seq.all_ids(), self.block_size)
        for i in range(seq.num_named, full):
            self.cache.name(table[i], seq.page_names[i], self.model)
        seq.num_named = full
