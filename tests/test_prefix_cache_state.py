"""Stateful property tests of prefix caching: retained pages in a SlabPool, PrefixCache names
and reference counts, and BlockManagers that adopt a cached prefix.

One worker's device pool is modelled with three page shapes (6, 3 and 2 pages per slab) and
four models, two of them sharing a shape. Prompts come from a two-token alphabet and often
reuse part of an earlier prompt, so prefixes repeat. The test keeps its own record of who
holds each page, which pages are named (by which model and tokens) and the order in which
pages were retained, and compares the pool and caches against it after every rule. It reads
the private dicts of PrefixCache (`_name_of`, `_page_of`, `_model_of`, `_refs`) and SlabPool
(`_retained`): the public surface has counts only, and these invariants are about identity.
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tokenpool.memory.block_manager import BlockManager
from tokenpool.memory.prefix_cache import PrefixCache, extend_hashes, page_hashes
from tokenpool.memory.slabs import OutOfPagesError, PageShape, SlabPool

BS = 4  # tokens per page: small, so a few tokens fill one
SLAB = 1536
A = PageShape(1, 1, 8, 4, BS)  # 256 B: 6 pages per slab
B = PageShape(2, 1, 8, 4, BS)  # 512 B: 3
C = PageShape(3, 1, 8, 4, BS)  # 768 B: 2
SHAPES = (A, B, C)
MODELS = (("m0", A), ("m1", A), ("m2", B), ("m3", C))  # m0 and m1 share A's cache, never pages
TOKENS = st.lists(st.integers(0, 1), min_size=1, max_size=10)


class Seq:
    __slots__ = ("model", "tokens", "names", "table", "named")

    def __init__(self, model: int, tokens: list[int]):
        self.model, self.tokens, self.table, self.named = model, tokens, [], 0
        self.names = list(page_hashes(MODELS[model][0], tokens, BS))


class PrefixWorker(RuleBasedStateMachine):
    @initialize(num_slabs=st.integers(2, 5))
    def setup(self, num_slabs):
        self.pool = SlabPool(num_slabs, SLAB)
        self.caches = {s: PrefixCache(self.pool, s) for s in SHAPES}
        for shape in SHAPES:  # listen in on evictions, then pass them on
            self.pool.on_evict(shape, self._spy(shape))
        self.mgrs = [BlockManager(self.caches[shape], BS) for _, shape in MODELS]
        self.seqs: dict[str, Seq] = {}
        self.history: list[tuple[int, list[int]]] = []
        self.next_id = 0
        # The test's own record, per shape: named page -> (name, model, token prefix); pages
        # retained, oldest first; pages allocated straight from the pool.
        self.named: dict[PageShape, dict[int, tuple[int, str, tuple[int, ...]]]] = \
            {s: {} for s in SHAPES}
        self.lru: dict[PageShape, list[int]] = {s: [] for s in SHAPES}
        self.raw: dict[PageShape, list[int]] = {s: [] for s in SHAPES}
        self.events: list[tuple[PageShape, list[int]]] = []

    # -- the test's record --------------------------------------------------------------------

    def _spy(self, shape):
        cache = self.caches[shape]

        def evicted(pages):
            held = self._holders(shape)
            gone = set()
            for p in pages:
                assert held[p] == 0 and p in self.lru[shape], f"evicted a held page {p}"
                gone.add(self.named[shape].pop(p)[0])
                self.lru[shape].remove(p)
            before = set(cache._page_of)
            cache._evicted(pages)
            assert before - set(cache._page_of) == gone and set(cache._page_of) <= before
            self.events.append((shape, list(pages)))
        return evicted

    def _holders(self, shape) -> Counter[int]:
        return Counter(p for s in self.seqs.values() if MODELS[s.model][1] == shape
                       for p in s.table)

    def _slabs(self) -> dict[int, tuple[PageShape, int, int]]:
        """Slab -> (shape, pages in use, pages retained), from the record alone."""
        out: dict[int, tuple[PageShape, int, int]] = {}
        for shape in SHAPES:
            per = self.pool.pages_per_slab(shape)
            lru = set(self.lru[shape])
            for p in set(self._holders(shape)) | set(self.raw[shape]) | lru:
                sh, used, kept = out.get(p // per, (shape, 0, 0))
                assert sh == shape, f"slab {p // per} holds pages of two shapes"
                out[p // per] = (shape, used + 1, kept + (p in lru))
        return out

    def _truly_free(self, shape) -> int:
        per, slabs = self.pool.pages_per_slab(shape), self._slabs()
        return sum(per - used for sh, used, _ in slabs.values() if sh == shape) \
            + (self.pool.num_slabs - len(slabs)) * per

    def _alloc(self, shape, need, call):
        """Run `call` (it allocates `need` pages of `shape`) and check what it evicted: the
        shape's own oldest retained pages once free ones ran out, then whole retained-only
        slabs of other shapes."""
        free, old_lru, per = self._truly_free(shape), list(self.lru[shape]), \
            self.pool.pages_per_slab(shape)
        whole = {(sh, frozenset(p for p in self.lru[sh]
                                if p // self.pool.pages_per_slab(sh) == slab))
                 for slab, (sh, used, kept) in self._slabs().items() if used == kept}
        self.events = []
        result = call()
        own = min(max(0, need - free), len(old_lru))
        assert [p for sh, ps in self.events if sh == shape for p in ps] == old_lru[:own]
        other = [(sh, frozenset(ps)) for sh, ps in self.events if sh != shape]
        assert len(other) == max(0, -(-(need - free - own) // per))
        assert all(ev in whole for ev in other), (other, whole)
        return result

    def _name_full(self, seq: Seq) -> None:
        model, shape = MODELS[seq.model]
        named, cache = self.named[shape], self.caches[shape]
        for i in range(seq.named, len(seq.tokens) // BS):
            page, name = seq.table[i], seq.names[i]
            fresh = page not in named and all(n != name for n, _, _ in named.values())
            assert cache.name(page, name, model) == fresh
            if fresh:
                named[page] = (name, model, tuple(seq.tokens[: (i + 1) * BS]))
        seq.named = len(seq.tokens) // BS

    def _release(self, sid: str) -> None:
        seq = self.seqs.pop(sid)
        shape = MODELS[seq.model][1]
        assert self.mgrs[seq.model].free(sid) == len(seq.table)
        held = self._holders(shape)
        self.lru[shape] += [p for p in seq.table if p in self.named[shape] and not held[p]]

    # -- rules --------------------------------------------------------------------------------

    @rule(data=st.data(), model=st.integers(0, len(MODELS) - 1), tail=TOKENS)
    def admit(self, data, model, tail):
        """A prompt, often an earlier one's prefix plus more, often for the same model."""
        was, base = data.draw(st.sampled_from(self.history)) if self.history else (model, [])
        model = was if data.draw(st.booleans()) else model
        tokens = base[: data.draw(st.sampled_from([len(base)]) | st.integers(0, len(base)))] + tail
        self.history.append((model, tokens))
        sid, self.next_id = f"s{self.next_id}", self.next_id + 1
        seq, (name, shape) = Seq(model, tokens), MODELS[model]
        cache, mgr, named = self.caches[shape], self.mgrs[model], self.named[shape]
        origin = {(m, toks): p for p, (_, m, toks) in named.items()}
        want = 0
        while want < len(seq.names) and (name, tuple(tokens[: (want + 1) * BS])) in origin:
            want += 1
        assert cache.match(seq.names) == want
        pages = cache.acquire(seq.names)
        assert len(pages) == want
        for i, p in enumerate(pages):  # the very pages named for this model's same tokens
            assert origin[(name, tuple(tokens[: (i + 1) * BS]))] == p
            assert (cache._name_of[p], cache._model_of[p]) == (seq.names[i], name)
            if p in self.lru[shape]:
                self.lru[shape].remove(p)
        assert mgr.adopt(sid, pages) == pages
        seq.table, seq.named, self.seqs[sid] = list(pages), want, seq
        if not mgr.can_grow(sid, len(tokens)):
            self._release(sid)  # no room for the rest: let the prefix go again
            return
        seq.table = list(self._alloc(shape, mgr.pages_to_grow(sid, len(tokens)),
                                     lambda: mgr.grow(sid, len(tokens))))
        self._name_full(seq)

    @precondition(lambda self: bool(self.seqs))
    @rule(data=st.data(), more=TOKENS)
    def extend(self, data, more):
        """A sequence decodes more tokens, often the ones an earlier prompt went on with."""
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        seq, mgr = self.seqs[sid], self.mgrs[self.seqs[sid].model]
        n = len(seq.tokens)
        later = [t[n: n + 8] for m, t in self.history if m == seq.model and len(t) > n
                 and t[:n] == seq.tokens]
        tokens = seq.tokens + (data.draw(st.sampled_from(later)) if later else more)
        if not mgr.can_grow(sid, len(tokens)):
            free = mgr.num_free
            with pytest.raises(OutOfPagesError):
                mgr.grow(sid, len(tokens))
            assert mgr.block_table(sid) == seq.table and mgr.num_free == free
            return
        shape = MODELS[seq.model][1]
        table = self._alloc(shape, mgr.pages_to_grow(sid, len(tokens)),
                            lambda: mgr.grow(sid, len(tokens)))
        assert table[: len(seq.table)] == seq.table
        seq.tokens, seq.table = tokens, list(table)
        extend_hashes(seq.names, MODELS[seq.model][0], tokens, BS)
        assert tuple(seq.names) == page_hashes(MODELS[seq.model][0], tokens, BS)
        self._name_full(seq)

    @precondition(lambda self: bool(self.seqs))
    @rule(data=st.data())
    def finish(self, data):
        self._release(data.draw(st.sampled_from(sorted(self.seqs))))

    @rule(shape=st.sampled_from(SHAPES))
    def flush(self, shape):
        old, self.events = list(self.lru[shape]), []
        assert self.caches[shape].flush() == len(old)
        assert self.events == ([(shape, old)] if old else [])

    @rule(shape=st.sampled_from(SHAPES), n=st.integers(1, 8))
    def alloc_raw(self, shape, n):
        """Another engine's pages, straight from the pool: evicts across shapes."""
        if n > self.pool.num_free(shape):
            with pytest.raises(OutOfPagesError):
                self.pool.alloc(shape, n)
            return
        self.raw[shape] += self._alloc(shape, n, lambda: self.pool.alloc(shape, n))

    @rule(shape=st.sampled_from(SHAPES), n=st.integers(1, 8))
    def free_raw(self, shape, n):
        pages, self.raw[shape] = self.raw[shape][:n], self.raw[shape][n:]
        self.caches[shape].free(pages)

    # -- invariants -----------------------------------------------------------------------------

    @invariant()
    def pages_consistent(self):
        for shape in SHAPES:
            cache, named, held = self.caches[shape], self.named[shape], self._holders(shape)
            for p, n in held.items():
                assert n == 1 or p in named, f"unnamed page {p} held {n} times"
            assert cache._name_of == {p: n for p, (n, _, _) in named.items()}
            assert cache._page_of == {n: p for p, (n, _, _) in named.items()}
            assert cache._model_of == {p: m for p, (_, m, _) in named.items()}
            assert cache._refs == {p: held[p] for p in named}
            assert cache.cached_pages() == dict(Counter(m for _, m, _ in named.values()))
            # retained (so held by no sequence): the named pages no one holds, oldest first
            assert sorted(self.lru[shape]) == sorted(p for p in named if not held[p])
            assert list(self.pool._retained.get(shape, ())) == self.lru[shape]
            assert cache.num_retained == len(self.lru[shape])
            assert not set(self.raw[shape]) & (set(held) | set(named))
        for seq in self.seqs.values():
            assert len(seq.table) * BS >= len(seq.tokens) > (len(seq.table) - 1) * BS

    @invariant()
    def counts_match_a_recount(self):
        slabs = self._slabs()
        assert {s: sh for s, (sh, _, _) in slabs.items()} == \
            {s: self.pool.shape_of(s) for s in range(self.pool.num_slabs)
             if self.pool.shape_of(s) is not None}
        for shape in SHAPES:
            per = self.pool.pages_per_slab(shape)
            others = sum(1 for sh, used, kept in slabs.values() if sh != shape and used == kept)
            assert self.pool.num_free(shape) == \
                self._truly_free(shape) + len(self.lru[shape]) + others * per
        # used_bytes counts held pages only; retained_bytes the rest of the pages in use
        assert self.pool.retained_bytes == \
            sum(kept * sh.page_bytes for sh, _, kept in slabs.values())
        assert self.pool.used_bytes == \
            sum((used - kept) * sh.page_bytes for sh, used, kept in slabs.values())
        for i, mgr in enumerate(self.mgrs):
            assert mgr.num_used == len({p for sid, s in self.seqs.items() if s.model == i
                                        for p in s.table})
            for sid, s in self.seqs.items():
                assert mgr.has(sid) == (s.model == i)
                assert s.model != i or mgr.block_table(sid) == s.table

    def teardown(self):
        if not hasattr(self, "pool"):
            return
        for sid in list(self.seqs):
            self._release(sid)
        for shape in SHAPES:
            self.free_raw(shape, len(self.raw[shape]))
            self.flush(shape)
            assert self.caches[shape].cached_pages() == {} and not self.named[shape]
        assert self.pool.used_bytes == self.pool.retained_bytes == 0
        assert self.pool.num_empty_slabs == self.pool.num_slabs
        assert all(self.pool.num_free(s) == self.pool.capacity(s) for s in SHAPES)
        assert all(self.pool.shape_of(s) is None for s in range(self.pool.num_slabs))


