"""Llama-family decoder as plain functions over a weights container.

There are no nn.Modules on purpose: the weights are tensors held in `LlamaWeights`, so a model
switch rebinds views (DESIGN §4) and a forward pass is one loop with no module dispatch cost.
Attention reads and writes the paged KV cache through `AttentionMetadata`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenpool.gpu_pool.attention import AttentionMetadata, paged_attention
from tokenpool.gpu_pool.cpu_ops import linear
from tokenpool.gpu_pool.kv_cache import PagedKVCache
from tokenpool.models.config import ModelConfig


@dataclass(slots=True)
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [(H + 2*KVH) * D, hidden], q, k and v fused so one GEMM serves all
    o: torch.Tensor  # [hidden, H * D]
    post_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [2 * ffn, hidden]
    down: torch.Tensor  # [hidden, ffn]


@dataclass(slots=True)
class LlamaWeights:
    embed: torch.Tensor  # [vocab, hidden]
    layers: list[LayerWeights]
    norm: torch.Tensor  # [hidden]
    lm_head: torch.Tensor  # [vocab, hidden]; the same tensor as `embed` when tied


class RotaryTable:
    """cos/sin for every position up to the context length, computed once in float32.

    Computed exactly as HF does (outer product of positions and inverse frequencies, then
    cos/sin in float32, cast last) so logits agree with the reference to float rounding.
    """

    def __init__(self, head_dim: int, theta: float, max_positions: int, dtype: torch.dtype,
                 device: torch.device | str):
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float()
                                    / head_dim))
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(device=device, dtype=dtype)  # [P, D]
        self.sin = emb.sin().to(device=device, dtype=dtype)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin as [N, 1, D]: gathered once per forward, shared by every layer."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [N, heads, D], rotating the two halves of each head as HF's Llama does."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's LlamaRMSNorm step for step: normalise in float32, scale in the model dtype.

    Written out rather than F.rms_norm: it is the reference's exact arithmetic, and on CPU
    these few ops are faster than the fused op for decode-sized inputs (~70 us per call).
    """
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class LlamaForward:
    """Runs the decoder for one flattened, unpadded batch of tokens."""

    def __init__(self, cfg: ModelConfig, rope: RotaryTable,
                 scratch: torch.Tensor | None = None):
        self.cfg = cfg
        # Views into a worker's weight slot, rebound on every model switch (None: not loaded).
        self.weights: LlamaWeights | None = None
        self.rope = rope
        self.q_size = cfg.num_attention_heads * cfg.head_dim
        self.kv_size = cfg.num_key_value_heads * cfg.head_dim
        self.scratch = scratch  # cpu_ops.upcast_scratch: bf16 on CPUs without bf16 GEMMs

    @torch.inference_mode()
    def __call__(self, token_ids: torch.Tensor, positions: torch.Tensor,
                 meta: AttentionMetadata, kv: PagedKVCache) -> torch.Tensor:
        """token_ids, positions: [N]. Returns final hidden states at `meta.logits_rows`."""
        cfg, w = self.cfg, self.weights
        x = w.embed[token_ids]  # [N, hidden]
        rope = self.rope.lookup(positions)
        for layer_idx, lw in enumerate(w.layers):
            h = rms_norm(x, lw.input_norm, cfg.rms_norm_eps)
            attn = self._attention(h, rope, lw, meta, kv, layer_idx)
            x = x + self._linear(attn, lw.o)
            h = rms_norm(x, lw.post_norm, cfg.rms_norm_eps)
            gate, up = self._linear(h, lw.gate_up).chunk(2, dim=-1)
            x = x + self._linear(F.silu(gate) * up, lw.down)
        x = x[meta.logits_rows]
        return rms_norm(x, w.norm, cfg.rms_norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # Contiguous for the sampler: row-wise argmax/softmax on a transposed GEMM result is
        # several times slower than the copy.
        return self._linear(hidden, self.weights.lm_head).float().contiguous()

    def _linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return linear(x, weight, self.scratch)

    def _attention(self, h, rope, lw: LayerWeights, meta, kv, layer_idx) -> torch.Tensor:
        cfg = self.cfg
        n = h.shape[0]
        heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        # reshape, not view: on CPU the projection may come back transposed (cpu_ops.linear)
        qkv = self._linear(h, lw.qkv).reshape(n, heads + 2 * kv_heads, cfg.head_dim)
        qk = apply_rope(qkv[:, : heads + kv_heads], *rope)  # q and k rotated in one pass
        q, k = qk[:, :heads], qk[:, heads:]
        v = qkv[:, heads + kv_heads:]
        kv.write(layer_idx, k, v, meta.write_index)
        return paged_attention(q, k, v, kv, layer_idx, meta).reshape(n, self.q_size)
