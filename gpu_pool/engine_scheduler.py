"""Which sequences an engine step runs, and where their KV pages live. No torch.

As in nano-vllm and vLLM v1, the scheduler owns the queues (waiting, running, swapped) and the
page bookkeeping; the engine runs what it is handed. `schedule(request_ids)` returns a
`StepBatch`: the prompts to prefill, the sequences to decode one token, their block tables,
and the KV copies (`SwapOp`s) the engine makes, in order, before it runs the batch.

A step runs the sequences it names (all of them when it names none): named swapped-out ones
are swapped back in, named running ones decode, named waiting ones are admitted as prompts
under `max_num_seqs` and `max_num_batched_tokens`. When pages run short, sequences the step
does not name are preempted first (newest first), then the newest named ones. A preempted
sequence is swapped out to host pages when they have room, else recomputed later from its
prompt plus its tokens so far.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass

from tokenpool.gpu_pool.sequence import Sequence, SeqStatus
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
    """Sequences to run this step: prefills first (whole token lists), then one-token decodes.

    `swaps` are made before the step runs, in order: the bookkeeping already moved the pages,
    so a later copy may write a page an earlier one read."""

    prefills: tuple[Sequence, ...]
    decodes: tuple[Sequence, ...]
    block_tables: dict[str, list[int]]
    swaps: tuple[SwapOp, ...] = ()

    @property
    def sequences(self) -> tuple[Sequence, ...]:
        return self.prefills + self.decodes

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


class EngineScheduler:
    def __init__(self, blocks: BlockManager, host_blocks: BlockManager | None,
                 max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = blocks  # device pages
        self.host_blocks = host_blocks  # host swap pages; None: preemption always recomputes
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first: preemption takes from the end
        self.swapped: deque[Sequence] = deque()
        self.num_preemptions = 0
        self._swaps: list[SwapOp] = []
        self._victims: list[Sequence] = []  # running, not named this step

    # -- the queues -------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def place(self, seq: Sequence, status: SeqStatus) -> None:
        """Queue a sequence whose pages (device, host, or none) the caller already set up."""
        seq.status = status
        if status is SeqStatus.RUNNING:
            self.running.append(seq)
        elif status is SeqStatus.SWAPPED:
            self.swapped.append(seq)
        else:  # recomputed before newer prompts, as after a preemption
            self.waiting.appendleft(seq)

    def get(self, seq_id: str) -> Sequence | None:
        for seq in (*self.running, *self.swapped, *self.waiting):
            if seq.seq_id == seq_id:
                return seq
        return None

    def take(self, seq_id: str) -> Sequence | None:
        """Remove the sequence from whichever queue holds it; its pages stay."""
        seq = self.get(seq_id)
        if seq is not None:
            self._queue_of(seq).remove(seq)
        return seq

    def finish(self, seq: Sequence) -> None:
        """The sequence leaves (finished, aborted or exported): its pages are freed."""
        queue = self._queue_of(seq)
        if seq in queue:
            queue.remove(seq)
        self.blocks.free(seq.seq_id)
        if self.host_blocks is not None:
            self.host_blocks.free(seq.seq_id)
        seq.status = SeqStatus.FINISHED

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def _queue_of(self, seq: Sequence):
        return {SeqStatus.RUNNING: self.running, SeqStatus.SWAPPED: self.swapped}.get(
            seq.status, self.waiting)

    # -- the step ---------------------------------------------------------------------------

    def schedule(self, request_ids: Collection[str] | None = None) -> StepBatch:
        """The next step's batch: the named sequences (None: all) that can run."""
        wanted = None if request_ids is None else set(request_ids)
        named: Callable[[Sequence], bool] = \
            (lambda s: True) if wanted is None else (lambda s: s.seq_id in wanted)
        self._swaps = []
        self._victims = [s for s in self.running if not named(s)]
        self._swap_in(named)
        decodes = self._reserve_decodes([s for s in self.running if named(s)])
        # Swapped-out sequences come back before new prompts start, so none starves.
        prefills = [] if any(named(s) for s in self.swapped) else \
            self._admit(named, len(decodes))
        self.running += prefills
        tables = {s.seq_id: self.blocks.block_table(s.seq_id) for s in prefills + decodes}
        return StepBatch(tuple(prefills), tuple(decodes), tables, tuple(self._swaps))

    def _swap_in(self, named: Callable[[Sequence], bool]) -> None:
        """Bring named swapped sequences back, oldest first, while slots and pages (with one
        to grow) allow."""
        slots = self.max_num_seqs - sum(1 for s in self.running if named(s))
        for seq in [s for s in self.swapped if named(s)]:
            need = len(self.host_blocks.block_table(seq.seq_id)) + 1
            if slots <= 0 or not self._make_room(need):
                break
            self.swapped.remove(seq)
            self._swaps.append(move_pages(seq.seq_id, self.host_blocks, self.blocks, False))
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            slots -= 1

    def _reserve_decodes(self, pending: list[Sequence]) -> list[Sequence]:
        """Give each sequence a slot for one more token, preempting unnamed ones, then the
        newest named ones, when pages run short."""
        kept: list[Sequence] = []
        while pending:
            seq = pending.pop(0)
            while not self._can_grow(seq) and (self._victims or pending):
                self._preempt(self._victims.pop() if self._victims else pending.pop())
            if self._can_grow(seq):
                self.blocks.grow(seq.seq_id, seq.num_tokens)
                kept.append(seq)
            else:
                self._preempt(seq)
        return kept

    def _admit(self, named: Callable[[Sequence], bool], num_decodes: int) -> list[Sequence]:
        """Named waiting sequences, oldest first, as prompts within the step's budgets."""
        budget = self.max_num_batched_tokens - num_decodes
        admitted: list[Sequence] = []
        for seq in [s for s in self.waiting if named(s)]:
            if num_decodes + len(admitted) >= self.max_num_seqs:
                break
            # A prompt longer than the budget still runs, alone, so nothing waits forever.
            if seq.num_tokens > budget and (admitted or num_decodes):
                break
            if not self._make_room(self.blocks.pages_to_grow(seq.seq_id, seq.num_tokens)):
                break
            self.waiting.remove(seq)
            self.blocks.grow(seq.seq_id, seq.num_tokens)
            seq.status = SeqStatus.RUNNING
            admitted.append(seq)
            budget -= seq.num_tokens
        return admitted

    def _can_grow(self, seq: Sequence) -> bool:
        return self.blocks.can_grow(seq.seq_id, seq.num_tokens)

    def _make_room(self, pages: int) -> bool:
        """Preempt unnamed running sequences, newest first, until `pages` are free; none
        when all of theirs would still be too few."""
        held = sum(len(self.blocks.block_table(s.seq_id)) for s in self._victims)
        if self.blocks.num_free + held < pages:
            return False
        while self.blocks.num_free < pages and self._victims:
            self._preempt(self._victims.pop())
        return self.blocks.num_free >= pages

    def _preempt(self, seq: Sequence) -> None:
        """Swap the sequence's KV out to the host if there is room, else recompute it later."""
        self.num_preemptions += 1
        seq.num_preemptions += 1
        self.running.remove(seq)
        if self._can_swap_out(seq):
            self._swap_out(seq)
        else:
            self.blocks.free(seq.seq_id)
            seq.status = SeqStatus.WAITING
            self.waiting.appendleft(seq)

    # -- swapping at a turn's end -----------------------------------------------------------

    def swap_out(self, request_ids: Collection[str] | None = None) -> list[SwapOp]:
        """Move running sequences (all by default) to host pages, as far as they have room;
        the copies are the caller's to make, in order."""
        wanted = None if request_ids is None else set(request_ids)
        self._swaps = []
        for seq in list(self.running):
            if (wanted is None or seq.seq_id in wanted) and self._can_swap_out(seq):
                self.running.remove(seq)
                self._swap_out(seq)
        return self._swaps

    def _can_swap_out(self, seq: Sequence) -> bool:
        return self.host_blocks is not None and \
            len(self.blocks.block_table(seq.seq_id)) <= self.host_blocks.num_free

    def _swap_out(self, seq: Sequence) -> None:
        self._swaps.append(move_pages(seq.seq_id, self.blocks, self.host_blocks, True))
        seq.status = SeqStatus.SWAPPED
        self.swapped.appendleft(seq)
