"""The engine's scheduler on its own: no model, no torch, hand-made sequences (as vLLM v1 tests
its scheduler). A step runs exactly the sequences it names, and the KV copies it books keep
every sequence's pages holding its own tokens.
"""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from tokenpool.gpu_pool.engine_scheduler import EngineScheduler, StepBatch
from tokenpool.gpu_pool.sequence import Sequence, SeqStatus
from tokenpool.memory.block_manager import BlockManager, OutOfPagesError
from tokenpool.sampling import SamplingParams

BS = 4  # tokens a page: small, so sequences cross pages often


class Pages:
    """A page source of `n` pages."""

    def __init__(self, n: int):
        self.capacity = n
        self._free = list(range(n))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfPagesError(f"{n} pages wanted, {len(self._free)} free")
        taken, self._free = self._free[:n], self._free[n:]
        return taken

    def free(self, pages: list[int]) -> None:
        self._free += pages


def make_scheduler(pages: int, host_pages: int | None = None, max_num_seqs: int = 64,
                   max_num_batched_tokens: int = 8192) -> EngineScheduler:
    host = None if host_pages is None else BlockManager(Pages(host_pages), BS)
    return EngineScheduler(BlockManager(Pages(pages), BS), host, max_num_seqs,
                           max_num_batched_tokens)


def make_seq(seq_id: str, prompt_len: int, max_tokens: int = 1000) -> Sequence:
    return Sequence(seq_id, list(range(1, prompt_len + 1)),
                    SamplingParams(max_tokens=max_tokens, temperature=0), None)


def run(s: EngineScheduler, request_ids=None) -> StepBatch:
    """A step with every stepped sequence sampling one token (a model that never stops)."""
    batch = s.schedule(request_ids)
    s.computed(batch)
    for seq in batch.sequences:
        seq.output_ids.append(7)
    return batch


def ids(seqs) -> list[str]:
    return [s.seq_id for s in seqs]


def started(s: EngineScheduler, **lengths: int) -> list[Sequence]:
    """Sequences of these names and prompt lengths, all prefilled by one step."""
    seqs = [make_seq(name, n) for name, n in lengths.items()]
    for seq in seqs:
        s.add(seq)
    assert ids(run(s).prefills) == list(lengths)
    return seqs


def test_a_named_step_decodes_and_grows_only_the_named_sequences():
    s = make_scheduler(pages=32)
    a, b, c = started(s, a=4, b=4, c=4)  # 5 tokens each now: a decode needs a second page
    batch = run(s, ["b"])
    assert ids(batch.decodes) == ["b"] and not batch.prefills and not batch.swaps
    assert [len(s.blocks.block_table(x.seq_id)) for x in (a, b, c)] == [1, 2, 1]
    assert [x.num_tokens for x in (a, b, c)] == [5, 6, 5]
    assert ids(s.running) == ["a", "b", "c"]  # the others stay resident, untouched
    assert ids(run(s, ["c", "nobody"]).decodes) == ["c"]  # unknown ids are ignored
    assert ids(run(s).decodes) == ["a", "b", "c"]  # None: every running sequence


def test_a_named_step_admits_only_named_prompts_and_a_prefill_step_decodes_nothing():
    s = make_scheduler(pages=32)
    started(s, a=6)
    for name in ("p", "q"):
        s.add(make_seq(name, 5))
    batch = run(s, ["q"])
    assert ids(batch.prefills) == ["q"] and not batch.decodes
    assert ids(s.waiting) == ["p"] and ids(s.running) == ["a", "q"]


@pytest.mark.parametrize("host_pages, lands_in", [(16, SeqStatus.SWAPPED),
                                                  (None, SeqStatus.WAITING)])
def test_short_pages_preempt_unnamed_sequences_newest_first_then_named(host_pages, lands_in):
    s = make_scheduler(pages=4, host_pages=host_pages)
    a, b, c = started(s, a=4, b=4, c=4)  # a page each, one free; a decode needs a second
    batch = run(s, ["a", "b"])
    assert ids(batch.decodes) == ["a", "b"] and [a.num_tokens, b.num_tokens] == [6, 6]
    assert c.status is lands_in and c.num_tokens == 5 and s.num_preemptions == 1
    assert [(op.seq_id, op.out) for op in batch.swaps] == \
        ([("c", True)] if host_pages else [])
    # Once no unnamed sequence is left, the newest named one goes.
    s = make_scheduler(pages=2, host_pages=host_pages)
    x, y = started(s, x=4, y=4)
    batch = run(s, ["x", "y"])
    assert ids(batch.decodes) == ["x"] and y.status is lands_in


