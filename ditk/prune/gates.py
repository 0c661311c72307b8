"""Block gates as forward hooks (`ditk.hooks.attach`): out = g * block(state) + (1 - g) * state.

g = 0 is an exact bypass (the hook returns the block's input state, so a removed block is the identity);
g = 1 leaves the block alone; a tensor g (N,) gates each sample (TinyFusion's sampled masks). The block
still runs under a gate; the real speed-up comes from `surgery`, which builds the smaller model.
"""

from __future__ import annotations

from typing import Mapping, Union

import torch

from .layout import Layout

Gate = Union[float, torch.Tensor]


def _mix(out, state, g: torch.Tensor):
    if isinstance(out, tuple):
        return tuple(_mix(o, s, g) for o, s in zip(out, state))
    if state is None:  # DiS block 0 receives no residual; a missing residual is a zero one (residual = hidden)
        state = torch.zeros_like(out)
    gb = g.to(out.dtype).view(-1, *([1] * (out.ndim - 1)))
    return gb * out + (1 - gb) * state


def gate_hook(layout: Layout, index: int, gate: Gate):
    def hook(module, args, output):
        state = layout.state(index, args)
        if isinstance(gate, (int, float)):
            if gate == 0:
                return state
            if gate == 1:
                return None
            return _mix(output, state, torch.tensor([float(gate)]))
        return _mix(output, state, gate)

    return hook


def gate_hooks(layout: Layout, gates: Mapping[int, Gate]) -> dict:
    """{"blocks.i": hook} for `ditk.hooks.attach`; gates maps a block index to its gate."""
    return {f"blocks.{i}": gate_hook(layout, i, g) for i, g in gates.items()}


def bypass_hooks(layout: Layout, removed: list[int]) -> dict:
    """Hooks that make blocks `removed` the identity (the reference the pruned model must equal)."""
    return gate_hooks(layout, {i: 0.0 for i in removed})
