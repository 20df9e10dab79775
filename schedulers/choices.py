"""Which workers to compare when placing work: all of them, or a few when there are many.

Comparing a few sampled workers ("power of d choices", Mitzenmacher) balances load nearly as
well as comparing all, and keeps each placement O(1) at hundreds of devices.
"""

from __future__ import annotations

import random
from typing import TypeVar

T = TypeVar("T")

FULL_SCAN_MAX = 16
SAMPLED_CHOICES = 4


def candidates(items: list[T], rng: random.Random) -> list[T]:
    if len(items) <= FULL_SCAN_MAX:
        return items
    pick = rng.randrange
    return [items[pick(len(items))] for _ in range(SAMPLED_CHOICES)]