def test_a_named_swapped_sequence_comes_back_and_an_unnamed_one_stays_out():
    s = make_scheduler(pages=16, host_pages=16)
    a, b = started(s, a=6, b=6)
    ops = s.swap_out(["a", "b"])
    assert [(op.seq_id, op.out) for op in ops] == [("a", True), ("b", True)]
    assert not s.running and s.blocks.num_used == 0
    batch = run(s, ["b"])
    assert ids(batch.decodes) == ["b"]
    assert [(op.seq_id, op.out) for op in batch.swaps] == [("b", False)]
    assert a.status is SeqStatus.SWAPPED and ids(s.swapped) == ["a"]


def test_a_named_swap_in_makes_room_by_swapping_out_unnamed_sequences():
    s = make_scheduler(pages=4, host_pages=16)
    a, b = started(s, a=6, b=6)  # 2 pages each: the device is full
    s.swap_out(["a"])
    run(s, ["b"])  # b grows into a third page
    batch = run(s, ["a"])
    assert ids(batch.decodes) == ["a"] and b.status is SeqStatus.SWAPPED
    assert [(op.seq_id, op.out) for op in batch.swaps] == [("b", True), ("a", False)]


def test_booked_copies_in_order_keep_every_sequences_kv_its_own():
    """Random named steps under page pressure, with a fake KV store per side: each written
    slot holds (sequence, position). Swaps are applied in the order booked, before the
    step's writes, as the engine does; no live sequence may ever read another's token."""
    rng = random.Random(5)
    s = make_scheduler(pages=14, host_pages=10, max_num_seqs=5, max_num_batched_tokens=40)
    store = {True: {}, False: {}}  # on device?: {(page, offset): (seq_id, position)}
    live: list[Sequence] = []
    directions = set()
    for step in range(400):
        if rng.random() < 0.3:
            seq = make_seq(f"r{step}", rng.randint(1, 20), max_tokens=rng.randint(1, 30))
            s.add(seq)
            live.append(seq)
        named = None if rng.random() < 0.2 else \
            [q.seq_id for q in live if rng.random() < 0.5]
        batch = s.schedule(named)
        for op in batch.swaps:
            directions.add(op.out)
            src, dst = store[op.out], store[not op.out]  # out: device to host
            for p, q in zip(op.src, op.dst):
                for off in range(BS):
                    dst[(q, off)] = src.get((p, off))
        _write(store[True], batch)
        for seq in batch.sequences:
            seq.output_ids.append(rng.randint(1, 99))
            if len(seq.output_ids) >= seq.params.max_tokens:
                s.finish(seq)
                live.remove(seq)
        if named is not None:
            assert set(ids(batch.sequences)) <= set(named)
        _check(s, store)
    assert s.num_preemptions > 0 and directions == {True, False}
    for seq in list(live):
        s.finish(seq)
    assert s.blocks.num_used == 0 and s.host_blocks.num_used == 0


def _write(device: dict, batch: StepBatch) -> None:
    for seq in batch.prefills:
        table = batch.block_tables[seq.seq_id]
        for pos in range(seq.num_tokens):
            device[(table[pos // BS], pos % BS)] = (seq.seq_id, pos)
    for seq in batch.decodes:
        pos = seq.num_tokens - 1
        device[(batch.block_tables[seq.seq_id][pos // BS], pos % BS)] = (seq.seq_id, pos)


def _check(s: EngineScheduler, store: dict) -> None:
    for on_device, blocks, seqs in ((True, s.blocks, s.running),
                                    (False, s.host_blocks, s.swapped)):
        for seq in seqs:
            table = blocks.block_table(seq.seq_id)
            for pos in range(seq.num_tokens - 1):  # the last token's KV is not written yet
                got = store[on_device].get((table[pos // BS], pos % BS))
                assert got == (seq.seq_id, pos), (seq.seq_id, pos, got)


def test_the_scheduler_imports_no_torch():
    code = ("import sys, tokenpool.gpu_pool.engine_scheduler; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
