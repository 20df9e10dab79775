"""cos/sin tables for rotary embeddings, and their application to q and k."""

from __future__ import annotations

import torch

from tokenpool.models.config import ModelConfig
from tokenpool.models.rope import LENGTH_DEPENDENT, RopeSpec, inv_freq


class RotaryTable:
    """cos/sin for every position up to the context length, computed once in float32.

    Computed as HF does (outer product of positions and inverse frequencies, cos/sin in
    float32 scaled by the RoPE's attention factor, cast last) so logits agree with the
    reference to float rounding. `dynamic` RoPE changes its frequencies with the sequence's
    length once that passes `max_position_embeddings`: those rows are computed per call.
    `longrope` switches to its long factors past `original_max_position_embeddings`: a second
    table, made on first need.
    """

    def __init__(self, spec: RopeSpec, head_dim: int, max_position_embeddings: int,
                 max_positions: int, dtype: torch.dtype, device: torch.device | str):
        self.spec = spec
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        self.dtype, self.device = dtype, device
        positions = torch.arange(max_positions, dtype=torch.float32)
        self.cos, self.sin = self._table(positions, None)  # [P, rotary_dim]
        self._long_table = None  # longrope's (cos, sin) past its original context

    @property
    def length_dependent(self) -> bool:
        return self.spec.kind in LENGTH_DEPENDENT

    @property
    def _threshold(self) -> int:
        """Sequences longer than this get other frequencies."""
        if self.spec.kind == "longrope":
            return self.spec.original_max_position_embeddings
        return self.max_position_embeddings

    def _table(self, positions: torch.Tensor, seq_len: int | None):
        freq, scale = inv_freq(self.spec, self.head_dim, self.max_position_embeddings, seq_len)
        freqs = positions[:, None] * freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * scale, emb.sin() * scale
        return cos.to(self.device, self.dtype), sin.to(self.device, self.dtype)

    def lookup(self, positions: torch.Tensor, seq_lens: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin as [N, 1, rotary_dim]: gathered once per forward, shared by every layer.

        `seq_lens` ([N], each token's sequence length) matters only to length-dependent RoPE.
        """
        cos, sin = self.cos[positions], self.sin[positions]
        if self.length_dependent and seq_lens is not None:
            cos, sin = self._long_rows(positions, seq_lens, cos, sin)
        return cos.unsqueeze(1), sin.unsqueeze(1)

    def _long_rows(self, positions, seq_lens, cos, sin):
        long = seq_lens > self._threshold
        if not bool(long.any()):
            return cos, sin
        cos, sin = cos.clone(), sin.clone()
        if self.spec.kind == "longrope":  # one long table, whatever the length
            if self._long_table is None:
                all_positions = torch.arange(self.cos.shape[0], dtype=torch.float32)
                self._long_table = self._table(all_positions, self._threshold + 1)
            rows = long.nonzero().squeeze(1)
            cos[rows], sin[rows] = (t[positions[rows]] for t in self._long_table)
            return cos, sin
        for length in seq_lens[long].unique().tolist():
            rows = (seq_lens == length).nonzero().squeeze(1)
            cos[rows], sin[rows] = self._table(positions[rows].float().cpu(), int(length))
        return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [N, heads, D], rotating the two halves of the first rotary_dim dims as HF does
    (all of them but for partial rotary embeddings, which pass the rest through)."""
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :rot], cos, sin), x[..., rot:]), dim=-1)
    half = rot // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rotary_tables(cfg: ModelConfig, max_positions: int, dtype: torch.dtype,
                  device: torch.device | str) -> tuple[RotaryTable, RotaryTable | None]:
    """The table of full-attention layers, and sliding layers' own where they have one."""
    def table(spec: RopeSpec) -> RotaryTable:
        return RotaryTable(spec, cfg.head_dim, cfg.max_position_embeddings, max_positions,
                           dtype, device)

    return table(cfg.rope), None if cfg.local_rope is None else table(cfg.local_rope)
