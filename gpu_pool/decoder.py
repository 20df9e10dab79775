"""The decoder of every family as plain functions over a weights container.

There are no nn.Modules on purpose: the weights are tensors held in `DecoderWeights`, so a
model switch rebinds views (DESIGN §4) and a forward pass is one loop with no module dispatch
cost. What families differ in is data on `ModelConfig` (models/families.py): a layer's
optional tensors are None where its family has none. Attention reads and writes the paged KV
cache through `AttentionMetadata`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tokenpool.gpu_pool.attention import AttentionMetadata, LayerAttention, paged_attention
from tokenpool.gpu_pool.kv_cache import PagedKVCache
from tokenpool.gpu_pool.rotary import RotaryTable, apply_rope
from tokenpool.gpu_pool.weight_ops import embed, per_expert, project
from tokenpool.models.config import ModelConfig

ACTIVATION_FNS = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


# A weight is a dense tensor, or, where the model is held quantized, a QuantizedTensor or
# RowParts (models/quantized.py); weight_ops reads each kind. Norms and biases are dense.
@dataclass(slots=True)
class LayerWeights:
    attn_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [(H + 2*KVH) * D, hidden], q, k and v fused so one GEMM serves all
    o: torch.Tensor  # [hidden, H * D]
    mlp_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor | None = None  # [2 * ffn, hidden]; None in a mixture-of-experts layer
    down: torch.Tensor | None = None  # [hidden, ffn]
    router: torch.Tensor | None = None  # [experts, hidden]
    experts_gate_up: torch.Tensor | None = None  # [experts * 2 * moe_ffn, hidden]
    experts_down: torch.Tensor | None = None  # [experts * hidden, moe_ffn]
    qkv_bias: torch.Tensor | None = None  # Qwen2
    q_norm: torch.Tensor | None = None  # [D], Qwen3 and Gemma 3
    k_norm: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    attn_out_norm: torch.Tensor | None = None  # Gemma's norms after attention and MLP
    mlp_out_norm: torch.Tensor | None = None


@dataclass(slots=True)
class DecoderWeights:
    embed: torch.Tensor  # [vocab, hidden]
    layers: list[LayerWeights]
    norm: torch.Tensor  # [hidden]
    lm_head: torch.Tensor  # [vocab, hidden]; the same tensor as `embed` when tied


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             gemma: bool = False) -> torch.Tensor:
    """HF's RMSNorm step for step: normalise in float32; Llama scales in the model dtype,
    Gemma by (1 + w) in float32 before casting.

    Written out rather than F.rms_norm: it is the reference's exact arithmetic, and on CPU
    these few ops are faster than the fused op for decode-sized inputs (~70 us per call).
    """
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        return (h * (1.0 + weight.float())).to(x.dtype)
    return weight * h.to(x.dtype)


def cap_logits(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma's final soft-capping, tanh(logits / cap) * cap, in place on float32 logits.

    On CPU numpy does it on this thread: torch's multi-threaded tanh over a vocabulary is much
    slower right after cpu_ops' OpenBLAS gemv made the logits, while its threads still spin
    (docs/bench/families-2026-12-06).
    """
    if cap is None:
        return logits
    if logits.device.type != "cpu":
        return torch.tanh(logits / cap) * cap
    values = logits.numpy()
    np.tanh(values / cap, out=values)
    values *= cap
    return logits


