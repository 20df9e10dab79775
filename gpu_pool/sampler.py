"""Turns a step's logits into tokens, one row per sequence, each with its own parameters.

Every random row draws its uniform number from the request's own generator, and every other
operation is row-wise. A seeded request therefore gets the same tokens whatever else shares
its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tokenpool.sampling import SamplingParams


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the N most likely (token id, logprob), best first


@dataclass(slots=True)
class SampleRow:
    params: SamplingParams
    generator: torch.Generator | None  # None for greedy rows


TOP_P_CANDIDATES = 1024  # tokens ordered for top-p before falling back to a full sort

def sample(logits: torch.Tensor, rows: list[SampleRow]) -> tuple[list[int], list]:
    """logits: [B, V] float32. Returns token ids and per-row TokenLogprobs (or None)."""
    tokens = logits.argmax(dim=-1)
    random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
    if random_rows:
        idx = torch.tensor(random_rows, device=logits.device)
        drawn = _sample_random(_rows_of(logits, random_rows), [rows[i] for i in random_rows])
        tokens = tokens.index_copy(0, idx, drawn)
    token_list = tokens.tolist()
    return token_list, _logprobs(logits, token_list, rows)


def _sample_random(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    device = logits.device
    temps = torch.tensor([r.params.temperature for r in rows], device=device)
    logits = _divided(logits, temps)
    top_ks = [r.params.top_k for r in rows]
    if any(k > 0 for k in top_ks):
        logits = _apply_top_k(logits, top_ks)
    probs = logits.softmax(dim=-1)
    top_ps = torch.tensor([r.params.top_p for r in rows], device=device)
    if bool((top_ps < 1.0).any()):
        probs = _apply_top_p(probs, top_ps)
    uniform = torch.cat([torch.rand(1, generator=r.generator) for r in rows]).to(device)
    cdf = probs.cumsum(dim=-1)
    # Scaling u by the row total keeps the draw exact after masking without renormalising.
    target = uniform * cdf[:, -1]
    picked = torch.searchsorted(cdf, target.unsqueeze(1)).squeeze(1)
    return picked.clamp_(max=logits.shape[-1] - 1)


def _apply_top_k(logits: torch.Tensor, top_ks: list[int]) -> torch.Tensor:
    vocab = logits.shape[-1]
    ks = [k if 0 < k < vocab else vocab for k in top_ks]
    kth = logits.topk(max(ks), dim=-1).values  # [B, max_k], sorted descending
    index = torch.tensor([k - 1 for k in ks], device=logits.device).unsqueeze(1)
    threshold = kth.gather(1, index)
    return _filled(logits, logits >= threshold, float("-inf"))


def _apply_top_p(probs: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    """Keep the smallest prefix (by probability) whose mass reaches top_p; the first token
    always stays.

    Only the TOP_P_CANDIDATES most likely tokens are ordered when they hold top_p of the mass
    (with a margin for rounding), which is what a nucleus almost always is: every token
    beyond them would be dropped anyway, and a full sort of the vocabulary is far slower
    (docs/bench/families-2026-12-06). Otherwise every token is sorted.
    """
    k = min(TOP_P_CANDIDATES, probs.shape[-1])
    sorted_probs, order = probs.topk(k, dim=-1)  # sorted, descending
    if bool((sorted_probs.sum(dim=-1) < top_ps + 1e-4).any()):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    kept_sorted = mass_before < top_ps.unsqueeze(1)
    if probs.device.type == "cpu":
        kept = np.zeros(probs.shape, dtype=bool)
        np.put_along_axis(kept, order.numpy(), kept_sorted.numpy(), axis=1)
        return _filled(probs, torch.from_numpy(kept), 0.0)
    kept = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, order, kept_sorted)
    return _filled(probs, kept, 0.0)


# Vocabulary-wide elementwise work goes through numpy on CPU, on the calling thread: torch's
# multi-threaded kernels are much slower right after the lm_head's OpenBLAS gemv, whose
# threads still spin (docs/bench/families-2026-12-06). Division and selection are exact, so
# the results are the same bits.

def _rows_of(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    if len(rows) == x.shape[0]:
        return x
    if x.device.type == "cpu":
        return torch.from_numpy(x.numpy()[rows])
    return x.index_select(0, torch.tensor(rows, device=x.device))


def _divided(x: torch.Tensor, by: torch.Tensor) -> torch.Tensor:
    """Each row of x divided by its entry of `by`."""
    if x.device.type == "cpu":
        return torch.from_numpy(x.numpy() / by.numpy()[:, None])
    return x / by.unsqueeze(1)


def _filled(x: torch.Tensor, keep: torch.Tensor, fill: float) -> torch.Tensor:
    """x where `keep`, else `fill`."""
    if x.device.type == "cpu":
        out = x.numpy().copy()
        out[~keep.numpy()] = fill
        return torch.from_numpy(out)
    return x.masked_fill(~keep, fill)


def _logprobs(logits: torch.Tensor, tokens: list[int], rows: list[SampleRow]) -> list:
    wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    out: list = [None] * len(rows)
    if not wanted:
        return out
    logp = _rows_of(logits, wanted).log_softmax(dim=-1)
    max_n = max(rows[i].params.logprobs for i in wanted)
    top_vals, top_ids = logp.topk(max(max_n, 1), dim=-1)
    chosen = logp.gather(1, torch.tensor([[tokens[i]] for i in wanted], device=logits.device))
    for j, i in enumerate(wanted):
        n = rows[i].params.logprobs
        top = tuple(zip(top_ids[j, :n].tolist(), top_vals[j, :n].tolist()))
        out[i] = TokenLogprobs(tokens[i], float(chosen[j, 0]), top)
    return out
