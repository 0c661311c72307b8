"""DiT-MoE expert pruning: keep the `prune.experts_keep` most-used routed experts of every MoE layer.

Usage is what `ditk.moe_stats` reports (how often each expert is among a token's top-k choices), recorded here
on the calibration batches (real data, the objective's timesteps and label dropout). Every layer keeps the same
number of experts (so `model.num_experts` describes the smaller model) but its own choice of them. The router
keeps the rows of the kept experts: its softmax then runs over the remaining experts only, i.e. every
probability is renormalised by the kept experts' share, p'_e = p_e / sum_kept p, and top-k picks among them.
Shared experts are untouched.
"""

from __future__ import annotations

import re

import torch
from omegaconf import DictConfig

from ..errors import ConfigError
from ..moe_stats import ExpertUsageRecorder, moe_layers
from .surgery import build_from_section


def expert_params(layer) -> int:
    return sum(p.numel() for p in layer.experts[0].parameters())


def activated_params(model) -> int:
    """Parameters one token uses: everything but the routed experts it is not sent to (k of E per layer)."""
    total = sum(p.numel() for p in model.parameters())
    for _, layer in moe_layers(model):
        total -= (layer.num_experts - layer.top_k) * expert_params(layer)
    return total


@torch.no_grad()
def expert_usage(model, calib, batches) -> list[list[float]]:
    """(layers, experts) fraction of routing choices per expert over the calibration batches."""
    recorder = ExpertUsageRecorder(model)
    with recorder.attached():
        for batch in batches:
            calib.loss(model, batch)
    return recorder.summary()["usage"]


def keep_experts(state_dict: dict, kept: list[list[int]], layer_names: list[str]) -> dict:
    """Weights with only the kept experts per layer (renumbered 0..k-1) and the matching router rows."""
    out = {}
    prefix = {name: i for i, name in enumerate(layer_names)}
    pattern = re.compile(r"^(.*)\.experts\.(\d+)\.(.*)$")
    for key, value in state_dict.items():
        m = pattern.match(key)
        if m and m.group(1) in prefix:
            keep = kept[prefix[m.group(1)]]
            e = int(m.group(2))
            if e not in keep:
                continue
            key = f"{m.group(1)}.experts.{keep.index(e)}.{m.group(3)}"
        elif key.endswith(".gate.weight") and key[: -len(".gate.weight")] in prefix:
            value = value[kept[prefix[key[: -len(".gate.weight")]]]]
        out[key] = value
    return out


def check_experts(cfg: DictConfig) -> None:
    e, k, keep = int(cfg.model.num_experts), int(cfg.model.top_k), int(cfg.prune.experts_keep)
    if not k <= keep < e:
        raise ConfigError(f"prune.experts_keep={keep}: keep between model.top_k={k} and {e - 1} of the {e} routed experts")


def prune_experts(model, cfg: DictConfig, calib, batches, log):
    from .run import model_section

    check_experts(cfg)
    keep = int(cfg.prune.experts_keep)
    usage = expert_usage(model, calib, batches)
    kept = [sorted(sorted(range(len(u)), key=lambda e: (-u[e], e))[:keep]) for u in usage]
    names = [name for name, _ in moe_layers(model)]
    section = {**model_section(cfg), "num_experts": keep}
    small = build_from_section(cfg.model.name, section)
    small.load_state_dict(keep_experts(model.state_dict(), kept, names), strict=True)
    for name, k in zip(names, kept):
        log(f"{name}: keeping experts {k}")
    report = {"expert_usage": usage, "kept_experts": kept, "layers": names,
              "experts_before": int(cfg.model.num_experts), "experts_after": keep,
              "activated_params_before": activated_params(model), "activated_params_after": activated_params(small)}
    return small.eval(), section, report
