"""Which blocks of a backbone depth pruning may remove, and what "removed" means for its block list.

Every ditk backbone runs `model.blocks` in order, each block reading the state the previous one wrote:
  - DiT, DiT-MoE, DyDiT, Diffusion-RWKV: block(x, c[, skip]) -> x                         (state = x)
  - DiS: block(hidden, residual[, skip]) -> (hidden, residual)    (prenorm residual stream; state = both)
  - Dimba: block(x, residual, t0, y, mask) -> (x, residual)                                 (state = both)
  - FluxMusic: double block(img, txt, ...) -> (img, txt); single block(seq, ...) -> seq
A removed block is one whose output is its input state: the next block then sees exactly what it would see
in the smaller model built without it. That is the equivalence the tests check to 1e-6.

Pruning works on *units*: a plain block, or for the U-ViT layouts (DiS, Diffusion-RWKV) an in-block together
with the out-block that consumes its long skip, so the smaller model keeps every skip matched. The middle
block of those layouts, and Diffusion-RWKV's first pair (block 0 owns the input LayerNorm `ln0`), are fixed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ConfigError

PRUNABLE = ("dit", "dit-moe", "dydit", "dis", "diffusion-rwkv", "dimba", "fluxmusic")


@dataclass
class Layout:
    model: str  # registry name
    num_blocks: int
    units: list[tuple[int, ...]]  # removable units, in depth order of their first block
    fixed: list[int] = field(default_factory=list)  # blocks that are never removed
    state_arity: list[int] = field(default_factory=list)  # per block: how many leading inputs form the state
    why_fixed: str = ""

    def state(self, index: int, args: tuple):
        """The state a block receives (what a removed block passes on unchanged)."""
        n = self.state_arity[index]
        return args[0] if n == 1 else tuple(args[:n])

    def stream(self, index: int, value) -> torch.Tensor:
        """One tensor (N, tokens, D) that represents a block's input or output, for Block Influence."""
        if self.model == "dis":  # prenorm residual stream: what the next block normalises is hidden + residual
            hidden, residual = value
            return hidden if residual is None else hidden + residual
        if self.model == "fluxmusic" and isinstance(value, tuple):  # double block: text and music tokens
            return torch.cat([value[1], value[0]], dim=1)
        if isinstance(value, tuple):  # Dimba: the attention branch reads x (the residual only feeds Mamba)
            return value[0]
        return value

    def unit_of(self, block: int) -> int:
        for u, members in enumerate(self.units):
            if block in members:
                return u
        raise ConfigError(f"block {block} of {self.model} may not be removed: {self.why_fixed or 'it is fixed'}")

    def kept_blocks(self, kept_units: list[int]) -> list[int]:
        """Blocks (sorted) that remain when `kept_units` (indices into `units`) and the fixed blocks stay."""
        kept = set(self.fixed)
        for u in kept_units:
            kept.update(self.units[u])
        return sorted(kept)


def layout_for(model_name: str, section: dict) -> Layout:
    """The layout of a model built from config section `section` (a plain dict of the model section)."""
    if model_name in ("dit", "dit-moe", "dydit"):
        depth = int(section["depth"])
        return Layout(model_name, depth, [(i,) for i in range(depth)], state_arity=[1] * depth)
    if model_name == "dimba":
        depth = int(section["depth"])
        return Layout(model_name, depth, [(i,) for i in range(depth)], state_arity=[2] * depth)
    if model_name == "fluxmusic":
        d, s = int(section["depth_double"]), int(section["depth_single"])
        return Layout(model_name, d + s, [(i,) for i in range(d + s)], state_arity=[2] * d + [1] * s)
    if model_name == "dis":  # depth + 1 blocks: depth/2 in, mid, depth/2 out; in-block k feeds out-block depth - k
        depth = int(section["depth"])
        half = depth // 2
        return Layout(model_name, depth + 1, [(k, depth - k) for k in range(half)], fixed=[half],
                      state_arity=[2] * (depth + 1),
                      why_fixed=f"block {half} is DiS's middle block (it has no long-skip partner)")
    if model_name == "diffusion-rwkv":  # depth blocks (odd): in-block k feeds out-block depth - 1 - k
        depth = int(section["depth"])
        half = depth // 2
        return Layout(model_name, depth, [(k, depth - 1 - k) for k in range(1, half)], fixed=[0, half, depth - 1],
                      state_arity=[1] * depth,
                      why_fixed=f"block {half} is the middle block and blocks 0/{depth - 1} are the first pair "
                                "(block 0 owns RWKV's input LayerNorm ln0)")
    raise ConfigError(f"model '{model_name}' has no prunable block list: prune one of {', '.join(PRUNABLE)}")


def pruned_section(model_name: str, section: dict, kept: list[int]) -> dict:
    """The model config section of the smaller model that keeps blocks `kept` (sorted source indices)."""
    out = dict(section)
    n = len(kept)
    if model_name in ("dit", "dit-moe", "dydit"):
        out["depth"] = n
        if section.get("block_heads"):  # a head-pruned source: the kept blocks keep their head counts
            out["block_heads"] = [int(section["block_heads"][i]) for i in kept]
    elif model_name == "dis":
        out["depth"] = n - 1
    elif model_name == "diffusion-rwkv":
        out["depth"] = n
    elif model_name == "fluxmusic":
        d = int(section["depth_double"])
        out["depth_double"] = sum(1 for i in kept if i < d)
        out["depth_single"] = n - out["depth_double"]
    elif model_name == "dimba":
        out.update(_dimba_section(section, kept))
    else:
        raise ConfigError(f"model '{model_name}' has no prunable block list: prune one of {', '.join(PRUNABLE)}")
    return out


def _dimba_section(section: dict, kept: list[int]) -> dict:
    """Dimba places its Mamba blocks by a rule (`mamba_positions(depth, ratio)`); the kept blocks must follow it."""
    from ..models.dimba import mamba_positions

    depth, n = int(section["depth"]), len(kept)
    have = mamba_positions(depth, float(section["mamba_ratio"]))
    new_positions = [j for j, i in enumerate(kept) if i in have]
    if not new_positions:
        raise ConfigError("these kept Dimba blocks hold no Mamba block: keep at least one block with Mamba "
                          f"(blocks {have})")
    ratio = len(new_positions) / n
    try:
        rule = mamba_positions(n, ratio)
    except ConfigError:
        rule = None
    if rule != new_positions:
        raise ConfigError(f"kept Dimba blocks {kept} put Mamba at {new_positions}, which no mamba_ratio reproduces at "
                          f"depth {n}: keep whole attention+Mamba periods (Mamba blocks are {have})")
    return {"depth": n, "mamba_ratio": ratio}


def rename_blocks(state_dict: dict, kept: list[int]) -> dict:
    """Weights of the smaller model: blocks.<kept[j]>.* -> blocks.<j>.*, removed blocks dropped, rest unchanged."""
    new_index = {old: new for new, old in enumerate(kept)}
    out = {}
    for key, value in state_dict.items():
        if key.startswith("blocks."):
            old, rest = key[len("blocks."):].split(".", 1)
            if int(old) not in new_index:
                continue
            key = f"blocks.{new_index[int(old)]}.{rest}"
        out[key] = value
    return out


