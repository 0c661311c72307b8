"""What the simulated methods share: statistics of every layer's input over the calibration set, and the swap of
an nn.Linear for a FakeQuantLinear with its quantization.json record."""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

import torch

from ...errors import ConfigError
from ..calibration import batches, observe
from ..layers import FakeQuantLinear, set_module


class LayerStats:
    """Per layer: absmax of each input channel (overall and per timestep), the per-timestep sum of per-sample
    absmax (ViDiT-Q averages it over samples), X Xᵀ (GPTQ), row count."""

    def __init__(self, hessian: bool):
        self.hessian = hessian
        self.absmax: dict[str, torch.Tensor] = {}
        self.absmax_t: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
        self.summax_t: dict[str, dict[int, tuple]] = defaultdict(dict)  # t -> (sum over samples, count)
        self.xxt: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = defaultdict(int)


def collect(model, layers: list[str], inputs: dict, hessian: bool = False, batch_size: int = 128) -> LayerStats:
    """Run the (full-precision) model over the calibration inputs with observers on the inputs of `layers`."""
    stats = LayerStats(hessian)
    current_t: dict = {}

    def observe_input(name, x):
        x = x.float()
        per_sample = x.reshape(x.shape[0], -1, x.shape[-1]).abs().amax(dim=1)  # (N, in)
        for t in current_t["values"].unique().tolist():
            rows_t = per_sample[current_t["values"] == t]
            m = rows_t.amax(dim=0)
            old = stats.absmax_t[name].get(t)
            stats.absmax_t[name][t] = m if old is None else torch.maximum(old, m)
            total, count = stats.summax_t[name].get(t, (0, 0))
            stats.summax_t[name][t] = (total + rows_t.sum(dim=0), count + rows_t.shape[0])
        m = per_sample.amax(dim=0)
        stats.absmax[name] = m if name not in stats.absmax else torch.maximum(stats.absmax[name], m)
        rows = x.reshape(-1, x.shape[-1]).double()
        if hessian:
            stats.xxt[name] = stats.xxt.get(name, 0) + rows.T @ rows
        stats.rows[name] += rows.shape[0]

    device = next(model.parameters()).device
    with observe(model, layers, observe_input), torch.no_grad():
        for batch in batches(inputs, batch_size):
            batch = {k: v.to(device) for k, v in batch.items()}
            x, t = batch.pop("x"), batch.pop("t")
            current_t["values"] = t.cpu()
            model(x, t, **batch)
    return stats


def swap(model, name: str, weight: torch.Tensor, act: Optional[dict], record: dict, **buffers) -> dict:
    """Replace layer `name` by a FakeQuantLinear holding `weight` (already fake-quantized) and `buffers`
    (smooth, down, up, act_scale; rotation = Hadamard block size); returns the layer's quantization.json record."""
    linear = model.get_submodule(name)
    smooth, down, up, act_scale = (buffers.get(k) for k in ("smooth", "down", "up", "act_scale"))
    layer = FakeQuantLinear.from_linear(linear, weight, act=act, smooth=smooth is not None,
                                        rank=0 if down is None else down.shape[0], act_static=act_scale is not None,
                                        lowrank_dtype=buffers.get("lowrank_dtype", "bfloat16"),
                                        rotation=buffers.get("rotation", 0))
    with torch.no_grad():
        for key, value in (("smooth", smooth), ("down", down), ("up", up), ("act_scale", act_scale)):
            if value is not None:
                getattr(layer, key).copy_(value)
    set_module(model, name, layer)
    return {"module": layer.spec(), **record}


def merge_options(defaults: dict, given: Optional[dict], method: str) -> dict:
    """The method's options: its defaults updated by --opt KEY=VALUE; an unknown key is refused."""
    unknown = sorted(set(given or {}) - set(defaults))
    if unknown:
        raise ConfigError(f"--simulate {method} has no option '{unknown[0]}': use {', '.join(sorted(defaults)) or 'none'}")
    return {**defaults, **(given or {})}


def fit_group(in_features: int, group: Optional[int]) -> Optional[int]:
    """The largest divisor of in_features not above `group` (None / 0 / >= in_features: one group per channel)."""
    if not group or group >= in_features:
        return None
    return max(d for d in range(1, group + 1) if in_features % d == 0)


def act_bits(abits: Optional[int]) -> Optional[int]:
    """16 (or more) activation bits: keep activations in floating point."""
    return None if abits is not None and abits >= 16 else (8 if abits is None else abits)
