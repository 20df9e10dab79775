"""Stateful property tests of the KV slabs, block managers and weight arena (DESIGN §4).

One worker is modelled: a device SlabPool cut from an ArenaLayout, a host SlabPool for swap
space, several models over five page shapes (pages per slab differ; one page barely fits a
slab; two shapes have equal page bytes), and the bump allocators of the weight slots. Random
interleavings of admit, grow, finish/cancel, swap-out, swap-in and switch must keep: no page is
owned twice; free + used = capacity for every shape; every page of a finished or cancelled
request returns to its free list; page contents survive a swap round trip; and at the end
everything is back to its baseline.

Page contents are modelled at the bookkeeping level: a dict per pool keyed by byte offset
holds a token payload per page, written when a page is granted, copied on swaps and poisoned
when a page is freed.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule)

from tokenpool.memory.arena import (ALIGN, ArenaLayout, ArenaTooSmallError, BumpAllocator,
                                    Region, align_up)
from tokenpool.memory.block_manager import BlockManager, blocks_needed
from tokenpool.memory.packing import ITEMSIZE, PackIndex
from tokenpool.memory.slabs import (BLOCK_SIZE, OutOfPagesError, PageOwnershipError, PageShape,
                                    ShapePages, SlabPool)

# page_bytes = 2 * layers * 16 * kv_heads * head_dim * itemsize
TINY = PageShape(1, 1, 4, 2)  # 256 B: 11-16 pages per slab
WIDE = PageShape(2, 1, 4, 4)  # 1024 B
TALL = PageShape(1, 2, 4, 4)  # 1024 B too, but another shape: must never share a slab with WIDE
MID = PageShape(3, 1, 4, 2)  # 768 B
HUGE = PageShape(23, 1, 1, 4)  # 2944 B: exactly one page per slab, barely (or exactly) fitting
SHAPES = (TINY, WIDE, TALL, MID, HUGE)
MODEL_SHAPES = (TINY, WIDE, TALL, MID, HUGE, TINY)  # the last model shares TINY with the first
SLAB_BYTES = (2944, 3000, 4096)  # unaligned, unaligned with a tail, aligned

POISON = "freed"

token_counts = st.one_of(st.integers(1, 48), st.integers(49, 400))


@dataclass
class Seq:
    model: int
    tokens: int
    where: str  # "dev" or "host"
    table: list[int]  # the block table as last seen, on `where`


@dataclass
class Model:
    shape: PageShape
    dev: BlockManager
    host: BlockManager


class WorkerMemory(RuleBasedStateMachine):
    @initialize(dev_slabs=st.integers(5, 8), host_slabs=st.integers(2, 10),
                dev_slab_bytes=st.sampled_from(SLAB_BYTES),
                host_slab_bytes=st.sampled_from(SLAB_BYTES),
                slot_bytes=st.integers(1, 6000), num_slots=st.integers(1, 2),
                extra=st.floats(0, 1, exclude_max=True))
    def setup(self, dev_slabs, host_slabs, dev_slab_bytes, host_slab_bytes, slot_bytes,
              num_slots, extra):
        arena_bytes = (align_up(slot_bytes) * num_slots + dev_slabs * dev_slab_bytes
                       + int(extra * dev_slab_bytes))
        layout = ArenaLayout.plan(arena_bytes, slot_bytes, num_slots, dev_slab_bytes)
        _check_layout(layout, arena_bytes, slot_bytes, num_slots, dev_slab_bytes)
        assert layout.num_slabs >= dev_slabs - 1  # alignment padding may cost at most one slab
        self.layout = layout
        self.pools = {"dev": SlabPool(layout.num_slabs, dev_slab_bytes),
                      "host": SlabPool(host_slabs, host_slab_bytes)}
        self.mem: dict[str, dict[int, object]] = {"dev": {}, "host": {}}
        self.models = [Model(shape, BlockManager(ShapePages(self.pools["dev"], shape)),
                             BlockManager(ShapePages(self.pools["host"], shape)))
                       for shape in MODEL_SHAPES]
        self.seqs: dict[str, Seq] = {}
        self.all_ids: list[str] = []
        self.next_id = 0
        self.swapped_payload: dict[str, list[object]] = {}  # what a swapped-out seq must get back
        self.bumps = [BumpAllocator(slot) for slot in layout.slots]
        self.placed: list[list[tuple[int, int]]] = [[] for _ in layout.slots]
        self.finished = 0

    # -- helpers ----------------------------------------------------------------------------

    def _mgr(self, seq: Seq, where: str | None = None) -> BlockManager:
        model = self.models[seq.model]
        return model.dev if (where or seq.where) == "dev" else model.host

    def _offsets(self, where: str, shape: PageShape, table: list[int]) -> list[int]:
        pool = self.pools[where]
        return [pool.byte_offset(shape, p) for p in table]

    def _payload(self, sid: str) -> list[object]:
        seq = self.seqs[sid]
        shape = self.models[seq.model].shape
        return [self.mem[seq.where].get(o) for o in self._offsets(seq.where, shape, seq.table)]

    def _grant(self, sid: str, old_len: int) -> None:
        """Write the payload of pages newly granted to `sid`."""
        seq = self.seqs[sid]
        shape = self.models[seq.model].shape
        offs = self._offsets(seq.where, shape, seq.table)
        for i in range(old_len, len(offs)):
            self.mem[seq.where][offs[i]] = (sid, i)

    def _poison(self, where: str, shape: PageShape, table: list[int]) -> None:
        for o in self._offsets(where, shape, table):
            self.mem[where][o] = POISON

    def _snapshot(self):
        pools = {name: (p.num_empty_slabs, p.used_bytes,
                        tuple(p.shape_of(s) for s in range(p.num_slabs)),
                        tuple(p.num_free(sh) for sh in SHAPES),
                        tuple(p.num_used(sh) for sh in SHAPES))
                 for name, p in self.pools.items()}
        managers = tuple((m.dev.num_used, m.host.num_used) for m in self.models)
        tables = {sid: (s.where, list(self._mgr(s).block_table(sid)))
                  for sid, s in self.seqs.items()}
        has = tuple((m.dev.has(sid), m.host.has(sid)) for m in self.models for sid in self.all_ids)
        mem = {k: dict(v) for k, v in self.mem.items()}
        return pools, managers, tables, has, mem

    def _pick(self, data, where: str) -> str:
        return data.draw(st.sampled_from(sorted(s for s, q in self.seqs.items()
                                                if q.where == where)))

    def _has_on(self, where: str) -> bool:
        return any(q.where == where for q in self.seqs.values())

    # -- rules ------------------------------------------------------------------------------

    @rule(model=st.integers(0, len(MODEL_SHAPES) - 1), tokens=token_counts)
    def admit(self, model, tokens):
        sid = f"s{self.next_id}"
        self.next_id += 1
        self.all_ids.append(sid)
        mgr = self.models[model].dev
        if not mgr.can_grow(sid, tokens):
            before = self._snapshot()
            with pytest.raises(OutOfPagesError):
                mgr.grow(sid, tokens)
            assert not mgr.has(sid)
            assert self._snapshot() == before
            return
        table = mgr.grow(sid, tokens)
        assert len(table) == blocks_needed(tokens)
        self.seqs[sid] = Seq(model, tokens, "dev", list(table))
        self._grant(sid, 0)

    @precondition(lambda self: self._has_on("dev"))
    @rule(data=st.data(), more=st.one_of(st.integers(0, 40), st.integers(41, 400)))
    def grow(self, data, more):
        sid = self._pick(data, "dev")
        seq = self.seqs[sid]
        mgr = self._mgr(seq)
        tokens = seq.tokens + more
        if not mgr.can_grow(sid, tokens):
            before = self._snapshot()
            with pytest.raises(OutOfPagesError):
                mgr.grow(sid, tokens)
            assert self._snapshot() == before
            return
        old = list(seq.table)
        table = mgr.grow(sid, tokens)
        assert table[: len(old)] == old  # growing never moves a page already held
        assert len(table) == blocks_needed(tokens)
        seq.tokens, seq.table = tokens, list(table)
        self._grant(sid, len(old))

    @precondition(lambda self: bool(self.seqs))
    @rule(data=st.data())
    def finish_or_cancel(self, data):
        """A request finishes or is cancelled, on the device or while swapped out."""
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        seq = self.seqs.pop(sid)
        shape = self.models[seq.model].shape
        mgr = self._mgr(seq)
        assert mgr.free(sid) == len(seq.table)
        assert not mgr.has(sid)
        assert mgr.free(sid) == 0  # freeing again is a no-op for the manager
        self._poison(seq.where, shape, seq.table)
        self.swapped_payload.pop(sid, None)
        self.finished += 1

    @precondition(lambda self: self._has_on("dev"))
    @rule(data=st.data())
    def swap_out(self, data):
        sid = self._pick(data, "dev")
        seq = self.seqs[sid]
        shape = self.models[seq.model].shape
        dev, host = self._mgr(seq, "dev"), self._mgr(seq, "host")
        if not host.can_grow(sid, seq.tokens):
            before = self._snapshot()
            with pytest.raises(OutOfPagesError):
                host.grow(sid, seq.tokens)
            assert not host.has(sid)
            assert self._snapshot() == before
            return
        payload = self._payload(sid)
        dev_offs = self._offsets("dev", shape, seq.table)
        host_table = list(host.grow(sid, seq.tokens))
        assert len(host_table) == len(seq.table)
        for d, h in zip(dev_offs, self._offsets("host", shape, host_table)):
            self.mem["host"][h] = self.mem["dev"][d]
        assert dev.free(sid) == len(seq.table)
        self._poison("dev", shape, seq.table)
        seq.where, seq.table = "host", host_table
        assert self._payload(sid) == payload
        self.swapped_payload[sid] = payload

    @precondition(lambda self: self._has_on("host"))
    @rule(data=st.data())
    def swap_in(self, data):
        sid = self._pick(data, "host")
        seq = self.seqs[sid]
        shape = self.models[seq.model].shape
        dev, host = self._mgr(seq, "dev"), self._mgr(seq, "host")
        if not dev.can_grow(sid, seq.tokens):
            before = self._snapshot()
            with pytest.raises(OutOfPagesError):
                dev.grow(sid, seq.tokens)
            assert not dev.has(sid)
            assert self._snapshot() == before
            return
        host_offs = self._offsets("host", shape, seq.table)
        dev_table = list(dev.grow(sid, seq.tokens))
        for h, d in zip(host_offs, self._offsets("dev", shape, dev_table)):
            self.mem["dev"][d] = self.mem["host"][h]
        assert host.free(sid) == len(seq.table)
        self._poison("host", shape, seq.table)
        seq.where, seq.table = "dev", dev_table
        # Bit-identical after the round trip: the same payload, page for page.
        assert self._payload(sid) == self.swapped_payload.pop(sid)
        assert self._payload(sid) == [(sid, i) for i in range(len(dev_table))]

    @rule(slot=st.integers(0, 1), sizes=st.lists(st.integers(0, 2500), max_size=8))
    def switch(self, slot, sizes):
        """A weight slot receives another model: reset, then place its tensors one by one."""
        slot %= len(self.bumps)
        bump, region = self.bumps[slot], self.layout.slots[slot]
        bump.reset()
        assert bump.used == 0 and bump.free == region.size
        placed = []
        for n in sizes:
            used = bump.used
            try:
                start = bump.alloc(n)
            except ArenaTooSmallError as e:
                assert region.name in str(e)
                assert bump.used == used  # a refused tensor takes nothing
                assert align_up(region.offset + used) + n > region.end
                break
            assert start % ALIGN == 0
            assert region.offset <= start and start + n <= region.end
            assert bump.used == start + n - region.offset
            placed.append((start, start + n))
        self.placed[slot] = placed

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def pools_consistent(self):
        for where, pool in self.pools.items():
            self._check_pool(where, pool)

    def _check_pool(self, where: str, pool: SlabPool) -> None:
        n, sb = pool.num_slabs, pool.slab_bytes
        ranges = []  # (start, end, sid)
        per_slab: Counter[int] = Counter()
        per_mgr: Counter[tuple[int, str]] = Counter()
        for sid, seq in self.seqs.items():
            if seq.where != where:
                continue
            shape = self.models[seq.model].shape
            mgr = self._mgr(seq)
            assert mgr.block_table(sid) == seq.table  # nobody rewrote a table behind our back
            assert len(seq.table) == blocks_needed(seq.tokens)
            per_slab_shape = pool.pages_per_slab(shape)
            for page in seq.table:
                slab, _ = divmod(page, per_slab_shape)
                assert 0 <= slab < n, (where, sid, page)
                assert pool.shape_of(slab) == shape, (where, sid, page, pool.shape_of(slab))
                start = pool.byte_offset(shape, page)
                end = start + shape.page_bytes
                assert slab * sb <= start and end <= (slab + 1) * sb and end <= n * sb
                ranges.append((start, end, sid))
                per_slab[slab] += 1
            per_mgr[(seq.model, where)] += len(seq.table)
        ranges.sort()
        for (_, end, a), (start, _, b) in zip(ranges, ranges[1:]):
            assert end <= start, f"{where}: a page of {a} overlaps a page of {b}"

        in_use = [s for s in range(n) if pool.shape_of(s) is not None]
        assert pool.num_empty_slabs + len(in_use) == n
        for s in in_use:
            # An in-use slab that nobody owns a page of is a leak: empty slabs go back.
            assert 1 <= per_slab[s] <= pool.pages_per_slab(pool.shape_of(s)), (where, s)
        for shape in SHAPES:
            per = pool.pages_per_slab(shape)
            mine = [s for s in in_use if pool.shape_of(s) == shape]
            used = sum(per_slab[s] for s in mine)
            assert pool.num_used(shape) == used
            assert pool.num_free(shape) == sum(per - per_slab[s] for s in mine) \
                + pool.num_empty_slabs * per
            # free + used = capacity, less the slabs other shapes hold
            assert pool.num_free(shape) + pool.num_used(shape) \
                + per * (len(in_use) - len(mine)) == pool.capacity(shape)
        assert pool.used_bytes == sum(e - s for s, e, _ in ranges)

        for i, model in enumerate(self.models):
            mgr = model.dev if where == "dev" else model.host
            assert mgr.num_used == per_mgr[(i, where)]
            assert mgr.num_free == pool.num_free(model.shape)
            assert mgr.num_pages == pool.capacity(model.shape)
            for sid in self.all_ids:
                live = sid in self.seqs and self.seqs[sid].where == where \
                    and self.seqs[sid].model == i
                assert mgr.has(sid) == live, (where, i, sid)

    @invariant()
    def payloads_intact(self):
        for sid in self.seqs:
            assert self._payload(sid) == [(sid, i) for i in range(len(self.seqs[sid].table))]

    @invariant()
    def weights_in_their_slots(self):
        for bump, region, placed in zip(self.bumps, self.layout.slots, self.placed):
            assert bump.used + bump.free == region.size
            assert 0 <= bump.used <= region.size
            for (_, end), (start, _) in zip(placed, placed[1:]):
                assert end <= start
            assert all(region.offset <= s and e <= region.end for s, e in placed)
            assert not placed or bump.used == placed[-1][1] - region.offset

    # -- the end of a run -------------------------------------------------------------------

    def teardown(self):
        if not hasattr(self, "pools"):
            return
        for sid, seq in list(self.seqs.items()):
            assert self._mgr(seq).free(sid) == len(seq.table)
            del self.seqs[sid]
        for pool in self.pools.values():
            assert pool.num_empty_slabs == pool.num_slabs
            assert pool.used_bytes == 0
            assert all(pool.shape_of(s) is None for s in range(pool.num_slabs))
            for shape in SHAPES:
                assert pool.num_free(shape) == pool.capacity(shape)
                assert pool.num_used(shape) == 0
        for model in self.models:
            assert model.dev.num_used == 0 and model.host.num_used == 0
            assert model.dev.num_free == model.dev.num_pages
        for bump in self.bumps:
            bump.reset()
            assert bump.used == 0 and bump.free == bump.region.size


WorkerMemory.TestCase.settings = settings(
    max_examples=100, stateful_step_count=50, deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],  # explain: minutes
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestWorkerMemory = WorkerMemory.TestCase


def _check_layout(layout: ArenaLayout, arena_bytes: int, slot_bytes: int, num_slots: int,
                  slab_bytes: int) -> None:
    assert layout.kv.offset == 0 and layout.kv.size % slab_bytes == 0
    assert layout.num_slabs >= 1 and layout.slab_bytes == slab_bytes
    assert len(layout.slots) == num_slots
    regions = sorted([layout.kv, *layout.slots], key=lambda r: r.offset)
    for a, b in zip(regions, regions[1:]):
        assert a.end <= b.offset, (a, b)
    for slot in layout.slots:
        assert slot.offset % ALIGN == 0 and slot.size >= slot_bytes
    assert layout.total_bytes <= arena_bytes, (layout, arena_bytes)
    # As many slabs as fit: one more would push the slots past the arena's end.
    more = align_up(layout.kv.size + slab_bytes) + num_slots * align_up(slot_bytes)
    assert more > arena_bytes


# -- edges ----------------------------------------------------------------------------------


def test_double_free_raises_and_changes_nothing():
    pool = SlabPool(2, 4096)
    pages = pool.alloc(WIDE, 3)
    pool.free(WIDE, pages[:1])
    used = pool.used_bytes
    with pytest.raises(PageOwnershipError):
        pool.free(WIDE, pages[:1])
    assert pool.used_bytes == used and pool.num_used(WIDE) == 2
    pool.free(WIDE, pages[1:])
    assert pool.num_empty_slabs == 2
    with pytest.raises(PageOwnershipError):  # its slab is empty now
        pool.free(WIDE, pages[1:2])


def test_free_as_wrong_shape_raises():
    pool = SlabPool(2, 4096)
    (page,) = pool.alloc(WIDE, 1)
    with pytest.raises(PageOwnershipError):  # same page bytes, another shape
        pool.free(TALL, [page])
    with pytest.raises(PageOwnershipError):
        pool.free(TINY, [page])
    with pytest.raises(PageOwnershipError):  # a page past the pool's end
        pool.free(WIDE, [pool.capacity(WIDE)])
    assert pool.num_used(WIDE) == 1
    pool.free(WIDE, [page])
    assert pool.used_bytes == 0


def test_page_larger_than_a_slab_is_refused():
    pool = SlabPool(4, 2943)
    with pytest.raises(ValueError, match="2944 B page.*2943 B slab"):
        ShapePages(pool, HUGE)
    ShapePages(SlabPool(4, 2944), HUGE)  # exactly one page fits


def test_out_of_pages_leaves_block_manager_unchanged():
    pool = SlabPool(2, 2944)
    bm = BlockManager(ShapePages(pool, HUGE))
    bm.grow("a", BLOCK_SIZE)
    assert not bm.can_grow("b", 2 * BLOCK_SIZE)
    with pytest.raises(OutOfPagesError):
        bm.grow("b", 2 * BLOCK_SIZE)
    assert not bm.has("b") and bm.num_used == 1 and pool.num_free(HUGE) == 1
    with pytest.raises(OutOfPagesError):
        bm.grow("a", 3 * BLOCK_SIZE)
    assert bm.block_table("a") == [0]


def test_empty_slab_is_reused_by_another_shape():
    pool = SlabPool(1, 4096)
    tiny = pool.alloc(TINY, pool.pages_per_slab(TINY))
    assert pool.num_free(HUGE) == 0
    pool.free(TINY, tiny[1:])
    assert pool.shape_of(0) == TINY and pool.num_free(HUGE) == 0
    pool.free(TINY, tiny[:1])
    assert pool.shape_of(0) is None
    assert pool.alloc(HUGE, 1) == [0] and pool.shape_of(0) == HUGE


def test_plan_refuses_an_arena_too_small():
    with pytest.raises(ArenaTooSmallError) as e:
        ArenaLayout.plan(10_000, 3000, 2, 4096)
    msg = str(e.value)
    assert "10000" in msg and "3072" in msg and "4096" in msg
    ArenaLayout.plan(2 * 3072 + 4096, 3000, 2, 4096)  # exactly enough


@settings(max_examples=200, deadline=None)
@given(slot_bytes=st.integers(1, 10_000), num_slots=st.integers(1, 3),
       slab_bytes=st.integers(1, 5000), slabs=st.integers(1, 6),
       extra=st.integers(0, 5000))
def test_plan_fits_the_arena(slot_bytes, num_slots, slab_bytes, slabs, extra):
    arena_bytes = align_up(slot_bytes) * num_slots + slabs * slab_bytes + extra
    try:
        layout = ArenaLayout.plan(arena_bytes, slot_bytes, num_slots, slab_bytes)
    except ArenaTooSmallError:
        # Only when alignment padding eats the room there was for one slab.
        assert (slabs * slab_bytes + extra) // ALIGN * ALIGN < slab_bytes
        return
    _check_layout(layout, arena_bytes, slot_bytes, num_slots, slab_bytes)


def test_bump_allocator_refuses_and_resets():
    bump = BumpAllocator(Region("w", 512, 1000))
    assert bump.alloc(10) == 512
    assert bump.alloc(10) == 768  # aligned
    with pytest.raises(ArenaTooSmallError, match="w: 500 B asked"):
        bump.alloc(500)
    assert bump.used == 266
    bump.reset()
    assert bump.used == 0 and bump.free == 1000


tensor_specs = st.lists(
    st.tuples(st.text("abcxyz._0123", min_size=1, max_size=12), st.sampled_from(sorted(ITEMSIZE)),
              st.lists(st.integers(0, 40), max_size=3).map(tuple)),
    max_size=12, unique_by=lambda t: t[0])


@settings(max_examples=100, deadline=None)
@given(specs=tensor_specs, align=st.sampled_from([1, 64, ALIGN]))
def test_pack_index_layout(specs, align):
    index = PackIndex.layout(specs, align=align)
    assert [e.name for e in index.entries] == [s[0] for s in specs]
    end = 0
    for entry, (name, dtype, shape) in zip(index.entries, specs):
        assert entry.offset % align == 0 and entry.offset >= end
        assert (entry.dtype, entry.shape) == (dtype, shape)
        assert index[name] == entry
        end = entry.offset + entry.nbytes
    assert end <= index.nbytes and index.nbytes % align == 0
    assert PackIndex.from_dict(index.to_dict()) == index
    assert PackIndex.from_dict(json.loads(json.dumps(index.to_dict()))) == index
    with pytest.raises(KeyError):
        index["no such tensor"]
