"""Attention over a flattened batch: prefill sequences first, then one token per decode.

Prefill attends within the prompt's own fresh K/V (causal, no page reads). Decode reads every
earlier token through the block tables: on CPU with the fused kernel straight from the pages;
otherwise by gathering pages and masking keys outside each context. Nothing is padded to the
longest prompt. A layer may see only a sliding window of recent tokens and soft-cap its
scores (`LayerAttention`); both are applied on every path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenpool.gpu_pool.kv_cache import PagedKVCache


@dataclass(frozen=True, slots=True)
class LayerAttention:
    scale: float  # multiplies q.k
    window: int | None = None  # a query sees this many tokens, itself included (None: all)
    softcap: float | None = None  # scores -> tanh(scores / softcap) * softcap


@dataclass(slots=True)
class AttentionMetadata:
    write_index: tuple  # where each token's K/V is written: PagedKVCache.token_index
    prefill_lens: list[int]  # tokens each prefill computes this step, in batch order
    num_decodes: int
    decode_tables: torch.Tensor | None  # [num_decodes, max_pages] page ids, padded with 0;
    # for the fused kernel, element offsets of those pages instead (PagedKVCache.page_offsets)
    decode_lens: torch.Tensor | None  # [num_decodes] context length including the new token
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, max_pages * BLOCK_SIZE]; gather path
    logits_rows: torch.Tensor  # [num_seqs] rows whose next token is sampled
    decode_kernel: object | None = None  # compiled CPU kernel module, when in use
    # Per prefill: the position of its first token this step, and (when that is past 0) its
    # block table, through which its queries also read the keys of the earlier tokens.
    prefill_starts: list[int] | None = None
    prefill_tables: list[torch.Tensor | None] | None = None


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: PagedKVCache,
                    layer: int, meta: AttentionMetadata, spec: LayerAttention) -> torch.Tensor:
    """q: [N, H, D]; k, v: [N, KVH, D] (already written to the cache). Returns [N, H, D]."""
    if not meta.prefill_lens:
        return _decode(q, kv, layer, meta, spec)
    parts = []
    start = 0
    for i, n in enumerate(meta.prefill_lens):
        end = start + n
        table = meta.prefill_tables[i] if meta.prefill_tables else None
        if table is None:
            parts.append(_prefill_one(q[start:end], k[start:end], v[start:end], spec))
        else:
            parts.append(_prefill_past(q[start:end], kv, layer, table,
                                       meta.prefill_starts[i], spec))
        start = end
    if meta.num_decodes:
        parts.append(_decode(q[start:], kv, layer, meta, spec))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _prefill_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 spec: LayerAttention) -> torch.Tensor:
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, heads, n, D]
    n = q.shape[2]
    if (spec.window is None or spec.window >= n) and spec.softcap is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,
                                             scale=spec.scale)
    else:
        pos = torch.arange(n, device=q.device)
        visible = pos[None, :] <= pos[:, None]
        if spec.window is not None:
            visible &= pos[None, :] > pos[:, None] - spec.window
        out = _attend(q, k, v, visible, spec)
    return out[0].transpose(0, 1)


def _prefill_past(q: torch.Tensor, kv: PagedKVCache, layer: int, table: torch.Tensor,
                  start: int, spec: LayerAttention) -> torch.Tensor:
    """Queries of tokens `start..start + n` over the keys of tokens `0..start + n`, read back
    from the pages (this step's own K/V are written there already)."""
    n = q.shape[0]
    context = start + n
    keys, values = kv.gather(layer, table[None, : -(-context // kv.block_size)])
    keys, values = (t[:, :context].transpose(1, 2) for t in (keys, values))  # [1, KVH, T, D]
    pos = torch.arange(context, device=q.device)
    query_pos = pos[start:, None]
    visible = pos[None, :] <= query_pos
    if spec.window is not None:
        visible &= pos[None, :] > query_pos - spec.window
    out = _attend(q.transpose(0, 1).unsqueeze(0), keys, values, visible, spec)
    return out[0].transpose(0, 1)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
            spec: LayerAttention) -> torch.Tensor:
    """Attention written out, for what SDPA cannot do (soft-capping): q [B, H, Q, D],
    k, v [B, KVH, T, D], visible broadcastable to [B, H, Q, T]."""
    if spec.softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=True,
                                              scale=spec.scale)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * spec.scale
    scores = torch.tanh(scores / spec.softcap) * spec.softcap
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


def _decode(q: torch.Tensor, kv: PagedKVCache, layer: int, meta: AttentionMetadata,
            spec: LayerAttention):
    if meta.decode_kernel is not None:
        return meta.decode_kernel.paged_decode_attention(
            q, kv.base(layer, 0), kv.base(layer, 1), meta.decode_tables, meta.decode_lens,
            spec.scale, spec.window or 0, spec.softcap or 0.0)
    keys, values = kv.gather(layer, meta.decode_tables)  # [B, T, KVH, D]
    keys, values = keys.transpose(1, 2), values.transpose(1, 2)
    q = q.unsqueeze(2)  # [B, H, 1, D]
    mask = meta.decode_mask
    if spec.window is not None or spec.softcap is not None:
        pos = torch.arange(keys.shape[2], device=q.device)
        lens = meta.decode_lens[:, None]
        visible = pos[None, :] < lens
        if spec.window is not None:
            visible &= pos[None, :] >= lens - spec.window
        return _attend(q, keys, values, visible[:, None, None, :], spec).squeeze(2)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True,
                                         scale=spec.scale)  # [B, H, 1, D]
    return out.squeeze(2)
