"""One-shot depth-pruning criteria (TinyFusion's baselines) and the rule that turns scores into kept units.

- Block Influence (ShortGPT, Men et al. 2024): BI_i = 1 - E[cos(h_in, h_out)] over tokens, calibration samples
  and their (random) timesteps; a block that barely turns its input is unimportant.
- Oracle: the increase of the run's own diffusion loss when the unit alone is removed (TinyFusion's "loss"
  baseline, BK-SDM's oracle); computed on the same calibration batches, noise and timesteps for every unit.
Higher score = more important = kept first. A unit of two blocks (a U-ViT pair) scores the mean of its blocks' BI.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..hooks import attach
from .gates import bypass_hooks
from .layout import Layout


@torch.no_grad()
def block_influence(model, layout: Layout, run_batches: Iterable[Callable[[], object]]) -> list[float]:
    """Per block BI = 1 - mean cosine(input, output), token-wise, averaged over every token of every batch.

    `run_batches` yields callables that each run one forward of `model` (e.g. the diffusion loss on a batch).
    """
    sums = torch.zeros(layout.num_blocks, dtype=torch.float64)
    counts = torch.zeros(layout.num_blocks, dtype=torch.float64)

    def recorder(i):
        def hook(module, args, output):
            h_in = layout.stream(i, layout.state(i, args)).double()
            h_out = layout.stream(i, output).double()
            cos = F.cosine_similarity(h_in, h_out, dim=-1)  # (N, tokens)
            sums[i] += cos.sum().item()
            counts[i] += cos.numel()

        return hook

    with attach(model, {f"blocks.{i}": recorder(i) for i in range(layout.num_blocks)}):
        for run in run_batches:
            run()
    return (1.0 - sums / counts.clamp(min=1)).tolist()


def unit_scores_from_blocks(layout: Layout, block_scores: list[float]) -> list[float]:
    return [sum(block_scores[i] for i in unit) / len(unit) for unit in layout.units]


@torch.no_grad()
def oracle_loss_increase(model, layout: Layout, loss_fns: list[Callable[[], torch.Tensor]]) -> tuple[float, list[float]]:
    """(full loss, per unit: loss with the unit removed - full loss), averaged over the calibration batches."""
    def mean_loss():
        return sum(float(fn()) for fn in loss_fns) / len(loss_fns)

    full = mean_loss()
    increases = []
    for unit in layout.units:
        with attach(model, bypass_hooks(layout, list(unit))):
            increases.append(mean_loss() - full)
    return full, increases


def parse_pattern(pattern: str) -> tuple[int, int]:
    if str(pattern).isdigit():
        raise ConfigError(f"prune.pattern={pattern}: YAML read an unquoted N:M as a number; quote it in the preset "
                          "(pattern: '2:4')")
    try:
        n, m = (int(v) for v in pattern.split(":"))
    except ValueError:
        raise ConfigError(f"prune.pattern='{pattern}' is not N:M (keep N of every M consecutive blocks), e.g. 2:4") from None
    if not 0 < n < m:
        raise ConfigError(f"prune.pattern={pattern}: need 0 < N < M (keep N of every M blocks), e.g. 2:4")
    return n, m


def target_units(layout: Layout, keep: int = 0, pattern: str = "") -> tuple[int, int | None, int | None]:
    """Validate the target; returns (units to keep, N, M) where N:M is set for a pattern."""
    if bool(keep) == bool(pattern):
        raise ConfigError("give exactly one target: prune.keep=<blocks to keep> or prune.pattern=N:M "
                          "(with a pattern over a preset that sets prune.keep, add prune.keep=0)")
    units = len(layout.units)
    if pattern:
        n, m = parse_pattern(pattern)
        if units % m:
            what = "blocks" if all(len(u) == 1 for u in layout.units) else "removable block pairs"
            raise ConfigError(f"prune.pattern={pattern}: M={m} does not divide the {units} {what} of {layout.model}; "
                              f"pick M among the divisors of {units}, or use prune.keep")
        return units // m * n, n, m
    depth, fixed = layout.num_blocks, len(layout.fixed)
    if keep < 1 or keep >= depth:
        raise ConfigError(f"prune.keep={keep}: the model has {depth} blocks; keep between 1 and {depth - 1}")
    size = len(layout.units[0]) if layout.units else 1
    if (keep - fixed) % size or keep < fixed:
        raise ConfigError(f"prune.keep={keep}: {layout.model} removes blocks in pairs and keeps {fixed} fixed "
                          f"({layout.why_fixed}); keep {fixed} + a multiple of {size} blocks")
    return (keep - fixed) // size, None, None


def select(scores: list[float], layout: Layout, keep: int = 0, pattern: str = "") -> list[int]:
    """Indices of the kept units: the top-scoring ones overall (keep), or per group of M (pattern N:M)."""
    count, n, m = target_units(layout, keep, pattern)
    order = lambda idx: sorted(idx, key=lambda u: (-scores[u], u))  # ties: the earlier unit wins
    if m is None:
        return sorted(order(range(len(scores)))[:count])
    kept = []
    for start in range(0, len(scores), m):
        kept += order(range(start, start + m))[:n]
    return sorted(kept)


def random_units(layout: Layout, seed: int, keep: int = 0, pattern: str = "") -> list[int]:
    """A seeded random choice with the same shape as `select` (the baseline every method must beat)."""
    gen = torch.Generator().manual_seed(seed)
    return select(torch.rand(len(layout.units), generator=gen).tolist(), layout, keep, pattern)


def index_units(layout: Layout, keep_indices: list[int]) -> list[int]:
    """User-given kept *block* indices -> kept units (a pair must be kept or removed whole)."""
    blocks = sorted(set(int(i) for i in keep_indices))
    if len(blocks) != len(keep_indices):
        raise ConfigError(f"prune.keep_indices={list(keep_indices)} repeats a block: list each kept block once")
    bad = [i for i in blocks if not 0 <= i < layout.num_blocks]
    if bad:
        raise ConfigError(f"prune.keep_indices has block {bad[0]} but the model has blocks 0..{layout.num_blocks - 1}")
    missing = [i for i in layout.fixed if i not in blocks]
    if missing:
        raise ConfigError(f"prune.keep_indices must keep block {missing[0]}: {layout.why_fixed}")
    units = sorted({layout.unit_of(i) for i in blocks if i not in layout.fixed})
    for u in units:
        if not set(layout.units[u]) <= set(blocks):
            raise ConfigError(f"prune.keep_indices keeps only part of the pair {layout.units[u]}: "
                              "blocks joined by a long skip are kept or removed together")
    if len(layout.kept_blocks(units)) >= layout.num_blocks:
        raise ConfigError("prune.keep_indices keeps every block: leave out at least one")
    return units
