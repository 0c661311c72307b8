"""Width pruning of DiT MLPs by first-order Taylor importance accumulated over timesteps (Diff-Pruning, Fang et
al. NeurIPS 2023): the gradient of the run's diffusion loss is summed over the calibration batches (each with its
own random timesteps), and hidden channel c of a block's MLP scores

    I_c = |sum over the channel's weights w of  w * dL/dw|    (fc1 row c, fc1 bias c, fc2 column c)

the first-order estimate of the loss change when the channel is zeroed. Every block keeps its `prune.mlp_keep`
highest-scoring channels (its own choice), so `model.mlp_ratio = mlp_keep / hidden_size` describes the smaller
model and it is built and loaded like any other. Not done: Diff-Pruning's skipping of timesteps whose loss
change is below a threshold (every calibration timestep counts), attention-head pruning.
"""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig

from ..errors import ConfigError
from .surgery import build_from_section


def mlp_ratio_for(hidden: int, channels: int) -> float:
    """A float r with int(hidden * r) == channels (what DiT's Mlp computes)."""
    r = channels / hidden
    while int(hidden * r) < channels:
        r = math.nextafter(r, math.inf)
    return r


def taylor_importance(model, calib, batches) -> list[torch.Tensor]:
    """Per block: (hidden,) importance of each MLP channel."""
    model.requires_grad_(False)
    params = []
    for block in model.blocks:
        for p in (block.mlp.fc1.weight, block.mlp.fc1.bias, block.mlp.fc2.weight):
            p.requires_grad_(True)
            p.grad = None
            params.append(p)
    for batch in batches:  # gradients accumulate over batches, i.e. over their timesteps
        calib.loss(model, batch).backward()
    scores = []
    with torch.no_grad():
        for block in model.blocks:
            fc1, fc2 = block.mlp.fc1, block.mlp.fc2
            contrib = (fc1.weight * fc1.weight.grad).sum(1) + fc1.bias * fc1.bias.grad + (fc2.weight * fc2.weight.grad).sum(0)
            scores.append(contrib.abs())
    for p in params:
        p.grad = None
    model.requires_grad_(False)
    return scores


def prune_width(model, cfg: DictConfig, calib, batches, log):
    from .run import model_section

    hidden_mlp = model.blocks[0].mlp.fc1.out_features
    keep = int(cfg.prune.mlp_keep)
    if not 1 <= keep < hidden_mlp:
        raise ConfigError(f"prune.mlp_keep={keep}: keep between 1 and {hidden_mlp - 1} of the {hidden_mlp} MLP channels")
    scores = taylor_importance(model, calib, batches)
    kept = [sorted(torch.argsort(s, descending=True, stable=True)[:keep].tolist()) for s in scores]
    section = {**model_section(cfg), "mlp_ratio": mlp_ratio_for(int(cfg.model.hidden_size), keep)}
    small = build_from_section(cfg.model.name, section)
    sd = model.state_dict()
    for i, k in enumerate(kept):
        idx = torch.tensor(k)
        sd[f"blocks.{i}.mlp.fc1.weight"] = sd[f"blocks.{i}.mlp.fc1.weight"][idx]
        sd[f"blocks.{i}.mlp.fc1.bias"] = sd[f"blocks.{i}.mlp.fc1.bias"][idx]
        sd[f"blocks.{i}.mlp.fc2.weight"] = sd[f"blocks.{i}.mlp.fc2.weight"][:, idx]
    small.load_state_dict(sd, strict=True)
    log(f"keeping {keep} of {hidden_mlp} MLP channels in each of {len(kept)} blocks (Taylor importance)")
    report = {"mlp_channels_before": hidden_mlp, "mlp_channels_after": keep, "kept_channels": kept,
              "taylor_importance": [s.tolist() for s in scores]}
    return small.eval(), section, report