class DecoderForward:
    """Runs the decoder for one flattened, unpadded batch of tokens."""

    def __init__(self, cfg: ModelConfig, rope: RotaryTable, local_rope: RotaryTable | None = None,
                 scratch: torch.Tensor | None = None,
                 quant_scratch: torch.Tensor | None = None):
        self.cfg = cfg
        # Views into a worker's weight slot, rebound on every model switch (None: not loaded).
        self.weights: DecoderWeights | None = None
        self.ropes = {False: rope, True: local_rope or rope}  # keyed by "layer is sliding"
        self.attention = [LayerAttention(cfg.attn_scale, cfg.window_of(i),
                                         cfg.attn_logit_softcapping)
                          for i in range(cfg.num_hidden_layers)]
        self.act = ACTIVATION_FNS[cfg.hidden_act]
        self.q_size = cfg.num_attention_heads * cfg.head_dim
        self.scratch = scratch  # cpu_ops.upcast_scratch: bf16 on CPUs without bf16 GEMMs
        self.quant_scratch = quant_scratch  # float32, for quantized weights at batch sizes
        self.dtype = rope.dtype

    @property
    def rope_needs_lengths(self) -> bool:
        return any(table.length_dependent for table in self.ropes.values())

    @torch.inference_mode()
    def __call__(self, token_ids: torch.Tensor, positions: torch.Tensor,
                 meta: AttentionMetadata, kv: PagedKVCache,
                 rope_lens: torch.Tensor | None = None) -> torch.Tensor:
        """token_ids, positions: [N]; rope_lens: [N] each token's sequence length (dynamic
        RoPE and LongRoPE only). Returns final hidden states at `meta.logits_rows`."""
        cfg, w = self.cfg, self.weights
        x = embed(w.embed, token_ids, self.dtype)  # [N, hidden]
        if cfg.gemma_norms:
            x = x * torch.tensor(cfg.hidden_size ** 0.5, dtype=x.dtype)
        ropes = {False: self.ropes[False].lookup(positions, rope_lens)}
        ropes[True] = ropes[False] if self.ropes[True] is self.ropes[False] \
            else self.ropes[True].lookup(positions, rope_lens)
        for i, lw in enumerate(w.layers):
            h = self._norm(x, lw.attn_norm)
            attn = self._attention(h, ropes[cfg.is_sliding(i)], lw, meta, kv, i)
            x = x + self._norm_out(self._linear(attn, lw.o, lw.o_bias), lw.attn_out_norm)
            h = self._norm(x, lw.mlp_norm)
            mlp = self._mlp(h, lw.gate_up, lw.down) if lw.router is None else self._experts(h, lw)
            x = x + self._norm_out(mlp, lw.mlp_out_norm)
        x = x[meta.logits_rows]
        return self._norm(x, w.norm)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # Contiguous for the sampler: row-wise argmax/softmax on a transposed GEMM result is
        # several times slower than the copy.
        logits = self._linear(hidden, self.weights.lm_head).float().contiguous()
        return cap_logits(logits, self.cfg.final_logit_softcapping)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, weight, self.cfg.rms_norm_eps, self.cfg.gemma_norms)

    def _norm_out(self, x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        return x if weight is None else self._norm(x, weight)

    def _linear(self, x: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        out = project(x, weight, self.scratch, self.quant_scratch)
        return out if bias is None else out + bias

    def _mlp(self, h: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        gate, up = self._linear(h, gate_up).chunk(2, dim=-1)
        return self._linear(self.act(gate) * up, down)

    def _experts(self, h: torch.Tensor, lw: LayerWeights) -> torch.Tensor:
        """Each token's top-k experts, weighted by the router, as transformers routes them:
        softmax in float32, top-k (renormalised if the config says so), experts in order."""
        cfg = self.cfg
        probs = torch.softmax(self._linear(h, lw.router), dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(probs, cfg.num_experts_per_tok, dim=-1)
        if cfg.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(h.dtype)
        gate_up = per_expert(lw.experts_gate_up, cfg.num_experts)
        down = per_expert(lw.experts_down, cfg.num_experts)
        out = torch.zeros_like(h)
        for expert in chosen.unique().tolist():
            tokens, slot = torch.where(chosen == expert)
            y = self._mlp(h[tokens], gate_up[expert], down[expert])
            out.index_add_(0, tokens, y * weights[tokens, slot, None])
        return out

    def _attention(self, h, rope, lw: LayerWeights, meta, kv, layer_idx) -> torch.Tensor:
        cfg = self.cfg
        n = h.shape[0]
        heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        # reshape, not view: on CPU the projection may come back transposed (cpu_ops.linear)
        qkv = self._linear(h, lw.qkv, lw.qkv_bias).reshape(n, heads + 2 * kv_heads, cfg.head_dim)
        if lw.q_norm is None:
            qk = apply_rope(qkv[:, : heads + kv_heads], *rope)  # q and k rotated in one pass
            q, k = qk[:, :heads], qk[:, heads:]
        else:
            q = apply_rope(self._norm(qkv[:, :heads], lw.q_norm), *rope)
            k = apply_rope(self._norm(qkv[:, heads: heads + kv_heads], lw.k_norm), *rope)
        v = qkv[:, heads + kv_heads:]
        kv.write(layer_idx, k, v, meta.write_index)
        out = paged_attention(q, k, v, kv, layer_idx, meta, self.attention[layer_idx])
        return out.reshape(n, self.q_size)
