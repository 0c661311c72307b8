"""Which nn.Linear layers are quantized, and the fake-quant Linear the simulated methods swap in.

High precision by default (DEFAULT_KEEP): the patch/timestep/label/text embedders, every adaLN modulation,
the final layer and routers. They hold few weights but set the conditioning of every block, and all DiT PTQ
papers keep them in full precision (PTQ4DiT, Q-DiT and ViDiT-Q quantize only the attention and MLP linears).
"""

from __future__ import annotations

import fnmatch
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .quantizers import quantize_activation
from .rotation import block_hadamard

from .checks import DEFAULT_KEEP


def select_linears(model: nn.Module, keep: Sequence[str] = DEFAULT_KEEP) -> tuple[list[str], list[str]]:
    """(names of the nn.Linear layers to quantize, names kept in high precision), in model order."""
    chosen, kept = [], []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            (kept if any(fnmatch.fnmatchcase(name, p) for p in keep) else chosen).append(name)
    return chosen, kept


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


class FakeQuantLinear(nn.Module):
    """y = Q_a(x / s) Ŵᵀ + b  [+ (x / s) L₂ᵀ L₁ᵀ]: a simulated quantized Linear.

    weight: the already fake-quantized (dequantized) weight Ŵ, with any smoothing folded in (W diag(s));
    smooth: per-input-channel divisor s of the activations (CSB / SmoothQuant / SVDQuant), or None;
    down/up: SVDQuant's low-rank branch L₂ (r, in), L₁ (out, r), kept in 16 bits and fed the unquantized
    (smoothed) activations, as in SVDQuant's eq. 5; act: the activation quantizer (see `quantize_activation`),
    None = activations stay in floating point. `spec()` is what quantization.json stores to rebuild the layer.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, act: Optional[dict] = None,
                 smooth: bool = False, rank: int = 0, lowrank_dtype: str = "bfloat16", act_static: bool = False,
                 rotation: int = 0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.act = dict(act) if act else None
        self.lowrank_dtype = lowrank_dtype
        self.weight = nn.Parameter(torch.zeros(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.register_buffer("smooth", torch.ones(in_features) if smooth else None)
        self.register_buffer("down", torch.zeros(rank, in_features) if rank else None)
        self.register_buffer("up", torch.zeros(out_features, rank) if rank else None)
        self.register_buffer("act_scale", torch.ones(1) if act_static else None)
        # rotation: block size of a Hadamard R applied to the (smoothed) input, x -> x R, with the weight stored
        # already rotated (W R); 0 = none. Rebuilt from the block size, so it is not saved with the weights.
        self.rotation = rotation
        self.register_buffer("rot", block_hadamard(in_features, rotation) if rotation else None, persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight: torch.Tensor, **kwargs) -> "FakeQuantLinear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, **kwargs)
        layer.to(linear.weight.device)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def spec(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "act": self.act, "smooth": self.smooth is not None, "rank": 0 if self.down is None else self.down.shape[0],
                "lowrank_dtype": self.lowrank_dtype, "act_static": self.act_scale is not None,
                **({"rotation": self.rotation} if self.rotation else {})}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.smooth is not None:
            x = x / self.smooth
        if self.rot is not None:
            x = x @ self.rot.to(x.dtype)
        xq = x
        if self.act is not None:
            xq = quantize_activation(x, self.act["bits"], self.act["granularity"], self.act.get("group_size"),
                                     self.act.get("symmetric", False), self.act_scale)
        y = F.linear(xq, self.weight, self.bias)
        if self.down is not None:
            dt = getattr(torch, self.lowrank_dtype)  # the 16-bit branch: rounded to 16 bits, computed in x's dtype
            y = y + F.linear(F.linear(x.to(dt).to(x.dtype), self.down.to(dt).to(x.dtype)), self.up.to(dt).to(x.dtype))
        return y

    def extra_repr(self) -> str:
        rank = 0 if self.down is None else self.down.shape[0]
        return f"{self.in_features}, {self.out_features}, act={self.act}, smooth={self.smooth is not None}, rank={rank}"
