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

Prompts are computed from `num_computed` on: a prompt admitted with cached prefix pages
(`PrefixPages`) starts past them. With chunked prefill (`chunk_tokens`: the most one prompt
computes in a step; 0: unchunked) the step's token budget is shared:
decodes first, one token each, then prompts already started, then new ones, each computing
as many tokens as the budget has left; a prompt samples its first token in the step that
computes its last.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection

from tokenpool.gpu_pool.prefix_pages import PrefixPages
from tokenpool.gpu_pool.sequence import Sequence, SeqStatus
from tokenpool.gpu_pool.step_batch import StepBatch, SwapOp, move_pages
from tokenpool.memory.block_manager import BlockManager

__all__ = ["EngineScheduler", "StepBatch", "SwapOp", "move_pages"]

# (seq, start, count): a prompt computing `count` tokens from `start` this step
Chunk = tuple[Sequence, int, int]


class EngineScheduler:
    def __init__(self, blocks: BlockManager, host_blocks: BlockManager | None,
                 max_num_seqs: int, max_num_batched_tokens: int,
                 prefix: PrefixPages | None = None, chunk_tokens: int = 0):
        self.blocks = blocks  # device pages
        self.host_blocks = host_blocks  # host swap pages; None: preemption always recomputes
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefix = prefix  # None: no prefix caching
        self.chunk_tokens = chunk_tokens
        self.chunked = chunk_tokens > 0
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
        """Queue a sequence whose pages (device, host, or none) the caller already set up:
        running or swapped ones hold the KV of every token but the last."""
        seq.status = status
        seq.num_computed = 0 if status is SeqStatus.WAITING else seq.num_tokens - 1
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
        self._free_device(seq)
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
        mine = [s for s in self.running if named(s)]
        decodes = self._reserve_decodes([s for s in mine if s.pending == 1])
        budget = self.max_num_batched_tokens - len(decodes)
        chunks = self._continue_prompts([s for s in mine if s.pending > 1], budget)
        # Swapped-out sequences come back before new prompts start, so none starves.
        if not any(named(s) for s in self.swapped):
            budget -= sum(n for _, _, n in chunks)
            chunks += self._admit(named, len(decodes) + len(chunks), budget)
        prefills = tuple(seq for seq, _, _ in chunks)
        tables = {s.seq_id: self.blocks.block_table(s.seq_id) for s in prefills + tuple(decodes)}
        return StepBatch(prefills, tuple(decodes), tables, tuple(self._swaps),
                         tuple((start, n) for _, start, n in chunks))

    def computed(self, batch: StepBatch) -> None:
        """The batch ran: its sequences' KV is written up to where each computed, and full
        pages are named in the prefix cache. Called before sampled tokens are appended."""
        for i, seq in enumerate(batch.prefills):
            start, n = batch.chunk(i)
            seq.num_computed = start + n
        for seq in batch.decodes:
            seq.num_computed = seq.num_tokens
        if self.prefix is not None:
            for seq in batch.prefills + batch.decodes:
                self.prefix.name_computed(seq, batch.block_tables[seq.seq_id])

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

    def _continue_prompts(self, prompts: list[Sequence], budget: int) -> list[Chunk]:
        """The next chunk of each prompt started in an earlier step, oldest first."""
        chunks: list[Chunk] = []
        for seq in prompts:
            n = min(seq.pending, budget, self.chunk_tokens) if self.chunked else seq.pending
            if n < 1 or not self._make_room(
                    self.blocks.pages_to_grow(seq.seq_id, seq.num_computed + n)):
                break
            self.blocks.grow(seq.seq_id, seq.num_computed + n)
            chunks.append((seq, seq.num_computed, n))
            budget -= n
        return chunks

    def _admit(self, named: Callable[[Sequence], bool], num_running: int,
               budget: int) -> list[Chunk]:
        """Named waiting sequences, oldest first, as prompts within the step's budgets."""
        admitted: list[Chunk] = []
        for seq in [s for s in self.waiting if named(s)]:
            if num_running + len(admitted) >= self.max_num_seqs:
                break
            cached = self._hold_cached_prefix(seq)
            n = seq.num_tokens - seq.num_computed
            if self.chunked:
                n = min(n, budget, self.chunk_tokens)
            # Unchunked, a prompt longer than the budget still runs, alone, so nothing waits
            # forever.
            fits = n >= 1 and (n <= budget or not (admitted or num_running))
            if not fits or not self._make_room(
                    self.blocks.pages_to_grow(seq.seq_id, seq.num_computed + n)):
                self._release_cached_prefix(seq, cached)
                break
            self.waiting.remove(seq)
            self.blocks.grow(seq.seq_id, seq.num_computed + n)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            admitted.append((seq, seq.num_computed, n))
            budget -= n
        return admitted

    def _hold_cached_prefix(self, seq: Sequence) -> int:
        """Give a waiting `seq` its cached prefix pages (held, so room-making cannot evict
        them) and start it past them; how many pages."""
        if self.prefix is None:
            return 0
        pages = self.prefix.reusable(seq)
        if pages:
            self.blocks.adopt(seq.seq_id, self.prefix.acquire(seq, pages))
        seq.num_computed, seq.num_named = pages * self.blocks.block_size, pages
        if not seq.output_ids:
            seq.num_cached = seq.num_computed
        return pages

    def _release_cached_prefix(self, seq: Sequence, pages: int) -> None:
        if pages:
            self.blocks.free(seq.seq_id)
        seq.num_computed = seq.num_named = 0

    def _can_grow(self, seq: Sequence) -> bool:
        return self.blocks.can_grow(seq.seq_id, seq.num_tokens)

    def _make_room(self, pages: int) -> bool:
        """Preempt unnamed running sequences, newest first, until `pages` are free; none
        when all of theirs would still be too few."""
        held = self.blocks.releasable([s.seq_id for s in self._victims])
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
            self._free_device(seq)
            seq.status = SeqStatus.WAITING
            self.waiting.appendleft(seq)

    def _free_device(self, seq: Sequence) -> None:
        """Let go of `seq`'s device pages (named ones stay cached); it computes from 0 again."""
        self.blocks.free(seq.seq_id)
        seq.num_computed = seq.num_named = 0

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
        seq.num_named = 0  # it comes back in private copies of its pages
        seq.status = SeqStatus.SWAPPED
        self.swapped.appendleft(seq)