PrefixWorker.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestPrefixWorker = PrefixWorker.TestCase


# -- edges ------------------------------------------------------------------------------------


def _retained_pool(num_slabs: int, shape: PageShape, n: int, keep: int):
    """A pool whose first `n` pages of `shape` are allocated, the first `keep` retained."""
    pool, evicted = SlabPool(num_slabs, SLAB), []
    pool.on_evict(shape, evicted.extend)
    pages = pool.alloc(shape, n)
    pool.retain(shape, pages[:keep])
    return pool, pages, evicted


def test_retained_pages_go_last():
    pool, pages, evicted = _retained_pool(2, A, 4, 2)
    assert pool.num_free(A) == 2 + 2 + 6 and pool.num_retained(A) == 2
    pool.alloc(A, 2 + 6)  # the slab's free slots, then the empty slab
    assert evicted == [] and pool.num_retained(A) == 2
    assert pool.alloc(A, 1) == [pages[0]] and evicted == [pages[0]]


def test_eviction_is_least_recently_retained_first():
    pool, evicted = SlabPool(1, SLAB), []
    pool.on_evict(A, evicted.extend)
    pages = pool.alloc(A, 6)
    pool.retain(A, [pages[3], pages[1], pages[4]])
    pool.reuse(A, pages[3])
    pool.retain(A, [pages[3]])  # let go again: now the newest
    assert pool.alloc(A, 2) == [pages[1], pages[4]]
    assert evicted == [pages[1], pages[4]] and pool.num_retained(A) == 1


