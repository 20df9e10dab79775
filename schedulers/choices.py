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
    n = len(items)
    if n <= FULL_SCAN_MAX:
        return items
    # Rejection sampling on getrandbits: the very draws `rng.randrange(n)` makes, without its
    # argument checks (placement samples hundreds of thousands of times an hour at scale).
    bits, draw = n.bit_length(), rng.getrandbits
    picked = []
    for _ in range(SAMPLED_CHOICES):
        r = draw(bits)
        while r >= n:
            r = draw(bits)
        picked.append(items[r])
    return picked
