"""Predicted durations of work units: the cost model of DESIGN §3.4.

Prefill of a batch of prompts takes `a + b*t + c*s` seconds (t = total prompt tokens, s = sum
of squared prompt lengths: attention is quadratic in each prompt); tokens a prefix cache
holds are not computed. One decode step of a batch takes `a + b*batch + c*total_context`.
Switching a model in is one copy of its weights over the host-to-device link; swapping KV out
or in is a copy of its bytes over the same link.

Pure arithmetic, no I/O: the coefficients are fitted elsewhere (`tokenpool.controller.cost_fit`)
and handed in. The simulator calls these millions of times, so every method is a dict lookup
and a few multiplications.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

# A decode step is never free: a batch whose fit extrapolates to ~0 (or below) would let a
# simulated turn run unbounded steps in zero time.
MIN_STEP_S = 1e-4


@dataclass(frozen=True, slots=True)
class Linear3:
    """`a + b*x + c*y`."""

    a: float
    b: float
    c: float

    def __call__(self, x: float, y: float) -> float:
        return self.a + self.b * x + self.c * y


@dataclass(frozen=True, slots=True)
class ModelCost:
    prefill: Linear3  # seconds from (total prompt tokens, sum of squared prompt lengths)
    decode: Linear3  # seconds per step from (batch size, total context tokens of the batch)
    weight_bytes: int
    kv_bytes_per_token: int

    def __post_init__(self):
        if self.weight_bytes < 0 or self.kv_bytes_per_token < 1:
            raise ValueError(f"need weight_bytes >= 0 and kv_bytes_per_token >= 1, got "
                             f"{self.weight_bytes}, {self.kv_bytes_per_token}")


@dataclass(frozen=True, slots=True)
class CostModel:
    models: dict[str, ModelCost]  # every model name a caller may ask about, aliases included
    h2d_bytes_per_s: float  # effective host-to-device bandwidth (efficiency already applied)
    kv_capacity_bytes: int  # one device's KV region, shared by whichever models it serves
    # Fixed seconds added to every switch beyond the weight copy (`scheduler.switch_overhead_s`:
    # job dispatch, KV swaps), planned by every policy. Not the baselines' engine
    # re-initialisation: that is `Switch.baseline_switch_overhead_s`.
    switch_overhead_s: float = 0.0

    def __post_init__(self):
        if self.switch_overhead_s < 0:
            raise ValueError(f"switch_overhead_s must be >= 0, got {self.switch_overhead_s}")
        if self.h2d_bytes_per_s <= 0 or self.kv_capacity_bytes < 0:
            raise ValueError(f"need h2d_bytes_per_s > 0 and kv_capacity_bytes >= 0, got "
                             f"{self.h2d_bytes_per_s}, {self.kv_capacity_bytes}")

    def slowed(self, factor: float) -> "CostModel":
        """The same devices computing `factor` times slower: every prefill and decode line
        scaled, copies unchanged. A profile taken on an idle machine, set to what its
        workers measured under load (`/pool`'s decode_step_ratio)."""
        if not factor > 0:
            raise ValueError(f"factor must be > 0, got {factor}")
        models = {name: replace(m, prefill=_scaled(m.prefill, factor),
                                decode=_scaled(m.decode, factor))
                  for name, m in self.models.items()}
        return replace(self, models=models)

    def prefill_time(self, model: str, prompt_lens: list[int],
                     cached: tuple[int, ...] | list[int] = ()) -> float:
        """One forward pass over these prompts together (one prompt: a list of one).

        `cached`: the leading tokens of the prompts (in any order: only sums count) whose KV
        a prefix cache holds. Only the rest are computed, but each of them still attends to
        the whole prompt: computing positions k..n of a causal prompt does the attention
        work of n^2 - k^2 of the quadratic term, not (n - k)^2."""
        p = self.models[model].prefill
        t = 0
        s = 0
        for n in prompt_lens:
            t += n
            s += n * n
        for k in cached:
            t -= k
            s -= k * k
        seconds = p.a + p.b * t + p.c * s
        return seconds if seconds > MIN_STEP_S else MIN_STEP_S

    def decode_step_time(self, model: str, batch: int, total_context: int) -> float:
        d = self.models[model].decode
        seconds = d.a + d.b * batch + d.c * total_context
        return seconds if seconds > MIN_STEP_S else MIN_STEP_S  # not max(): a hot path

    def switch_time(self, model: str) -> float:
        """Copy the model's weights in; prefetch hides this when it has time to finish."""
        return self.models[model].weight_bytes / self.h2d_bytes_per_s + self.switch_overhead_s

    def kv_swap_time(self, model: str, tokens: int) -> float:
        """Move `tokens` tokens of this model's KV one way between host and device."""
        return tokens * self.models[model].kv_bytes_per_token / self.h2d_bytes_per_s

    def kv_bytes(self, model: str, tokens: int) -> int:
        return tokens * self.models[model].kv_bytes_per_token

    def kv_capacity_tokens(self, model: str) -> int:
        """Tokens of this model's KV that fit when it has the device's KV region to itself."""
        return self.kv_capacity_bytes // self.models[model].kv_bytes_per_token


def _scaled(line: Linear3, factor: float) -> Linear3:
    return Linear3(line.a * factor, line.b * factor, line.c * factor)
