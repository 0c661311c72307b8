"""Per-layer bit allocation under a budget: the integer program of metric-decoupled mixed precision (MixDQ, Zhao et
al. ECCV 2024, §3.4; reused by ViDiT-Q §4.4 for its W4A8 / W6A6 mixed-precision settings).

Each layer l picks one option o (a (weight bits, activation bits) pair) with an integer cost c_lo (BitOps or
bytes) and a loss s_lo (its measured sensitivity at that option); minimise Σ_l s_l,o(l) subject to
Σ_l c_l,o(l) ≤ C. This is a multiple-choice knapsack; it is solved exactly by dynamic programming over the
total cost (costs are first divided by their greatest common divisor, which for a transformer's linears, all
multiples of width², keeps the table small). `allocate` is exact; tests/test_quantize_viditq.py checks it
against brute force and that the chosen configuration never exceeds the budget.
"""

from __future__ import annotations

import math
from typing import Sequence

from ..errors import ConfigError


def allocate(costs: Sequence[Sequence[int]], losses: Sequence[Sequence[float]], capacity: int,
             max_cells: int = 50_000_000) -> list[int]:
    """The option index of each layer minimising the summed loss with summed cost <= capacity (exact DP)."""
    if len(costs) != len(losses) or any(len(c) != len(s) or not c for c, s in zip(costs, losses)):
        raise ValueError("costs and losses need one non-empty, equally long option list per layer")
    g = 0
    for row in costs:
        for c in row:
            if c < 0 or int(c) != c:
                raise ValueError(f"costs must be non-negative integers, not {c}")
            g = math.gcd(g, int(c))
    g = g or 1
    cost = [[int(c) // g for c in row] for row in costs]
    cap = capacity // g
    if sum(min(row) for row in cost) > cap:
        raise ConfigError("the mixed-precision budget is below the cheapest configuration: raise it")
    if len(cost) * (cap + 1) > max_cells:  # keep the table bounded: the budget above what is ever spent is idle
        cap = min(cap, sum(max(row) for row in cost))
        if len(cost) * (cap + 1) > max_cells:
            raise ConfigError("the mixed-precision problem is too large for the exact allocator: fewer layers or options")
    inf = float("inf")
    best = [0.0] + [inf] * cap  # best[k]: least loss of the layers so far with total cost exactly k
    choice: list[list[int]] = []
    for row_c, row_s in zip(cost, losses):
        new = [inf] * (cap + 1)
        pick = [-1] * (cap + 1)
        for k, value in enumerate(best):
            if value == inf:
                continue
            for o, (c, s) in enumerate(zip(row_c, row_s)):
                if k + c <= cap and value + s < new[k + c]:
                    new[k + c], pick[k + c] = value + s, o
        best = new
        choice.append(pick)
    k = min(range(cap + 1), key=lambda i: best[i])
    options = []
    for layer in range(len(cost) - 1, -1, -1):  # walk back through the table
        o = choice[layer][k]
        options.append(o)
        k -= cost[layer][o]
    return options[::-1]
