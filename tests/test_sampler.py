"""The sampler's edge cases: temperatures too small for float32 logits decode greedily."""

from __future__ import annotations

import warnings

import pytest
import torch

from tokenpool.gpu_pool.sampler import SampleRow, sample
from tokenpool.sampling import GREEDY_BELOW, SamplingParams


@pytest.mark.parametrize("temperature", [1e-300, 1e-45, 1e-38, GREEDY_BELOW / 2])
def test_a_vanishing_temperature_takes_the_argmax(temperature):
    """Its limit is the argmax. Before, 1e-40 divided float32 logits to inf (or by a float32
    0): NaN probabilities, and the last token of the vocabulary every time."""
    logits = torch.randn(3, 49152, generator=torch.Generator().manual_seed(0)) * 4
    rows = [SampleRow(SamplingParams(temperature=temperature, seed=i),
                      torch.Generator().manual_seed(i)) for i in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no divide-by-zero or overflow on the way
        tokens, _ = sample(logits.clone(), rows)
    assert tokens == logits.argmax(dim=-1).tolist()


def test_a_small_temperature_above_the_bound_still_samples():
    logits = torch.zeros(1, 8)  # flat: any draw is possible, and a greedy one is token 0
    params = SamplingParams(temperature=GREEDY_BELOW * 2, seed=0)
    assert not params.greedy
    drawn = {sample(logits.clone(), [SampleRow(params, torch.Generator().manual_seed(s))])[0][0]
             for s in range(20)}
    assert len(drawn) > 1
