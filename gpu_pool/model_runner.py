"""Executes one engine step on the device: build the flattened batch, run, sample."""

from __future__ import annotations

import dataclasses

import torch

from tokenpool.gpu_pool.attention import AttentionMetadata
from tokenpool.gpu_pool.step_batch import StepBatch
from tokenpool.gpu_pool.kv_cache import PagedKVCache
from tokenpool.gpu_pool.decoder import DecoderForward
from tokenpool.gpu_pool.sampler import SampleRow, sample


class ModelRunner:
    def __init__(self, forward: DecoderForward, kv: PagedKVCache, device: torch.device,
                 decode_kernel=None):
        self.forward = forward
        self.kv = kv
        self.device = device
        self.decode_kernel = decode_kernel  # fused CPU paged attention, or None: gather + SDPA

    def run(self, batch: StepBatch) -> tuple[list[int], list]:
        """Sampled tokens (and logprobs) of the batch's sampling sequences, in order."""
        if not batch.sequences:  # only prompt chunks: the step writes KV, samples nothing
            token_ids, positions, meta = self._prepare(batch)
            self.forward(token_ids, positions, meta, self.kv, self._rope_lens_if_needed(batch))
            return [], []
        logits = self.logits(batch)
        rows = [SampleRow(s.params, s.generator) for s in batch.sequences]
        return sample(logits, rows)

    def logits(self, batch: StepBatch, every_position: bool = False) -> torch.Tensor:
        """[num_seqs, vocab] float32 logits of each sequence's next token; with
        `every_position` (a batch of prefills), [tokens, vocab]: after every prompt token."""
        token_ids, positions, meta = self._prepare(batch)
        if every_position:
            meta = dataclasses.replace(meta, logits_rows=self._tensor(range(len(token_ids))))
        hidden = self.forward(token_ids, positions, meta, self.kv,
                              self._rope_lens_if_needed(batch))
        return self.forward.logits(hidden)

    def _prepare(self, batch: StepBatch):
        bs = self.kv.block_size
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_rows: list[int] = []
        starts: list[int] = []
        for i, seq in enumerate(batch.prefills):
            start, count = batch.chunk(i)
            end = start + count
            table = batch.block_tables[seq.seq_id]
            tokens += seq.all_ids()[start:end]
            positions += range(start, end)
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            starts.append(start)
            if end == seq.num_tokens:
                logits_rows.append(len(tokens) - 1)
        for seq in batch.decodes:
            pos = seq.num_tokens - 1
            tokens.append(seq.last_token)
            positions.append(pos)
            slots.append(batch.block_tables[seq.seq_id][pos // bs] * bs + pos % bs)
            logits_rows.append(len(tokens) - 1)
        tables, lens, mask = self._decode_layout(batch)
        meta = AttentionMetadata(
            write_index=self.kv.token_index(self._tensor(slots)),
            prefill_lens=[batch.chunk(i)[1] for i in range(len(batch.prefills))],
            prefill_starts=starts,
            prefill_tables=self._prefix_tables(batch, starts),
            num_decodes=len(batch.decodes),
            decode_tables=tables,
            decode_lens=lens,
            decode_mask=mask,
            logits_rows=self._tensor(logits_rows),
            decode_kernel=self.decode_kernel,
        )
        return self._tensor(tokens), self._tensor(positions), meta

    def _prefix_tables(self, batch: StepBatch, starts: list[int]) -> list:
        """Block tables of the prefills that start past their first token (a cached prefix
        or an earlier chunk): their queries read the earlier keys from the pages."""
        return [self._tensor(batch.block_tables[s.seq_id]) if start else None
                for s, start in zip(batch.prefills, starts)]

    def _rope_lens_if_needed(self, batch: StepBatch) -> torch.Tensor | None:
        """Each token's sequence length as of this step, which dynamic RoPE scales by: a whole
        prompt's for its prefill, as transformers does (a chunk's: where it ends)."""
        if not self.forward.rope_needs_lengths:
            return None
        lens = []
        for i in range(len(batch.prefills)):
            start, count = batch.chunk(i)
            lens += [start + count] * count
        return self._tensor(lens + [s.num_tokens for s in batch.decodes])

    def _decode_layout(self, batch: StepBatch):
        """Block tables padded to the longest; a key mask only for the gather path."""
        if not batch.decodes:
            return None, None, None
        context = [s.num_tokens for s in batch.decodes]
        width = max(-(-c // self.kv.block_size) for c in context)
        rows = [batch.block_tables[s.seq_id][:width] for s in batch.decodes]
        tables = self._tensor([r + [0] * (width - len(r)) for r in rows])
        lens = self._tensor(context)
        if self.decode_kernel is not None:
            return self.kv.page_offsets(tables), lens, None
        if min(context) == width * self.kv.block_size:
            return tables, lens, None
        keys = torch.arange(width * self.kv.block_size, device=self.device)
        mask = (keys.unsqueeze(0) < lens.unsqueeze(1))[:, None, None, :]
        return tables, lens, mask

    def _tensor(self, values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)
