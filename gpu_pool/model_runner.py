"""Executes one engine step on the device: build the flattened batch, run, sample."""

from __future__ import annotations

import dataclasses

import torch

from tokenpool.gpu_pool.attention import AttentionMetadata
from tokenpool.gpu_pool.engine_scheduler import StepBatch
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
        logits = self.logits(batch)
        rows = [SampleRow(s.params, s.generator) for s in batch.sequences]
        return sample(logits, rows)

    def logits(self, batch: StepBatch, every_position: bool = False) -> torch.Tensor:
        """[num_seqs, vocab] float32 logits of each sequence's next token; with
        `every_position` (a batch of prefills), [tokens, vocab]: after every prompt token."""
        token_ids, positions, meta = self._prepare(batch)
        if every_position:
            meta = dataclasses.replace(meta, logits_rows=self._tensor(range(len(token_ids))))
        rope_lens = self._rope_lens(batch) if self.forward.rope_needs_lengths else None
        hidden = self.forward(token_ids, positions, meta, self.kv, rope_lens)
        return self.forward.logits(hidden)

    def _prepare(self, batch: StepBatch):
        bs = self.kv.block_size
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_rows: list[int] = []
        for seq in batch.prefills:
            ids = seq.all_ids()
            table = batch.block_tables[seq.seq_id]
            tokens += ids
            positions += range(len(ids))
            slots += [table[p // bs] * bs + p % bs for p in range(len(ids))]
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
            prefill_lens=[s.num_tokens for s in batch.prefills],
            num_decodes=len(batch.decodes),
            decode_tables=tables,
            decode_lens=lens,
            decode_mask=mask,
            logits_rows=self._tensor(logits_rows),
            decode_kernel=self.decode_kernel,
        )
        return self._tensor(tokens), self._tensor(positions), meta

    def _rope_lens(self, batch: StepBatch) -> torch.Tensor:
        """Each token's sequence length as of this step, which dynamic RoPE scales by: a whole
        prompt's for its prefill, as transformers does."""
        lens = [n for s in batch.prefills for n in [s.num_tokens] * s.num_tokens]
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
