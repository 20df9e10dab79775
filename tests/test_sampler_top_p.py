"""Top-p over the most likely candidates keeps exactly what a full sort of the vocabulary keeps."""

from __future__ import annotations

import pytest
import torch

from tokenpool.gpu_pool import sampler


def full_sort_top_p(probs: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    """The definition: sort everything, keep the prefix whose mass before it is < top_p."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop = torch.zeros_like(probs, dtype=torch.bool).scatter_(
        1, order, mass_before >= top_ps.unsqueeze(1))
    return probs.masked_fill(drop, 0.0)


@pytest.mark.parametrize("temperature", [0.05, 0.3, 1.0, 5.0, 50.0])
@pytest.mark.parametrize("top_p", [1e-6, 0.5, 0.9, 0.999])
def test_candidates_or_full_sort_keep_the_same_tokens(temperature, top_p):
    g = torch.Generator().manual_seed(int(temperature * 100 + top_p * 1000))
    logits = torch.randn(3, 49152, generator=g) * 4
    probs = (logits / temperature).softmax(dim=-1)  # peaked (candidates) to flat (full sort)
    top_ps = torch.tensor([top_p, 0.95, top_p])
    got = sampler._apply_top_p(probs, top_ps)
    want = full_sort_top_p(probs, top_ps)
    assert torch.equal(got != 0, want != 0)
    assert torch.equal(got, want)


def test_a_flat_row_beside_peaked_ones_changes_nothing_for_them():
    g = torch.Generator().manual_seed(7)
    peaked = (torch.randn(2, 4096, generator=g) * 20).softmax(dim=-1)
    flat = torch.full((1, 4096), 1 / 4096)
    top_ps = torch.tensor([0.9, 0.9])
    alone = sampler._apply_top_p(peaked, top_ps)
    mixed = sampler._apply_top_p(torch.cat([peaked, flat]), torch.tensor([0.9, 0.9, 0.9]))
    assert torch.equal(mixed[:2], alone)
    assert int((mixed[2] != 0).sum()) == pytest.approx(0.9 * 4096, abs=2)
