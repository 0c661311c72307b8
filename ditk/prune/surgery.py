"""Kept blocks -> the smaller model: its config section (real depth), its weights, and its cost.

The smaller model is built by the ordinary registry from the new section, so `config.yaml` alone rebuilds it;
the weights are the source's, with blocks renumbered (`layout.rename_blocks`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from omegaconf import OmegaConf

from ..registry import MODELS
from .layout import pruned_section, rename_blocks


def build_from_section(name: str, section: dict) -> nn.Module:
    cfg = OmegaConf.structured(MODELS.get(name).config(**section)) if MODELS.get(name).config else OmegaConf.create(section)
    return MODELS.build(name, cfg)


def depth_pruned(model: nn.Module, name: str, section: dict, kept: list[int]) -> tuple[nn.Module, dict]:
    """(smaller model with the source's weights, its config section) keeping source blocks `kept`."""
    new_section = pruned_section(name, section, kept)
    small = build_from_section(name, new_section)
    small.load_state_dict(rename_blocks(model.state_dict(), kept), strict=True)
    return small, new_section


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, inputs: tuple, kwargs: dict) -> int:
    """FLOPs of one forward on `inputs` (torch.utils.flop_counter: 2 per multiply-add; matmuls, convolutions and
    attention are counted, element-wise ops are not)."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(*inputs, **kwargs)
    model.train(was)
    return int(counter.get_total_flops())
