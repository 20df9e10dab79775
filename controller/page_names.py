"""The names of a prompt's KV pages (memory.prefix_cache), for cache-aware placement.

Only models whose engine caches prefixes (`engine.prefix_caching`) get names: for the others
a request carries none, and placement is plain grouped FCFS. Naming hashes each full page
once: a few microseconds a page, on the submitting thread, never on the controller's loop.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenpool.memory.prefix_cache import extend_hashes, page_hashes


class PageNamer:
    __slots__ = ("models",)

    def __init__(self, models: frozenset[str]):
        self.models = models  # those whose engines cache prefixes

    @classmethod
    def of_fleet(cls, fleet) -> "PageNamer":
        return cls(frozenset(m.id for m in fleet.models
                             if fleet.engine_config(m.id).prefix_caching))

    def __call__(self, model: str, token_ids: Sequence[int]) -> tuple[int, ...]:
        return page_hashes(model, token_ids) if model in self.models else ()

    def extended(self, model: str, names: Sequence[int],
                 token_ids: Sequence[int]) -> tuple[int, ...]:
        """The names of `token_ids`, whose leading pages are named `names` already: only
        the pages past them are hashed (a retried request's prompt grew by its output)."""
        if model not in self.models:
            return ()
        return tuple(extend_hashes(list(names), model, token_ids))
