"""What the cache policies need to know about a backbone's block class, registered per class.

- `sub_modules`: the names of the block's children whose outputs FORA and TaylorSeer cache (DiT: the
  attention and the MLP, whose outputs the block gates and adds to its residual stream). Without a
  registration, the children that are a `ditk.models.layers.Attention` or `Mlp` are used.
- `modulated_input(block, args, kwargs)`: TeaCache's signal, the timestep-modulated input of the first
  block (DiT: modulate(norm1(x), shift_msa, scale_msa), shift/scale from the block's adaLN of c). Without a
  registration TeaCache refuses the model (FirstBlockCache works on any block).

A new backbone registers its block class next to its model, e.g.

    from ditk.cache.adapters import register_block
    register_block(MyBlock, sub_modules=("attn", "ffn"), modulated_input=my_modulated_input)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn as nn

from ..models.dit import DiTBlock
from ..models.layers import Attention, Mlp, modulate

ModulatedInput = Callable[[nn.Module, tuple, dict], torch.Tensor]


@dataclass(frozen=True)
class BlockAdapter:
    sub_modules: tuple[str, ...] = ()
    modulated_input: Optional[ModulatedInput] = None


_ADAPTERS: dict[Union[type, str], BlockAdapter] = {}


def register_block(cls: Union[type, str], sub_modules: tuple[str, ...] = (),
                   modulated_input: Optional[ModulatedInput] = None) -> None:
    """Register a block class, or its "module.QualName" (so this file need not import every backbone)."""
    _ADAPTERS[cls] = BlockAdapter(tuple(sub_modules), modulated_input)


def adapter_for(block: nn.Module) -> Optional[BlockAdapter]:
    for cls in type(block).__mro__:  # a subclass of a registered block uses its parent's adapter
        for key in (cls, f"{cls.__module__}.{cls.__qualname__}"):
            if key in _ADAPTERS:
                return _ADAPTERS[key]
    return None


def sub_modules(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """(child name, module) pairs whose outputs FORA / TaylorSeer cache, in forward order."""
    adapter = adapter_for(block)
    if adapter is not None and adapter.sub_modules:
        return [(name, getattr(block, name)) for name in adapter.sub_modules]
    return [(name, child) for name, child in block.named_children() if isinstance(child, (Attention, Mlp))]


def modulated_input(block: nn.Module) -> Optional[ModulatedInput]:
    adapter = adapter_for(block)
    return adapter.modulated_input if adapter is not None else None


def _dit_modulated_input(block: DiTBlock, args: tuple, kwargs: dict) -> torch.Tensor:
    """DiTBlock(x, c): the input its attention sees, modulate(norm1(x), shift_msa, scale_msa)."""
    x = args[0] if args else kwargs["x"]
    c = args[1] if len(args) > 1 else kwargs["c"]
    shift_msa, scale_msa = block.adaLN_modulation(c).chunk(6, dim=1)[:2]
    return modulate(block.norm1(x), shift_msa, scale_msa)


def _rwkv_modulated_input(block: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """RWKVBlock(x, c[, skip]): the input its spatial mix sees, modulate(ln1(x), shift_msa, scale_msa) after the
    block's skip fusion and (block 0) ln0."""
    x = args[0] if args else kwargs["x"]
    c = args[1] if len(args) > 1 else kwargs["c"]
    skip = args[2] if len(args) > 2 else kwargs.get("skip")
    if block.skip_linear is not None:
        x = block.skip_linear(torch.cat([x, skip], dim=-1))
    shift_msa, scale_msa = block.adaLN_modulation(c).chunk(6, dim=1)[:2]
    if block.ln0 is not None:
        x = block.ln0(x)
    return modulate(block.ln1(x), shift_msa, scale_msa)


# DiT, and DiT-MoE (a DiTBlock whose `mlp` is the mixture of experts).
register_block(DiTBlock, sub_modules=("attn", "mlp"), modulated_input=_dit_modulated_input)
# Diffusion-RWKV: spatial mix and channel mix play the attention and MLP roles.
register_block("ditk.models.rwkv.RWKVBlock", sub_modules=("att", "ffn"), modulated_input=_rwkv_modulated_input)
# DiS / Vision-Mamba blocks: the Mamba mixer is the block's only sub-module (their blocks return (hidden,
# residual) pairs, so only the sub-module policies, FORA and TaylorSeer, apply).
register_block("ditk.models.mamba.MambaBlock", sub_modules=("mixer",))


def sub_module_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every block's cached sub-modules, named like model.named_modules(): blocks.3.attn, blocks.3.mlp, ..."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        return []
    return [(f"blocks.{i}.{name}", module) for i, block in enumerate(blocks) for name, module in sub_modules(block)]
# FluxMusic (MMDiT): the joint attention and the per-stream MLPs of the double-stream blocks; in a single-stream
# block only the joint attention is a module of its own (its MLP branch shares linear1/linear2 with it).
register_block("ditk.models.mmdit.DoubleStreamBlock", sub_modules=("attn", "img_mlp", "txt_mlp"))
register_block("ditk.models.mmdit.SingleStreamBlock", sub_modules=("attn",))
