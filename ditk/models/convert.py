"""Load pretrained weights into a ditk DiT: official facebookresearch/DiT `.pt`, ditk `.safetensors`, diffusers.

Official checkpoints already use ditk's parameter names. diffusers' `DiTTransformer2DModel` (and the older
`Transformer2DModel` DiT configs on the Hub) is renamed as in the inverse of diffusers'
`scripts/convert_dit_to_diffusers.py`:

    pos_embed.proj                                        -> x_embedder.proj
    transformer_blocks.0.norm1.emb.timestep_embedder.linear_{1,2} -> t_embedder.mlp.{0,2}
    transformer_blocks.0.norm1.emb.class_embedder.embedding_table -> y_embedder.embedding_table
    transformer_blocks.i.norm1.linear                     -> blocks.i.adaLN_modulation.1
        (same chunk order: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp)
    transformer_blocks.i.attn1.to_{q,k,v}                 -> blocks.i.attn.qkv  (concatenated [q; k; v])
    transformer_blocks.i.attn1.to_out.0                   -> blocks.i.attn.proj
    transformer_blocks.i.ff.net.0.proj / ff.net.2         -> blocks.i.mlp.fc1 / fc2
    proj_out_1 / proj_out_2                               -> final_layer.adaLN_modulation.1 / final_layer.linear
                                                             (same (shift, scale) order)

diffusers keeps a copy of the timestep and class embedders in every block (the final layer uses block 0's);
DiT has one shared pair, so the copies must be equal. Its fixed position embedding is not in its state dict;
ditk computes it. Two numerical differences remain in diffusers' DiT port (same weights, different function):
its timestep sinusoid uses `downscale_freq_shift=1` (frequencies 10000^(-i/127) instead of DiT's 10000^(-i/128))
and its second LayerNorm uses `norm_eps` (1e-5 by default) instead of DiT's 1e-6. Loading keeps DiT's
function; `match_diffusers=True` switches both to diffusers' values to reproduce its outputs exactly.

Pickled files are only ever read with torch.load(weights_only=True): loading never runs code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import ConfigError, refused_global
from .dit import DiT, DiTConfig, build_dit
from .layers import get_2d_sincos_pos_embed

StateDict = dict[str, torch.Tensor]

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel / torch.compile wrappers


#################################################################################
#                       Official facebookresearch/DiT checkpoints               #
#################################################################################


def read_official(path: str | os.PathLike) -> StateDict:
    """State dict from a DiT-style `.pt`: a raw state dict, or a training checkpoint {"model", "ema", "opt", "args"}
    (the EMA weights are taken when present, as DiT's sample.py does)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint '{path}' does not exist: check the path")
    # DiT's train.py stores argparse.Namespace under "args"; allowing that one plain-data class is still safe.
    allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    try:
        with allow([argparse.Namespace]) if allow else contextlib.nullcontext():
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a refused global or a file that is not a torch checkpoint at all
        refused = refused_global(e)
        if refused:
            raise ConfigError(
                f"'{path}' contains a pickled {refused}, which weights_only loading refuses "
                f"(it could run code): re-save the weights as a plain state dict"
            ) from None
        reason = type(e).__name__
        raise ConfigError(f"'{path}' is not a readable PyTorch checkpoint ({reason}): check the file") from None
    return official_state_dict(obj, source=str(path))


def official_state_dict(obj, source: str = "checkpoint") -> StateDict:
    """Pick the weights out of a loaded DiT checkpoint object (prefers "ema", then "model", else the dict itself)."""
    if not isinstance(obj, Mapping):
        raise ConfigError(f"{source}: expected a state dict or a dict with 'ema'/'model', found {type(obj).__name__}")
    for key in ("ema", "model", "state_dict"):
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    sd = {}
    for name, value in obj.items():
        if not isinstance(value, torch.Tensor):
            kind = type(value).__name__
            raise ConfigError(f"{source}: entry '{name}' is a {kind}, not a tensor: not a model state dict")
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
        sd[name] = value
    return sd


#################################################################################
#                                   diffusers                                   #
#################################################################################


def dit_config_from_diffusers(config) -> DiTConfig:
    """DiTConfig equivalent to a diffusers DiTTransformer2DModel config (a dict, its FrozenDict, or the module)."""
    if isinstance(config, nn.Module):
        config = config.config
    if not isinstance(config, Mapping):
        raise ConfigError(f"expected a diffusers config mapping, found {type(config).__name__}")
    c = dict(config)
    # Defaults are DiTTransformer2DModel's, for configs that omit a key.
    checks = {
        "norm_type": ("ada_norm_zero", c.get("norm_type", "ada_norm_zero")),
        "activation_fn": ("gelu-approximate", c.get("activation_fn", "gelu-approximate")),
        "attention_bias": (True, c.get("attention_bias", True)),
        "norm_elementwise_affine": (False, c.get("norm_elementwise_affine", False)),
    }
    for key, (want, got) in checks.items():
        if got != want:
            raise ConfigError(f"diffusers config has {key}={got!r}; a DiT needs {key}={want!r}: not a DiT checkpoint")
    if c.get("num_embeds_ada_norm", 1000) is None or c.get("patch_size", 2) is None:
        raise ConfigError("diffusers config lacks num_embeds_ada_norm or patch_size: not a class-conditional DiT")
    heads = int(c.get("num_attention_heads", 16))
    in_channels = int(c.get("in_channels", 4))
    out_channels = c.get("out_channels") or in_channels
    if out_channels not in (in_channels, 2 * in_channels):
        raise ConfigError(
            f"diffusers config has out_channels={out_channels} with in_channels={in_channels}: "
            f"DiT outputs C or 2C channels"
        )
    sample_size = c.get("sample_size", 32)
    if isinstance(sample_size, (list, tuple)):
        if len(set(sample_size)) != 1:
            raise ConfigError(f"diffusers config has non-square sample_size={sample_size}: DiT needs a square input")
        sample_size = sample_size[0]
    return DiTConfig(
        input_size=int(sample_size),
        patch_size=int(c.get("patch_size", 2)),
        in_channels=in_channels,
        hidden_size=heads * int(c.get("attention_head_dim", 72)),
        depth=int(c.get("num_layers", 28)),
        num_heads=heads,
        mlp_ratio=4.0,  # BasicTransformerBlock's FeedForward: inner dim 4 * dim
        num_classes=int(c.get("num_embeds_ada_norm", 1000)),
        class_dropout_prob=0.1,  # diffusers' CombinedTimestepLabelEmbeddings fixes 0.1 (one null-label row)
        learn_sigma=out_channels == 2 * in_channels,
    )


_BLOCK_RENAMES = {
    "norm1.linear": "adaLN_modulation.1",
    "attn1.to_out.0": "attn.proj",
    "ff.net.0.proj": "mlp.fc1",
    "ff.net.2": "mlp.fc2",
}
_EMBEDDER_RENAMES = {
    "norm1.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "norm1.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "norm1.emb.class_embedder.embedding_table": "y_embedder.embedding_table",
}
_TOP_RENAMES = {
    "pos_embed.proj": "x_embedder.proj",
    "proj_out_1": "final_layer.adaLN_modulation.1",
    "proj_out_2": "final_layer.linear",
}


def diffusers_to_dit_state_dict(sd: Mapping[str, torch.Tensor], source: str = "diffusers model") -> StateDict:
    """Rename a diffusers DiT state dict to ditk/official names. `pos_embed` is not included (diffusers does not
    store it); `load_diffusers` fills it in from the model."""
    out: StateDict = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    embedders: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for name, value in sd.items():
        if name == "pos_embed.pos_embed":
            continue  # a fixed sin-cos buffer (persistent only in some configs); ditk recomputes it
        head, _, kind = name.rpartition(".")  # kind: weight | bias
        if head in _TOP_RENAMES:
            out[f"{_TOP_RENAMES[head]}.{kind}"] = value
            continue
        m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", head)
        if m is None:
            raise ConfigError(f"{source}: unexpected diffusers key '{name}': not a DiTTransformer2DModel state dict")
        i, rest = int(m.group(1)), m.group(2)
        if rest in _BLOCK_RENAMES:
            out[f"blocks.{i}.{_BLOCK_RENAMES[rest]}.{kind}"] = value
        elif rest in ("attn1.to_q", "attn1.to_k", "attn1.to_v"):
            qkv.setdefault((i, kind), {})[rest[-1]] = value
        elif rest in _EMBEDDER_RENAMES:
            embedders.setdefault(f"{_EMBEDDER_RENAMES[rest]}.{kind}", []).append((i, value))
        else:
            raise ConfigError(f"{source}: unexpected diffusers key '{name}': not a DiTTransformer2DModel state dict")
    for (i, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ConfigError(f"{source}: block {i} lacks attn1.to_{({'q', 'k', 'v'} - set(parts)).pop()}.{kind}")
        # DiT's fused qkv Linear outputs [q | k | v] along the output dimension.
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    for key, copies in embedders.items():
        copies.sort(key=lambda item: item[0])
        first_block, shared = copies[0]
        for i, value in copies[1:]:
            if value.shape != shared.shape or not torch.equal(value, shared):
                raise ConfigError(
                    f"{source}: block {i}'s {key} differs from block {first_block}'s; DiT shares one timestep/class "
                    f"embedder across blocks, so this model cannot be converted exactly"
                )
        out[key] = shared
    return out


def _load_safetensors(path: Path) -> StateDict:
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as e:
        raise ConfigError(f"'{path}' is not a readable safetensors file ({type(e).__name__}): check the file") from None


def _diffusers_folder(path: Path) -> Path:
    if (path / "config.json").is_file():
        return path
    if (path / "model_index.json").is_file() and (path / "transformer" / "config.json").is_file():
        return path / "transformer"  # a whole DiTPipeline folder
    raise ConfigError(f"'{path}' has no config.json (nor transformer/config.json): not a diffusers model folder")


def read_diffusers(path: str | os.PathLike) -> tuple[dict, StateDict]:
    """(config, state dict) of a diffusers model folder written by save_pretrained (or a DiTPipeline folder)."""
    folder = _diffusers_folder(Path(path))
    config = json.loads((folder / "config.json").read_text())
    single = folder / "diffusion_pytorch_model.safetensors"
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    pickled = folder / "diffusion_pytorch_model.bin"
    if single.is_file():
        sd = _load_safetensors(single)
    elif index.is_file():
        sd = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            sd.update(_load_safetensors(folder / shard))
    elif pickled.is_file():
        sd = read_official(pickled)
    else:
        found = sorted(p.name for p in folder.glob("diffusion_pytorch_model*.safetensors"))
        if len(found) != 1:
            raise ConfigError(
                f"'{folder}' has no diffusion_pytorch_model.safetensors: save the model with save_pretrained"
            )
        sd = _load_safetensors(folder / found[0])  # a single variant, e.g. diffusion_pytorch_model.fp16.safetensors
    return config, sd


def load_diffusers(model: DiT, source, *, match_diffusers: bool = False) -> DiT:
    """Load a diffusers DiTTransformer2DModel (module or save_pretrained folder) into `model`, in place.

    match_diffusers=True also switches the timestep frequencies and the second LayerNorm's eps to diffusers'
    values, so `model` reproduces the diffusers module's outputs (not DiT's) — for cross-checks only: these
    settings are attributes, not weights, and are not saved with the state dict.
    """
    if isinstance(source, nn.Module):
        config, sd, name = dict(source.config), source.state_dict(), type(source).__name__
    else:
        config, sd = read_diffusers(source)
        name = str(source)
    cfg = dit_config_from_diffusers(config)
    converted = diffusers_to_dit_state_dict(sd, source=name)
    # The fixed embedding for the diffusers model's own grid, so a different model.input_size is caught below.
    grid = cfg.input_size // cfg.patch_size
    converted["pos_embed"] = torch.from_numpy(get_2d_sincos_pos_embed(cfg.hidden_size, grid)).float().unsqueeze(0)
    if cfg.hidden_size == model.hidden_size and cfg.num_heads != model.num_heads:  # no weight shape reveals heads
        raise ConfigError(
            f"{name} has {cfg.num_heads} attention heads but the model {model.num_heads}: "
            f"set model.num_heads={cfg.num_heads}"
        )
    if hasattr(model, "convert_state_dict"):  # e.g. DyDiT adds its routers to a dense DiT
        converted = model.convert_state_dict(converted)
    load_state_dict_checked(model, converted, name)
    # DiT's values, or diffusers' (CombinedTimestepLabelEmbeddings: downscale_freq_shift=1; norm3 eps=norm_eps).
    model.t_embedder.freq_shift = 1.0 if match_diffusers else 0.0
    for block in model.blocks:
        block.norm2.eps = float(config.get("norm_eps", 1e-5)) if match_diffusers else 1e-6
    return model


def dit_from_diffusers(source, *, match_diffusers: bool = False) -> DiT:
    """Build a DiT with the diffusers model's config and load its weights."""
    if isinstance(source, nn.Module):
        config = source.config
    else:
        config = json.loads((_diffusers_folder(Path(source)) / "config.json").read_text())
    return load_diffusers(build_dit(dit_config_from_diffusers(config)), source, match_diffusers=match_diffusers)


#################################################################################
#                               Dispatch and checks                             #
#################################################################################


def load_pretrained(model: DiT, path: str | os.PathLike) -> DiT:
    """Load weights into `model` in place from a DiT `.pt`, a ditk `.safetensors`, or a diffusers folder."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"checkpoint '{path}' does not exist: check the path")
    if path.is_dir():
        return load_diffusers(model, path)
    if path.suffix == ".safetensors":
        sd = official_state_dict(_load_safetensors(path), source=str(path))
    elif path.suffix in PICKLE_SUFFIXES:
        sd = read_official(path)
    else:
        raise ConfigError(f"'{path}': unknown checkpoint type; use a .pt/.pth, a .safetensors or a diffusers folder")
    if any(key.startswith("transformer_blocks.") for key in sd):  # a diffusers state dict in a single file
        sd = diffusers_to_dit_state_dict(sd, source=str(path))
        sd["pos_embed"] = model.pos_embed.detach().clone()
    if hasattr(model, "convert_state_dict"):  # a family whose official key names differ (e.g. DiT-MoE)
        sd = model.convert_state_dict(sd)
    load_state_dict_checked(model, sd, str(path))
    return model


def load_initial_weights(model: nn.Module, source: str | os.PathLike) -> nn.Module:
    """`train.init_from`: the weights a fresh run starts from, in place — a ditk run or checkpoint folder (its EMA
    weights), an official `.pt`, a `.safetensors` or a diffusers folder, converted by the model family
    (`convert_state_dict`: official key names; a DyDiT adds its routers to a dense DiT)."""
    from ..runs import load_weights, resolve_checkpoint

    path = Path(source)
    if not path.exists():
        raise ConfigError(f"train.init_from '{source}' does not exist: pass a ditk run, one of its checkpoints or a weights file")
    if not ((path / "config.yaml").is_file() or (path / "state.pt").is_file()):
        return load_pretrained(model, path)
    _, ckpt = resolve_checkpoint(path)
    sd = load_weights(ckpt, "ema")
    if hasattr(model, "convert_state_dict"):
        sd = model.convert_state_dict(sd)
    load_state_dict_checked(model, sd, str(ckpt))
    return model


def load_state_dict_checked(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str) -> None:
    """model.load_state_dict(sd, strict=True), but a mismatch is one ConfigError line: the key and the fix."""
    expected = model.state_dict()
    shape = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if shape or missing or unexpected:
        if shape:
            k = shape[0]
            have, want = tuple(sd[k].shape), tuple(expected[k].shape)
            problem = f"'{k}' has shape {have} in the checkpoint but {want} in the model"
        elif missing:
            problem = f"the checkpoint lacks '{missing[0]}'" + _more(missing)
        else:
            problem = f"the checkpoint has unexpected '{unexpected[0]}'" + _more(unexpected)
        raise ConfigError(f"{source}: {problem}; fix: {_suggest_fix(model, expected, sd)}")
    model.load_state_dict(sd, strict=True)


def _more(keys: list[str]) -> str:
    return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""


def dit_fields_from_state_dict(sd: Mapping[str, torch.Tensor]) -> dict:
    """The DiTConfig fields that a DiT state dict determines (all but num_heads, which weights do not record).

    The label table has num_classes + 1 rows when there is a null label; this assumes there is (DiT's default).
    """
    w = sd["x_embedder.proj.weight"]  # (D, C, p, p)
    hidden_size, in_channels, patch_size = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    fields = {"hidden_size": hidden_size, "in_channels": in_channels, "patch_size": patch_size}
    if "pos_embed" in sd:
        fields["input_size"] = math.isqrt(int(sd["pos_embed"].shape[1])) * patch_size
    depths = [int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))]
    if depths:
        fields["depth"] = max(depths) + 1
    if "blocks.0.mlp.fc1.weight" in sd:
        fields["mlp_ratio"] = sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden_size
    if "y_embedder.embedding_table.weight" in sd:
        fields["num_classes"] = int(sd["y_embedder.embedding_table.weight"].shape[0]) - 1
    if "final_layer.linear.weight" in sd:
        out_channels = int(sd["final_layer.linear.weight"].shape[0]) // patch_size**2
        fields["learn_sigma"] = out_channels == 2 * in_channels
    return fields


def _suggest_fix(model: nn.Module, expected: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor]) -> str:
    # A family whose state dict reveals its config differently (DiS, Diffusion-RWKV, Dimba, FluxMusic) says how
    # with a `checkpoint_fields(sd) -> {config field: value}` method; DiT's rule is the default.
    fields = getattr(model, "checkpoint_fields", None) or dit_fields_from_state_dict
    try:
        want, have = fields(sd), fields(expected)
    except (KeyError, IndexError):
        return "the checkpoint is not a DiT state dict; check the path and model.name"
    diff = [f"model.{k}={_yaml(v)}" for k, v in want.items() if k in have and have[k] != v]
    if not diff:
        return "build the model with the checkpoint's config (same size, patch size and channels)"
    return "set " + ", ".join(diff) + " to match the checkpoint"


def _yaml(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


#################################################################################
#           Official checkpoints of the U-ViT families (DiS, Diffusion-RWKV)     #
#################################################################################


def is_official_uvit(sd: Mapping[str, torch.Tensor]) -> bool:
    """True for a feizc/DiS or feizc/Diffusion-RWKV state dict (`in_blocks.i`, `mid_block`, `out_blocks.i`)."""
    return any(k.startswith(("in_blocks.", "mid_block.", "out_blocks.")) for k in sd)


def official_uvit_to_ditk(sd: Mapping[str, torch.Tensor], renames: tuple[tuple[str, str], ...]) -> StateDict:
    """Keys of a feizc/DiS or feizc/Diffusion-RWKV state dict -> ditk's: the U-ViT stack, kept there as
    `in_blocks.i`, `mid_block`, `out_blocks.i`, becomes one `blocks` list in forward order (in_blocks.i ->
    blocks.i, mid_block -> blocks.n, out_blocks.i -> blocks.n+1+i, n = the checkpoint's number of in blocks), and
    the top-level prefixes in `renames` (official, ditk) are replaced. The tensors are the same objects (both
    codes build the same layers); a key matching no rule passes unchanged, so load_state_dict_checked names it."""
    n_in = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"in_blocks\.(\d+)\.", k))), default=-1)
    out: StateDict = {}
    for key, value in sd.items():
        if m := re.match(r"in_blocks\.(\d+)\.(.*)", key):
            key = f"blocks.{int(m.group(1))}.{m.group(2)}"
        elif key.startswith("mid_block."):
            key = f"blocks.{n_in}.{key[len('mid_block.'):]}"
        elif m := re.match(r"out_blocks\.(\d+)\.(.*)", key):
            key = f"blocks.{n_in + 1 + int(m.group(1))}.{m.group(2)}"
        else:
            for old, new in renames:
                if key.startswith(old):
                    key = new + key[len(old):]
                    break
        out[key] = value
    return out


def count_blocks(sd: Mapping[str, torch.Tensor], suffix: str, prefix: str = "blocks") -> int:
    """How many distinct `prefix.i.` indices carry a key ending in `suffix`."""
    pattern = re.compile(rf"{re.escape(prefix)}\.(\d+)\.{re.escape(suffix)}$")
    return len({m.group(1) for k in sd if (m := pattern.match(k))})
