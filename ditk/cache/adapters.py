"""What the cache policies need to know about a backbone, registered per block class (and per model class).

Per block class (`register_block`):
- `sub_modules`: the names (dotted paths allowed; a missing or None module is skipped) of the block's
  children whose outputs FORA and TaylorSeer cache (DiT: the attention and the MLP, whose outputs the block
  gates and adds to its residual stream). Without a registration, the children that are a
  `ditk.models.layers.Attention` or `Mlp` are used.
- `modulated_input(block, args, kwargs)`: TeaCache's signal, the timestep-modulated input of the first
  block (DiT: modulate(norm1(x), shift_msa, scale_msa), shift/scale from the block's adaLN of c). Without a
  registration TeaCache refuses the model.
- `stream`: how the block's arguments and output carry the model state from block to block, for the
  policies that skip whole blocks (Delta-DiT, FirstBlockCache, TeaCache). They work on one *state tensor*
  per block boundary, batch rows first: they add and subtract states (a cached span = its input state + a
  stored delta) and pass the state of skipped blocks through. The default is a block that maps a tensor x
  (its first argument) to a tensor of the same shape (DiT, DiT-MoE, Diffusion-RWKV). Blocks that carry more
  than one tensor name a `Stream` that packs them into one state and unpacks it again:
    * Mamba blocks (DiS, and Dimba's layers) map (hidden, residual) -> (hidden, residual): the state is
      [hidden | residual] concatenated over channels (a residual of None, before the first Mamba block, is 0);
    * FluxMusic's double-stream blocks map (img, txt) -> (img, txt): the state is the joint sequence
      [txt; img], exactly what the model concatenates before its single-stream blocks, whose state is that
      joint sequence itself; so a span of blocks that crosses from double- to single-stream blocks has one
      state of one shape, and skipping the span is the identity on it, as it must be.
  A stream also lists the arguments that are not per batch row (RoPE angles), which the policies must not
  slice when they run a block on some rows only.

Per model class (`register_model`):
- `long_skips(model) -> {consumer block: source block}`: U-ViT style long skips (Diffusion-RWKV, DiS), where
  the output of an early block is also an input of a late one. Delta-DiT caches a *front* range of blocks
  whose in-blocks feed out-blocks behind the range; those sources must then stand in with their own cached
  delta (input + stored output - input), not with the range's input, or the out-blocks would receive the
  wrong skip tensor. (FirstBlockCache and TeaCache skip spans that run to the last block: every consumer of a
  skipped source is skipped with it.)

A new backbone registers its block class next to its model, e.g.

    from ditk.cache.adapters import register_block
    register_block(MyBlock, sub_modules=("attn", "ffn"), modulated_input=my_modulated_input)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..models.dit import DiTBlock
from ..models.layers import Attention, Mlp, modulate

ModulatedInput = Callable[[nn.Module, tuple, dict], torch.Tensor]


def _arg(args: tuple, kwargs: dict, index: int, name: str, default=None):
    """A block argument given by position or by keyword."""
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


# -- streams ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stream:
    """How a block carries the model state (see the module docstring). Functions take the block first.

    read_in(block, args, kwargs) -> state of the block's input; read_out(block, output, args, kwargs) -> state
    of its output; write(block, state, args, kwargs) -> the block's output for a given state (what a skipped
    block returns); shared: positions / keyword names of the arguments that are the same for every row;
    signal(state) -> the tensor whose change FirstBlockCache measures (default: the state itself)."""

    read_in: Callable[..., torch.Tensor]
    read_out: Callable[..., torch.Tensor]
    write: Callable[..., Any]
    shared: frozenset = field(default_factory=frozenset)
    signal: Optional[Callable[[torch.Tensor], torch.Tensor]] = None


def _tensor_in(block, args, kwargs):
    return args[0] if args else next(iter(kwargs.values()))


def _tensor_out(block, out, args, kwargs):
    x = _tensor_in(block, args, kwargs)
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        got = type(out).__name__ if not isinstance(out, torch.Tensor) else f"shape {tuple(out.shape)}"
        raise ConfigError(f"{type(block).__name__} returns {got} for an input of shape {tuple(x.shape)}, so the "
                          "policies that skip whole blocks cannot add up its states: register its stream with "
                          "ditk.cache.adapters.register_block, or use --cache fora / taylorseer")
    return out


def _tensor_write(block, state, args, kwargs):
    return state


TENSOR = Stream(_tensor_in, _tensor_out, _tensor_write)


def _pair_stream(first: str, output_residual: Callable[[nn.Module, tuple, dict], bool]) -> Stream:
    """(first, residual) -> (first, residual) blocks: state = [first | residual] over channels, residual None = 0.
    output_residual(block, args, kwargs): whether the block's output residual is a tensor (else None)."""

    def read_in(block, args, kwargs):
        h, r = _arg(args, kwargs, 0, first), _arg(args, kwargs, 1, "residual")
        return torch.cat([h, torch.zeros_like(h) if r is None else r], dim=-1)

    def read_out(block, out, args, kwargs):
        h, r = out
        return torch.cat([h, torch.zeros_like(h) if r is None else r], dim=-1)

    def write(block, state, args, kwargs):
        d = state.shape[-1] // 2
        r = state[..., d:].contiguous() if output_residual(block, args, kwargs) else None
        return state[..., :d].contiguous(), r

    def model_state(state):  # Mamba's state after a block is residual + hidden
        d = state.shape[-1] // 2
        return state[..., :d] + state[..., d:]

    return Stream(read_in, read_out, write, signal=model_state)


