"""Attention-head pruning of DiT and DiT-MoE by first-order Taylor importance accumulated over timesteps
(Diff-Pruning, Fang et al. NeurIPS 2023, applied to heads as its Torch-Pruning groups do).

Head h of a block owns d = hidden_size / num_heads rows of each third [q | k | v] of `attn.qkv` (weight and bias)
and the same d columns of `attn.proj`. Its importance is

    I_h = |sum over the head's parameters w of  w * dL/dw|,   dL summed over the calibration batches

i.e. |dL(s)/ds| at s = 1 when all of the head's parameters are multiplied by s: the first-order estimate of the
loss change when the head is removed (s = 0). This is the group-level ("multivariable") Taylor criterion, as ditk's
MLP width pruning uses; Torch-Pruning's default TaylorImportance (which Diff-Pruning calls) sums |w * dL/dw|
element-wise instead, an upper bound that ignores cancellations within the head. The calibration batches carry the objective's random timesteps, so
the gradient is accumulated over timesteps as in Diff-Pruning (not done: its skipping of timesteps whose loss
change is below a threshold; every calibration timestep counts).

Targets: `prune.heads_keep=K` keeps the K most important heads of every block (`prune.heads_scope=block`), or
with `prune.heads_scope=global` the same total K x depth ranked over all blocks at once (each block keeps at least
its best head), so blocks end with different head counts. The smaller model is real: `model.block_heads` lists
each block's heads, the head width stays hidden_size / model.num_heads, and qkv / proj are that much narrower.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from ..errors import ConfigError
from .surgery import build_from_section

SCOPES = ("block", "global")


def head_rows(heads: int, head_dim: int, kept: list[int]) -> torch.Tensor:
    """Rows of a fused qkv weight (3 * heads * head_dim, D) that belong to heads `kept`, in [q | k | v] order."""
    inner = heads * head_dim
    cols = head_cols(head_dim, kept)
    return torch.cat([part * inner + cols for part in range(3)])


def head_cols(head_dim: int, kept: list[int]) -> torch.Tensor:
    """Columns of proj (D, heads * head_dim) (= channels of the attention output) that belong to heads `kept`."""
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in kept])


def head_importance(model, calib, batches) -> list[torch.Tensor]:
    """Per block: (heads,) Taylor importance of each attention head, gradients summed over `batches`."""
    model.requires_grad_(False)
    params = []
    for block in model.blocks:
        attn = block.attn
        for p in (attn.qkv.weight, attn.qkv.bias, attn.proj.weight):
            if p is not None:
                p.requires_grad_(True)
                p.grad = None
                params.append(p)
    for batch in batches:  # gradients accumulate over the batches, i.e. over their timesteps
        calib.loss(model, batch).backward()
    scores = []
    with torch.no_grad():
        for block in model.blocks:
            attn = block.attn
            heads, d = attn.num_heads, attn.head_dim
            # w * dL/dw per qkv row (weight row + bias) and per proj column, then summed over each head's d rows
            # in each of q, k, v and its d columns.
            rows = (attn.qkv.weight * attn.qkv.weight.grad).sum(1)
            if attn.qkv.bias is not None:
                rows = rows + attn.qkv.bias * attn.qkv.bias.grad
            cols = (attn.proj.weight * attn.proj.weight.grad).sum(0)
            per_head = rows.view(3, heads, d).sum((0, 2)) + cols.view(heads, d).sum(1)
            scores.append(per_head.abs())
    for p in params:
        p.grad = None
    model.requires_grad_(False)
    return scores


def choose_heads(scores: list[torch.Tensor], keep: int, scope: str = "block") -> list[list[int]]:
    """Kept head indices (sorted) per block: each block's `keep` best, or the best `keep` x blocks overall with at
    least one per block. Ties: the earlier head (block) wins."""
    order = [sorted(range(len(s)), key=lambda h: (-float(s[h]), h)) for s in scores]
    if scope == "block":
        return [sorted(o[:keep]) for o in order]
    total = keep * len(scores)
    kept = [[o[0]] for o in order]  # every block keeps its best head (a block needs one)
    rest = sorted(((float(s[h]), b, h) for b, (s, o) in enumerate(zip(scores, order)) for h in o[1:]),
                  key=lambda item: (-item[0], item[1], item[2]))
    for _, b, h in rest[: max(0, total - len(scores))]:
        kept[b].append(h)
    return [sorted(k) for k in kept]


def keep_heads(state_dict: dict, model, kept: list[list[int]]) -> dict:
    """Weights of the smaller model: each block's qkv rows and proj columns of its kept heads (q/k norms, shared
    by every head of a block, unchanged)."""
    sd = dict(state_dict)
    for i, (block, k) in enumerate(zip(model.blocks, kept)):
        attn = block.attn
        rows, cols = head_rows(attn.num_heads, attn.head_dim, k), head_cols(attn.head_dim, k)
        pre = f"blocks.{i}.attn"
        sd[f"{pre}.qkv.weight"] = sd[f"{pre}.qkv.weight"][rows]
        if f"{pre}.qkv.bias" in sd:
            sd[f"{pre}.qkv.bias"] = sd[f"{pre}.qkv.bias"][rows]
        sd[f"{pre}.proj.weight"] = sd[f"{pre}.proj.weight"][:, cols]
    return sd


def check_heads(cfg: DictConfig) -> None:
    p = cfg.prune
    heads, keep = int(cfg.model.num_heads), int(p.heads_keep)
    if p.heads_scope not in SCOPES:
        raise ConfigError(f"unknown prune.heads_scope '{p.heads_scope}': block (K heads in every block) or global "
                          "(K x depth heads ranked over all blocks)")
    if not 1 <= keep < heads:
        raise ConfigError(f"prune.heads_keep={keep}: keep between 1 and {heads - 1} of the {heads} attention heads "
                          "per block")
    if cfg.model.get("block_heads"):
        raise ConfigError("prune.method=heads on a model that is already head-pruned (model.block_heads is set): "
                          "prune the original model instead")


def prune_heads(model, cfg: DictConfig, calib, batches, log):
    from .run import model_section

    check_heads(cfg)
    keep, scope = int(cfg.prune.heads_keep), str(cfg.prune.heads_scope)
    scores = head_importance(model, calib, batches)
    kept = choose_heads(scores, keep, scope)
    section = {**model_section(cfg), "block_heads": [len(k) for k in kept]}
    small = build_from_section(cfg.model.name, section)
    small.load_state_dict(keep_heads(model.state_dict(), model, kept), strict=True)
    log(f"keeping attention heads {section['block_heads']} of {int(cfg.model.num_heads)} per block "
        f"(Taylor importance, {scope} ranking)")
    report = {"heads_before": int(cfg.model.num_heads), "block_heads": section["block_heads"], "kept_heads": kept,
              "heads_scope": scope, "taylor_importance": [s.tolist() for s in scores]}
    return small.eval(), section, report
