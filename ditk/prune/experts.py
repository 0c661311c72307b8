"""DiT-MoE expert pruning: keep the `prune.experts_keep` most-used routed experts of every MoE layer.

Usage is what `ditk.moe_stats` reports (how often each expert is among a token's top-k choices), recorded here
on the calibration batches (real data, the objective's timesteps and label dropout). Every layer keeps the same
number of experts (so `model.num_experts` describes the smaller model) but its own choice of them. The router
keeps the rows of the kept experts: its softmax then runs over the remaining experts only, i.e. every
probability is renormalised by the kept experts' share, p'_e = p_e / sum_kept p, and top-k picks among them.
Shared experts are untouched.

`prune.experts_merge=true` merges instead of dropping (MC-SMoE's frequency-weighted merging, Li et al. ICLR'24):
every dropped expert joins the kept expert it is most similar to, similarity = cosine of the two experts' router
logits over the calibration tokens (MC-SMoE's "router-logits" similarity); each group (a kept expert and the
experts merged into it) becomes one expert whose weights are the usage-weighted average of the group's weights,
sum_g u_g theta_g / sum_g u_g, and whose router row is the same usage-weighted average of the group's rows. The
router then still runs a softmax and top-k over the remaining experts only. Not done: MC-SMoE's neuron alignment
(permuting the experts' hidden units before averaging) and its low-rank compression after the merge.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from ..errors import ConfigError
from ..hooks import attach
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


@torch.no_grad()
def router_similarity(model, calib, batches) -> list[torch.Tensor]:
    """Per MoE layer, (E, E) cosine similarity of the experts' router logits over the calibration tokens: the
    Gram matrix of the (tokens, E) logits, accumulated over batches, normalised by its diagonal."""
    layers = moe_layers(model)
    grams = [torch.zeros(layer.num_experts, layer.num_experts, dtype=torch.float64) for _, layer in layers]

    def record(i):
        def hook(module, args, output):
            logits = F.linear(args[0], module.weight).double()  # (tokens, E), the router's pre-softmax scores
            grams[i] += logits.t() @ logits

        return hook

    with attach(model, {f"{name}.gate": record(i) for i, (name, _) in enumerate(layers)}):
        for batch in batches:
            calib.loss(model, batch)
    norms = [g.diagonal().clamp(min=1e-30).sqrt() for g in grams]
    return [g / (n[:, None] * n[None, :]) for g, n in zip(grams, norms)]


def merge_groups(kept: list[int], similarity: torch.Tensor) -> list[list[int]]:
    """For each kept expert (in `kept` order), the group it absorbs: itself, then every dropped expert whose most
    similar kept expert it is (ties: the earlier kept expert)."""
    groups = [[j] for j in kept]
    for e in range(similarity.shape[0]):
        if e in kept:
            continue
        best = max(range(len(kept)), key=lambda g: (float(similarity[e, kept[g]]), -g))
        groups[best].append(e)
    return groups


def merge_experts(state_dict: dict, groups: list[list[list[int]]], usage: list[list[float]],
                  layer_names: list[str]) -> dict:
    """Weights with one expert per group (renumbered 0..k-1): usage-weighted averages of the group's expert
    weights and router rows. A group whose experts were never used is averaged with equal weights."""
    out = {}
    prefix = {name: i for i, name in enumerate(layer_names)}
    pattern = re.compile(r"^(.*)\.experts\.(\d+)\.(.*)$")

    def weights(layer: int, group: list[int]) -> torch.Tensor:
        u = torch.tensor([float(usage[layer][e]) for e in group], dtype=torch.float64)
        return u / u.sum() if u.sum() > 0 else torch.full_like(u, 1.0 / len(group))

    def average(layer: int, group: list[int], tensors: list[torch.Tensor]) -> torch.Tensor:
        w = weights(layer, group)
        return sum(wi * t.double() for wi, t in zip(w, tensors)).to(tensors[0].dtype)

    for key, value in state_dict.items():
        m = pattern.match(key)
        if m and m.group(1) in prefix:
            layer, e = prefix[m.group(1)], int(m.group(2))
            for g, group in enumerate(groups[layer]):
                if group[0] == e:  # the kept expert writes its group's merged weights
                    tensors = [state_dict[f"{m.group(1)}.experts.{x}.{m.group(3)}"] for x in group]
                    out[f"{m.group(1)}.experts.{g}.{m.group(3)}"] = average(layer, group, tensors)
            continue
        if key.endswith(".gate.weight") and key[: -len(".gate.weight")] in prefix:
            layer = prefix[key[: -len(".gate.weight")]]
            value = torch.stack([average(layer, group, [value[x] for x in group]) for group in groups[layer]])
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
    report: dict = {}
    if cfg.prune.experts_merge:
        similarity = router_similarity(model, calib, batches)
        groups = [merge_groups(k, sim) for k, sim in zip(kept, similarity)]
        small.load_state_dict(merge_experts(model.state_dict(), groups, usage, names), strict=True)
        for name, gs in zip(names, groups):
            log(f"{name}: merging expert groups {gs} (usage-weighted)")
        report.update(merged_groups=groups, router_similarity=[s.tolist() for s in similarity])
    else:
        small.load_state_dict(keep_experts(model.state_dict(), kept, names), strict=True)
        for name, k in zip(names, kept):
            log(f"{name}: keeping experts {k}")
    report.update({"expert_usage": usage, "kept_experts": kept, "layers": names, "merge": bool(cfg.prune.experts_merge),
              "experts_before": int(cfg.model.num_experts), "experts_after": keep,
              "activated_params_before": activated_params(model), "activated_params_after": activated_params(small)})
    return small.eval(), section, report
