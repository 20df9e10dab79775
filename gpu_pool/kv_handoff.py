"""A request moved between workers with its KV: prefill on one worker, decode on another.

`SequenceHandoff` is what crosses the boundary (a Ray actor's object store, or a thread's
queue): plain values plus the KV of the sequence's pages as one contiguous uint8 array of
`[num_pages, page_bytes]`. One array, not per-page objects, so it pickles (protocol 5,
out-of-band) as a single buffer and a Ray reader maps it without copying.

The engine side (`LLMEngine.export_sequence` / `import_sequence`) and its scheduler keep the
queues; this module does the copies and the checks. Pages are page-major
(gpu_pool/kv_cache.py), so a page is one run of bytes on both sides and consecutive pages of
a slab move in one copy.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from tokenpool.gpu_pool.kv_cache import PagedKVCache
from tokenpool.gpu_pool.sequence import Sequence, SeqStatus
from tokenpool.memory.block_manager import BlockManager, blocks_needed
from tokenpool.memory.slabs import PageShape
from tokenpool.sampling import SamplingParams

if TYPE_CHECKING:
    from tokenpool.gpu_pool.engine import LLMEngine


class HandoffError(ValueError):
    """A handoff this engine cannot take: another model, another page shape, a duplicate id."""


@dataclass(frozen=True, slots=True, eq=False)  # eq=False: comparing arrays has no one answer
class SequenceHandoff:
    request_id: str
    model: str
    prompt_ids: tuple[int, ...]
    output_ids: tuple[int, ...]
    params: SamplingParams
    generator_state: bytes | None  # torch.Generator.get_state() of a sampled request
    page_shape: PageShape
    dtype: str  # the KV dtype by name: two dtypes of one itemsize share a PageShape
    kv: np.ndarray  # uint8 [num_pages, page_bytes]; no pages: recompute from the tokens

    @property
    def num_pages(self) -> int:
        return int(self.kv.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.kv.nbytes)


def export_from(engine: "LLMEngine", seq: Sequence) -> SequenceHandoff:
    """`seq`'s handoff, from wherever its KV is: device pages, host swap pages, or none
    (a preempted request waiting to be recomputed)."""
    kv, blocks = engine.memory.kv, engine.scheduler.blocks
    swapper = engine.swapper
    if not blocks.has(seq.seq_id):
        swapped = swapper is not None and swapper.host_blocks.has(seq.seq_id)
        kv, blocks = (swapper.host_kv, swapper.host_blocks) if swapped else (kv, None)
    return export_sequence(seq, engine.model_id, engine.dtype_name, kv, blocks)


def import_into(engine: "LLMEngine", handoff: SequenceHandoff) -> None:
    """Make the handoff one of `engine`'s requests, running with its KV in place.

    When device pages (or batch slots) are short, its KV goes to host swap slabs and the
    engine swaps it in like any swapped-out request; with no room there either, it is
    recomputed from its tokens like a preempted one. No request is refused for lack of room.
    """
    check_compatible(handoff, engine.model_id, engine.memory.kv.shape, engine.dtype_name)
    scheduler = engine.scheduler
    if scheduler.get(handoff.request_id) is not None:
        raise HandoffError(f"request {handoff.request_id!r} is already in this engine")
    seq = restore_sequence(handoff, engine._detokenizer(handoff.params))
    swapper = engine.swapper
    has_kv = handoff.num_pages > 0
    if has_kv and len(scheduler.running) < scheduler.max_num_seqs and \
            copy_in(handoff, engine.memory.kv, scheduler.blocks):
        scheduler.place(seq, SeqStatus.RUNNING)
    elif has_kv and swapper is not None and \
            copy_in(handoff, swapper.host_kv, swapper.host_blocks):
        scheduler.place(seq, SeqStatus.SWAPPED)
    else:
        scheduler.place(seq, SeqStatus.WAITING)


def export_sequence(seq: Sequence, model: str, dtype: str, kv: PagedKVCache,
                    blocks: BlockManager | None) -> SequenceHandoff:
    """Copy `seq`'s pages (held in `blocks` over `kv`; None: it has none) to one host array.

    The caller frees the pages afterwards; this only reads them.
    """
    table = list(blocks.block_table(seq.seq_id)) if blocks is not None else []
    host = torch.empty((len(table), kv.shape.page_bytes), dtype=torch.uint8)
    for page, row, count in _runs(table, kv.pages_per_slab):
        host[row: row + count].view(-1).copy_(kv.page_bytes_view(page, count))
    state = None if seq.generator is None else seq.generator.get_state().numpy().tobytes()
    return SequenceHandoff(seq.seq_id, model, tuple(seq.prompt_ids), tuple(seq.output_ids),
                           seq.params, state, kv.shape, dtype, host.numpy())


def check_compatible(handoff: SequenceHandoff, model: str, shape: PageShape,
                     dtype: str) -> None:
    if handoff.model != model:
        raise HandoffError(f"request {handoff.request_id!r} was exported by model "
                           f"{handoff.model!r}; this engine serves {model!r}")
    if handoff.page_shape != shape or handoff.dtype != dtype:
        raise HandoffError(
            f"request {handoff.request_id!r}: its KV pages are {_describe(handoff.page_shape)} "
            f"{handoff.dtype}, but model {model!r} here has {_describe(shape)} {dtype} pages "
            "(the workers disagree about this model's checkpoint or dtype)")
    kv = handoff.kv
    if kv.shape[1:] != (shape.page_bytes,) or kv.dtype != np.uint8 or \
            not kv.flags.c_contiguous:
        raise HandoffError(f"request {handoff.request_id!r}: KV array of {kv.shape} {kv.dtype} "
                           f"is not a contiguous [pages, {shape.page_bytes}] uint8 array")
    # Pages hold the KV of every token but the last (its KV is written by the next step).
    written = len(handoff.prompt_ids) + len(handoff.output_ids) - 1
    if handoff.num_pages and handoff.num_pages < blocks_needed(written, shape.block_size):
        raise HandoffError(f"request {handoff.request_id!r}: {handoff.num_pages} KV pages "
                           f"cannot hold its {written} computed tokens")


def _describe(shape: PageShape) -> str:
    return (f"{shape.num_layers} layers x {shape.num_kv_heads} kv heads x {shape.head_dim} "
            f"head dim")


def restore_sequence(handoff: SequenceHandoff, detokenizer) -> Sequence:
    """The request as an engine holds it, its sampler and detokenizer where they stopped."""
    generator = None
    if handoff.generator_state is not None:
        generator = torch.Generator()
        generator.set_state(torch.frombuffer(bytearray(handoff.generator_state),
                                             dtype=torch.uint8))
    if detokenizer is not None:
        # The exporting worker already streamed this text; replaying only rebuilds the state
        # (held-back partial characters, a partly matched stop string).
        for token in handoff.output_ids:
            detokenizer.add(token)
    return Sequence(handoff.request_id, list(handoff.prompt_ids), handoff.params, generator,
                    detokenizer, list(handoff.output_ids))


def copy_in(handoff: SequenceHandoff, kv: PagedKVCache, blocks: BlockManager) -> bool:
    """Give the request pages in `blocks` and copy its KV into them; False if too few free."""
    n = handoff.num_pages
    seq_id = handoff.request_id
    if not blocks.can_grow(seq_id, n * blocks.block_size):
        return False
    table = blocks.grow(seq_id, n * blocks.block_size)
    source = _as_tensor(handoff.kv)
    for page, row, count in _runs(table, kv.pages_per_slab):
        kv.page_bytes_view(page, count).copy_(source[row: row + count].view(-1))
    return True


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    """A view of the array; read-only when it comes straight from Ray's object store."""
    with warnings.catch_warnings():
        # torch warns that a read-only buffer must not be written through; it is only read.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _runs(table: list[int], pages_per_slab: int) -> list[tuple[int, int, int]]:
    """(first page, its row in the table, count): consecutive pages that share a slab."""
    runs: list[tuple[int, int, int]] = []
    for row, page in enumerate(table):
        if runs:
            start, first_row, count = runs[-1]
            if page == start + count and page % pages_per_slab:
                runs[-1] = (start, first_row, count + 1)
                continue
        runs.append((page, row, 1))
    return runs