def test_retained_only_slab_is_reclaimed_for_another_shape():
    pool, pages, evicted = _retained_pool(2, A, 6 + 2, 0)
    pool.retain(A, pages[1:7])  # slab 0 keeps page 0 in use, slab 1 page 7
    assert pool.num_free(B) == 0
    pool.retain(A, pages[:1])
    assert pool.num_free(B) == 3  # slab 0 holds only retained pages now; slab 1 does not
    got = pool.alloc(B, 3)
    assert pool.shape_of(0) == B and {p // 3 for p in got} == {0}
    assert sorted(evicted) == pages[:6] and pool.num_retained(A) == 1
    assert pool.num_free(A) == 4 + 1 and pool.num_free(B) == 0


def test_releasable_counts_only_pages_every_holder_lets_go_of():
    cache = PrefixCache(SlabPool(1, SLAB), A)
    shared, plain = cache.alloc(2)
    name = page_hashes("m", [1, 2, 3, 4], A.block_size)[0]
    assert cache.name(shared, name, "m") and cache.acquire([name]) == [shared]  # 2 holders
    assert cache.releasable([shared, plain]) == 1
    assert cache.releasable([shared, plain, shared]) == 2
    with pytest.raises(Exception, match="not held"):
        cache.free([shared, shared, shared])
    cache.free([shared, shared, plain])
    assert cache.num_retained == 1 and cache.flush() == 1 and cache.pool.used_bytes == 0


def test_page_hashes_chain_and_separate():
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    names = page_hashes("m", tokens, BS)
    assert len(names) == 2 and len(set(names)) == 2
    assert page_hashes("m", tokens[:4], BS) == names[:1]  # a prefix's names are a prefix
    assert page_hashes("m", tokens[:8], BS) == names
    assert page_hashes("other", tokens, BS) != names
    assert page_hashes("other", tokens, BS)[0] != names[0]
    for i in range(8):
        changed = tokens[:i] + [tokens[i] + 100] + tokens[i + 1:]
        other = page_hashes("m", changed, BS)
        assert other[: i // BS] == names[: i // BS]
        assert all(a != b for a, b in zip(other[i // BS:], names[i // BS:]))
    grown = list(names[:1])
    assert extend_hashes(grown, "m", tokens, BS) is grown and tuple(grown) == names