def _double_in(block, args, kwargs):
    return torch.cat([_arg(args, kwargs, 1, "txt"), _arg(args, kwargs, 0, "img")], dim=1)


def _double_out(block, out, args, kwargs):
    img, txt = out
    return torch.cat([txt, img], dim=1)


def _double_write(block, state, args, kwargs):
    n_txt = _arg(args, kwargs, 1, "txt").shape[1]
    return state[:, n_txt:], state[:, :n_txt]


# -- registrations --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockAdapter:
    sub_modules: tuple[str, ...] = ()
    modulated_input: Optional[ModulatedInput] = None
    stream: Optional[Stream] = None


@dataclass(frozen=True)
class ModelAdapter:
    long_skips: Optional[Callable[[nn.Module], dict]] = None


_ADAPTERS: dict[Union[type, str], BlockAdapter] = {}
_MODEL_ADAPTERS: dict[Union[type, str], ModelAdapter] = {}


def register_block(cls: Union[type, str], sub_modules: tuple[str, ...] = (),
                   modulated_input: Optional[ModulatedInput] = None, stream: Optional[Stream] = None) -> None:
    """Register a block class, or its "module.QualName" (so this file need not import every backbone)."""
    _ADAPTERS[cls] = BlockAdapter(tuple(sub_modules), modulated_input, stream)


def register_model(cls: Union[type, str], long_skips: Optional[Callable[[nn.Module], dict]] = None) -> None:
    _MODEL_ADAPTERS[cls] = ModelAdapter(long_skips)


def _lookup(table: dict, obj):
    for cls in type(obj).__mro__:  # a subclass of a registered class uses its parent's adapter
        for key in (cls, f"{cls.__module__}.{cls.__qualname__}"):
            if key in table:
                return table[key]
    return None


def adapter_for(block: nn.Module) -> Optional[BlockAdapter]:
    return _lookup(_ADAPTERS, block)


@dataclass(frozen=True, eq=False)
class Method:
    """A block method that FORA / TaylorSeer cache like a sub-module (FluxMusic's single-stream `branch`, the
    fused attention + MLP branch): `forward` is the method; patching replaces the attribute on the instance."""

    owner: nn.Module
    attr: str

    @property
    def forward(self):
        return getattr(self.owner, self.attr)


def _submodule(block: nn.Module, path: str):
    """The module (or a Method) at a dotted path of the block; None where the path is missing or None."""
    owner, target = None, block
    for part in path.split("."):
        owner, target = target, getattr(target, part, None)
        if target is None:
            return None
    if isinstance(target, nn.Module):
        return target
    return Method(owner, path.rsplit(".", 1)[-1]) if callable(target) and isinstance(owner, nn.Module) else None


def patch_target(unit) -> tuple[nn.Module, str]:
    """(object, attribute) to patch for a unit: a module's forward, or a Method's attribute."""
    return (unit.owner, unit.attr) if isinstance(unit, Method) else (unit, "forward")


