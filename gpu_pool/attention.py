"""Attention over a flattened batch: prefill sequences first, then one token per decode.

Prefill attends within the prompt's own fresh K/V (causal SDPA, no page reads). Decode reads
every earlier token through the block tables: on CPU with the fused kernel straight from the
pages; otherwise by gathering pages and masking keys past each context. Nothing is padded to
the longest prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenpool.gpu_pool.kv_cache import PagedKVCache


@dataclass(slots=True)
class AttentionMetadata:
    write_index: tuple  # where each token's K/V is written: PagedKVCache.token_index
    prefill_lens: list[int]  # tokens of each prefill sequence, in batch order
    num_decodes: int
    decode_tables: torch.Tensor | None  # [num_decodes, max_pages] page ids, padded with 0;
    # for the fused kernel, element offsets of those pages instead (PagedKVCache.page_offsets)
    decode_lens: torch.Tensor | None  # [num_decodes] context length including the new token
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, max_pages * BLOCK_SIZE]; gather path
    logits_rows: torch.Tensor  # [num_seqs] rows whose next token is sampled
    decode_kernel: object | None = None  # compiled CPU kernel module, when in use


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: PagedKVCache,
                    layer: int, meta: AttentionMetadata) -> torch.Tensor:
    """q: [N, H, D]; k, v: [N, KVH, D] (already written to the cache). Returns [N, H, D]."""
    if not meta.prefill_lens:
        return _decode(q, kv, layer, meta)
    parts = []
    start = 0
    for n in meta.prefill_lens:
        parts.append(_prefill_one(q[start:start + n], k[start:start + n], v[start:start + n]))
        start += n
    if meta.num_decodes:
        parts.append(_decode(q[start:], kv, layer, meta))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _prefill_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0), is_causal=True, enable_gqa=True,
    )  # [1, H, n, D]
    return out[0].transpose(0, 1)


def _decode(q: torch.Tensor, kv: PagedKVCache, layer: int, meta: AttentionMetadata):
    if meta.decode_kernel is not None:
        return meta.decode_kernel.paged_decode_attention(
            q, kv.base(layer, 0), kv.base(layer, 1), meta.decode_tables, meta.decode_lens,
            q.shape[-1] ** -0.5)
    keys, values = kv.gather(layer, meta.decode_tables)  # [B, T, KVH, D]
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), keys.transpose(1, 2), values.transpose(1, 2),
        attn_mask=meta.decode_mask, enable_gqa=True,
    )  # [B, H, 1, D]
    return out.squeeze(2)
