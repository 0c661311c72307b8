"""AdaRound (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization", ICML 2020), learned per
block as in BRECQ: the rounding step of PTQ4DiT's block reconstruction (its official code runs Q-Diffusion's
BRECQ/AdaRound after CSB/SSC).

Each weight keeps its min-max grid (scale s, zero z per channel or group) and only chooses to round down or up:

    W̃ = s · (clamp(⌊W/s⌋ + h(V) + z, qmin, qmax) − z),   h(V) = clip(σ(V)(ζ − γ) + γ, 0, 1),  ζ = 1.1, γ = −0.1
                                                                                             (AdaRound eq. 22-23)
    min_V  ‖f_block(X; W̃) − f_block(X; W)‖² + λ Σ (1 − |2h(V) − 1|^β)                          (eq. 24-25)

V starts at the value for which h(V) = W/s − ⌊W/s⌋ (so W̃ = W before clamping); β anneals from 20 to 2 after a
warm-up of 20 % of the steps without the regulariser (the paper's schedule); at the end every weight is rounded
hard, h = 1[V ≥ 0], so each weight is ⌊W/s⌋ or ⌈W/s⌉ on its original grid (tested).

As in BRECQ's weight-reconstruction stage, activations are kept in floating point while V is learned (rounding in
the activation quantizers has no gradient); their static scales are left as calibrated (no LSQ step-size stage).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from .blocks import BlockData, block_error, reconstruct
from .quantizers import minmax_params

ZETA, GAMMA = 1.1, -0.1


class AdaRoundWeight(nn.Module):
    """The parametrization W ↦ W̃(V) of one layer (the weight it is given is ignored: the grid is fixed at init)."""

    def __init__(self, weight: torch.Tensor, bits: int, group_size=None, symmetric: bool = False):
        super().__init__()
        out_f, in_f = weight.shape
        g = group_size or in_f
        w = weight.detach().float().reshape(out_f, in_f // g, g)
        scale, zero, qmin, qmax = minmax_params(w, bits, symmetric)
        self.shape, self.qmin, self.qmax = (out_f, in_f), qmin, qmax
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.register_buffer("floor", torch.floor(w / scale))
        rest = (w / scale - self.floor).clamp(1e-4, 1 - 1e-4)
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))  # σ(V)(ζ−γ)+γ = rest
        self.hard = False

    def h(self) -> torch.Tensor:
        if self.hard:
            return (self.v >= 0).float()
        return (torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def forward(self, _weight: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(self.floor + self.h() + self.zero, self.qmin, self.qmax)
        return ((q - self.zero) * self.scale).reshape(self.shape)

    def regulariser(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()


def adaround_block(block: nn.Module, layers: dict, data: BlockData, steps: int = 300, lr: float = 4e-3,
                   weight: float = 0.01, warmup: float = 0.2, rows_per_step: int = 64) -> dict:
    """Learn the rounding of `layers` ({name: (FakeQuantLinear inside `block`, the pre-quantization weight it
    approximates (balanced), bits, group size)}) against the block's recorded full-precision output; the layers end
    with hard-rounded weights. Returns the block's relative output error before (round to nearest) and after."""
    acts = {}
    for name, (layer, _, _, _) in layers.items():
        acts[name], layer.act = layer.act, None  # weight reconstruction with float activations (BRECQ)
    before = block_error(block, data)
    nearest = [layer.weight.detach().clone() for layer, _, _, _ in layers.values()]
    params, rounders = [], []
    for layer, w, bits, group in layers.values():
        rounder = AdaRoundWeight(w, bits, group)
        parametrize.register_parametrization(layer, "weight", rounder, unsafe=True)
        params.append(rounder.v)
        rounders.append(rounder)
    n_elems = sum(r.v.numel() for r in rounders)

    def reg(step):
        if step < warmup * steps:
            return torch.zeros(())
        frac = (step - warmup * steps) / max(1.0, (1 - warmup) * steps)
        beta = 20 + (2 - 20) * frac  # anneal 20 -> 2
        return weight * sum(r.regulariser(beta) for r in rounders) / n_elems

    reconstruct(block, data, params, steps, lr, reg, rows_per_step)
    for r in rounders:
        r.hard = True
    after = block_error(block, data)
    for (layer, _, _, _), rtn in zip(layers.values(), nearest):
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
        layer.weight.requires_grad_(False)
        if after >= before:  # a safeguard: learned rounding that does not help is dropped
            layer.weight.copy_(rtn)
    for name, (layer, _, _, _) in layers.items():
        layer.act = acts[name]
    return {"error_nearest": before, "error_adaround": min(after, before), "kept": after < before}