def sub_modules(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """(child name, module or Method) pairs whose outputs FORA / TaylorSeer cache, in forward order."""
    adapter = adapter_for(block)
    if adapter is not None and adapter.sub_modules:
        found = [(name, _submodule(block, name)) for name in adapter.sub_modules]
        return [(name, module) for name, module in found if module is not None]
    return [(name, child) for name, child in block.named_children() if isinstance(child, (Attention, Mlp))]


def modulated_input(block: nn.Module) -> Optional[ModulatedInput]:
    adapter = adapter_for(block)
    return adapter.modulated_input if adapter is not None else None


def stream_of(block: nn.Module) -> Stream:
    adapter = adapter_for(block)
    return adapter.stream if adapter is not None and adapter.stream is not None else TENSOR


def long_skips(model: nn.Module) -> dict:
    """{consumer block index: source block index} of the model's long skips ({} for a plain stack)."""
    adapter = _lookup(_MODEL_ADAPTERS, model)
    return dict(adapter.long_skips(model)) if adapter is not None and adapter.long_skips is not None else {}


class BlockIO:
    """A block's stream bound to the block (what the block-level policies call)."""

    def __init__(self, block: nn.Module):
        self.block = block
        self.stream = stream_of(block)

    def read_in(self, args, kwargs) -> torch.Tensor:
        return self.stream.read_in(self.block, args, kwargs)

    def read_out(self, out, args, kwargs) -> torch.Tensor:
        return self.stream.read_out(self.block, out, args, kwargs)

    def write(self, state, args, kwargs):
        return self.stream.write(self.block, state, args, kwargs)

    def signal(self, state: torch.Tensor) -> torch.Tensor:
        return state if self.stream.signal is None else self.stream.signal(state)

    def select(self, args, kwargs, mask: torch.Tensor):
        """The arguments for the rows in `mask`: every per-row tensor argument sliced, shared ones kept."""
        n, shared = mask.shape[0], self.stream.shared

        def rows(key, value):
            if key in shared or not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != n:
                return value
            return value[mask]

        return (tuple(rows(i, a) for i, a in enumerate(args)), {k: rows(k, v) for k, v in kwargs.items()})


# -- the backbones ----------------------------------------------------------------------------------------------


def _dit_modulated_input(block: DiTBlock, args: tuple, kwargs: dict) -> torch.Tensor:
    """DiTBlock(x, c): the input its attention sees, modulate(norm1(x), shift_msa, scale_msa)."""
    x, c = _arg(args, kwargs, 0, "x"), _arg(args, kwargs, 1, "c")
    shift_msa, scale_msa = block.adaLN_modulation(c).chunk(6, dim=1)[:2]
    return modulate(block.norm1(x), shift_msa, scale_msa)


def _rwkv_modulated_input(block: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """RWKVBlock(x, c[, skip]): the input its spatial mix sees, modulate(ln1(x), shift_msa, scale_msa) after the
    block's skip fusion and (block 0) ln0."""
    x, c, skip = _arg(args, kwargs, 0, "x"), _arg(args, kwargs, 1, "c"), _arg(args, kwargs, 2, "skip")
    if block.skip_linear is not None:
        x = block.skip_linear(torch.cat([x, skip], dim=-1))
    shift_msa, scale_msa = block.adaLN_modulation(c).chunk(6, dim=1)[:2]
    if block.ln0 is not None:
        x = block.ln0(x)
    return modulate(block.ln1(x), shift_msa, scale_msa)


def _mamba_modulated_input(block: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """MambaBlock(hidden, residual[, skip]) of DiS: the input its mixer sees, norm(residual + hidden). DiS has no
    adaLN: the timestep (and the label) are tokens of this sequence, so it is the first place where the timestep
    and the noisy image meet, as the modulated input is in DiT."""
    hidden, residual = _arg(args, kwargs, 0, "hidden"), _arg(args, kwargs, 1, "residual")
    skip = _arg(args, kwargs, 2, "skip")
    if block.skip_linear is not None:
        hidden = block.skip_linear(torch.cat([hidden, skip], dim=-1))
    return block.norm(hidden if residual is None else residual + block.drop_path(hidden))


def _dimba_modulated_input(block: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """DimbaBlock(x, residual, t0, y, mask): the input its self-attention sees, t2i_modulate(norm1(x), shift_msa,
    scale_msa) with PixArt's adaLN-single shift/scale (the block's table + the global t0)."""
    x, t0 = _arg(args, kwargs, 0, "x"), _arg(args, kwargs, 2, "t0")
    n, _, d = x.shape
    shift_msa, scale_msa = (block.scale_shift_table[None] + t0.reshape(n, 6, d)).chunk(6, dim=1)[:2]
    return block.norm1(x) * (1 + scale_msa) + shift_msa


def _double_modulated_input(block: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """DoubleStreamBlock(img, txt, vec, ...): the music stream's modulated input (1 + scale) * norm1(img) + shift,
    the signal of TeaCache4FLUX (img_mod of the first double block)."""
    img, vec = _arg(args, kwargs, 0, "img"), _arg(args, kwargs, 2, "vec")
    shift, scale = block.img_mod(vec)[:2]
    return (1 + scale) * block.img_norm1(img) + shift


def _single_modulated_input(block: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    x, vec = _arg(args, kwargs, 0, "x"), _arg(args, kwargs, 1, "vec")
    shift, scale = block.modulation(vec)[:2]
    return (1 + scale) * block.pre_norm(x) + shift


def _mirror_long_skips(model: nn.Module) -> dict:
    """U-ViT layout: block i with a skip fusion (`skip_linear`) reads the output of block depth - 1 - i."""
    blocks = model.blocks
    return {i: len(blocks) - 1 - i for i, b in enumerate(blocks) if getattr(b, "skip_linear", None) is not None}


# DiT, and DiT-MoE (a DiTBlock whose `mlp` is the mixture of experts).
register_block(DiTBlock, sub_modules=("attn", "mlp"), modulated_input=_dit_modulated_input)
# DyDiT: its MLP branch routes tokens (gather -> MLP -> scatter); caching the method `mlp_branch` keeps that sparse
# work on computed steps (caching `mlp` itself would make DyDiT run the MLP on every token).
register_block("ditk.models.dydit.DyDiTBlock", sub_modules=("attn", "mlp_branch"), modulated_input=_dit_modulated_input)
# Diffusion-RWKV: spatial mix and channel mix play the attention and MLP roles; long skips as U-ViT.
register_block("ditk.models.rwkv.RWKVBlock", sub_modules=("att", "ffn"), modulated_input=_rwkv_modulated_input)
register_model("ditk.models.rwkv.DiffusionRWKV", long_skips=_mirror_long_skips)
# DiS / Vision-Mamba blocks: the Mamba mixer is the block's only sub-module; (hidden, residual) states.
register_block("ditk.models.mamba.MambaBlock", sub_modules=("mixer",), modulated_input=_mamba_modulated_input,
               stream=_pair_stream("hidden", lambda block, args, kwargs: True))
register_model("ditk.models.dis.DiS", long_skips=_mirror_long_skips)
# Dimba: PixArt block (self-attention, cross-attention, MLP) + the layer's Mamba mixer; (x, residual) states,
# the residual None until the first layer with a Mamba block.
register_block("ditk.models.dimba.DimbaBlock", sub_modules=("attn", "cross_attn", "mlp", "mamba.mixer"),
               modulated_input=_dimba_modulated_input,
               stream=_pair_stream("x", lambda block, args, kwargs: block.mamba is not None
                                   or _arg(args, kwargs, 1, "residual") is not None))
# FluxMusic (MMDiT): the joint attention (RoPE + softmax attention over [text; music]) and the per-stream MLPs of
# the double-stream blocks (their per-stream qkv and output projections still run); a single-stream block's
# attention and MLP are one fused branch (linear1 -> attention | MLP -> linear2), cached as the method `branch`.
register_block("ditk.models.mmdit.DoubleStreamBlock", sub_modules=("attn", "img_mlp", "txt_mlp"),
               modulated_input=_double_modulated_input,
               stream=Stream(_double_in, _double_out, _double_write, shared=frozenset({3, "angles"})))
register_block("ditk.models.mmdit.SingleStreamBlock", sub_modules=("branch",), modulated_input=_single_modulated_input,
               stream=Stream(_tensor_in, _tensor_out, _tensor_write, shared=frozenset({2, "angles"})))


def sub_module_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every block's cached sub-modules, named like model.named_modules(): blocks.3.attn, blocks.3.mlp, ..."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        return []
    return [(f"blocks.{i}.{name}", module) for i, block in enumerate(blocks) for name, module in sub_modules(block)]
