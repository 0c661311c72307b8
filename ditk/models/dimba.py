"""Dimba: text-to-image diffusion with interleaved Transformer and Mamba layers (Fei et al. 2024, "Dimba:
Transformer-Mamba Diffusion Models"; feizc/Dimba diffusion/model/nets/dimba.py, a PixArt-alpha code base).

Each layer is a PixArt block - self-attention, cross-attention to the caption tokens, MLP, with adaLN-single
modulation (one global t_block(t) + a learned per-block table) - followed by a bidirectional Mamba block
("v2", RMSNorm pre-norm, its own residual stream) in every layer when mamba_ratio = 1 (the paper's models),
or after every 1/mamba_ratio-th layer. As in the official forward, what the next attention block receives is
the Mamba block's output and the Mamba residual stream carries on separately; the final layer (PixArt's
T2IFinalLayer) reads the last layer's output.

Text: `context` (N, L, caption_channels) token features of a frozen text encoder (the `text` conditioner:
MiniLM by default, T5-v1.1-XXL for the paper's models), projected by an MLP to the model width, with
`context_mask` (N, L) marking real tokens (PixArt packs variable-length captions with a block-diagonal
mask; here a key-padding mask). Caption dropout for classifier-free guidance is the training loop's: it
swaps in the conditioner's empty caption with probability `class_dropout_prob`.

`model.blocks` holds one entry per layer: (x, residual, t0, y, mask) -> (x, residual); the Mamba block of
layer i is `blocks[i].mamba` (None in layers without one). Hook points: `attn.{q,k,v,out}_hook`,
`cross_attn.{q,k,v,out}_hook`, `mamba.mixer.out_hook`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from ..config import section_kwargs
from ..errors import ConfigError
from ..registry import MODELS
from .layers import Attention, CrossAttention, Mlp, PatchEmbed, TimestepEmbedder, unpatchify, xavier_init_linears
from .convert import count_blocks
from .mamba import SCAN_BACKENDS, DropPath, Mamba, MambaBlock, mamba_fields, rescale_prenorm_residual_

# Named sizes of the official code (Dimba_L_2, Dimba_G_2): (depth, hidden size, heads).
DIMBA_SIZES = {
    "L": (28, 1152, 16),
    "G": (40, 1408, 16),
}


@dataclass
class DimbaConfig:
    input_size: int = 64  # latent height = width (512 px / 8)
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28  # attention layers
    num_heads: int = 16
    mlp_ratio: float = 4.0
    mamba_ratio: float = 1.0  # Mamba blocks per layer: 1 = after every layer (the paper), 1/k = every k-th
    caption_channels: int = 4096  # width of the text encoder's token features (T5-v1.1-XXL 4096, MiniLM 384)
    d_state: int = 16
    expand: int = 2
    d_conv: int = 4
    dt_rank: int = 0  # 0 = ceil(hidden_size / 16)
    pe_interpolation: float = 1.0  # sin-cos positions divided by this (official: 1 at 512 px, 2 at 1024, 4 at 2048)
    learn_sigma: bool = True
    class_dropout_prob: float = 0.1  # caption dropout (the empty caption) for classifier-free guidance
    num_classes: int = 0  # classes of a labelled data set, captioned by the text conditioner (0: none)
    drop_path: float = 0.0
    scan_backend: str = "auto"  # auto (CUDA: mamba_ssm when installed, else Triton; CPU: compiled C++ scan when a compiler is there) | torch | compiled | mamba_ssm | triton


def dimba_size_config(size: str, **overrides) -> DimbaConfig:
    """DimbaConfig for a named size: "L" (Dimba-L/2) or "G" (Dimba-G/2)."""
    if size not in DIMBA_SIZES:
        raise ConfigError(f"unknown Dimba size '{size}': choose one of {', '.join(DIMBA_SIZES)}")
    depth, hidden_size, num_heads = DIMBA_SIZES[size]
    return DimbaConfig(depth=depth, hidden_size=hidden_size, num_heads=num_heads, **overrides)


def mamba_positions(depth: int, mamba_ratio: float) -> list[int]:
    """Layers followed by a Mamba block: all when the ratio is 1, else every layer i with i % gap == 1, gap =
    depth // int(ratio * depth) (the official rule)."""
    count = int(mamba_ratio * depth)
    if count < 1 or mamba_ratio > 1:
        raise ConfigError(f"model.mamba_ratio={mamba_ratio} gives {count} Mamba blocks for depth {depth}: "
                          "use a ratio in (0, 1]")
    gap = depth // count
    positions = list(range(depth)) if gap == 1 else [i for i in range(depth) if i % gap == 1]
    if len(positions) != count:
        raise ConfigError(f"model.mamba_ratio={mamba_ratio} with depth {depth} does not interleave evenly "
                          f"({len(positions)} slots for {count} Mamba blocks): use 1 or 1/k with k dividing depth")
    return positions


def sincos_pos_embed(embed_dim: int, grid_size: int, pe_interpolation: float = 1.0) -> np.ndarray:
    """PixArt's 2D sin-cos embedding (grid_size**2, D) at positions arange(grid) / pe_interpolation; the first half
    of the channels encodes the column, the second the row (equal to DiT's for pe_interpolation = 1)."""
    if embed_dim % 4:
        raise ConfigError(f"hidden size {embed_dim} is not a multiple of 4: the 2D sin-cos position embedding needs it")
    pos = np.arange(grid_size, dtype=np.float64) / pe_interpolation
    cols, rows = np.meshgrid(pos, pos)  # token i = row * grid + col

    def one_d(p):
        omega = 1.0 / 10000 ** (np.arange(embed_dim // 4, dtype=np.float64) / (embed_dim / 4))
        out = np.outer(p.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(cols), one_d(rows)], axis=1)


def t2i_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN-single: shift, scale (N, 1, D) broadcast over tokens."""
    return x * (1 + scale) + shift


class CaptionEmbedder(nn.Module):
    """Caption token features (N, L, caption_channels) -> (N, L, D): PixArt's y_proj, an MLP with GELU(tanh).
    PixArt's `y_embedding` buffer (its null caption) is not kept: the conditioner's empty caption is the null."""

    def __init__(self, caption_channels: int, hidden_size: int):
        super().__init__()
        self.y_proj = Mlp(caption_channels, hidden_size, hidden_size)

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        return self.y_proj(caption)


class T2IFinalLayer(nn.Module):
    """PixArt's final layer: LayerNorm, shift/scale = learned table (2, D) + t, Linear to p*p*out_channels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        return self.linear(t2i_modulate(self.norm_final(x), shift, scale))


class DimbaBlock(nn.Module):
    """One Dimba layer: PixArt block (self-attn, cross-attn, MLP; adaLN-single) then, if present, a Mamba block.

    forward(x, residual, t0, y, mask) -> (x, residual); t0 (N, 6D) is the global t_block(t), y (N, L, D) the
    projected caption, mask (N, L) bool. Without a Mamba block the residual passes through unchanged.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 mamba: MambaBlock | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.drop_path = DropPath(drop_path)
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)
        self.mamba = mamba

    def forward(self, x, residual, t0, y, mask=None):
        n, _, d = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t0.reshape(n, 6, d)).chunk(6, dim=1)  # each (N, 1, D)
        x = x + self.drop_path(gate_msa * self.attn(t2i_modulate(self.norm1(x), shift_msa, scale_msa)))
        x = x + self.cross_attn(x, y, mask)
        x = x + self.drop_path(gate_mlp * self.mlp(t2i_modulate(self.norm2(x), shift_mlp, scale_mlp)))
        if self.mamba is not None:
            x, residual = self.mamba(x, residual)
        return x, residual


class Dimba(nn.Module):
    """model(x (N, C, H, W), t (N,), context (N, L, caption_channels), context_mask (N, L), pooled=None)
    -> (N, out_channels, H, W). `pooled` (the conditioner's sentence embedding) is accepted and unused, as in
    the official model."""

    def __init__(self, input_size: int = 64, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, mamba_ratio: float = 1.0,
                 caption_channels: int = 4096, d_state: int = 16, expand: int = 2, d_conv: int = 4,
                 dt_rank: int = 0, pe_interpolation: float = 1.0, learn_sigma: bool = True,
                 class_dropout_prob: float = 0.1, num_classes: int = 0, drop_path: float = 0.0,
                 scan_backend: str = "auto"):
        super().__init__()
        if input_size % patch_size:
            raise ConfigError(f"model.input_size {input_size} is not a multiple of model.patch_size {patch_size}")
        if scan_backend not in SCAN_BACKENDS:
            raise ConfigError(f"unknown model.scan_backend '{scan_backend}': use one of {', '.join(SCAN_BACKENDS)}")
        if pe_interpolation <= 0:
            raise ConfigError("model.pe_interpolation must be > 0")
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.input_size, self.patch_size, self.hidden_size = input_size, patch_size, hidden_size
        self.learn_sigma, self.num_classes = learn_sigma, num_classes
        self.caption_channels, self.pe_interpolation = caption_channels, pe_interpolation

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size)
        # Fixed sin-cos positions, recomputed from the config (the official code drops them from checkpoints too).
        self.register_buffer("pos_embed", torch.zeros(1, self.x_embedder.num_patches, hidden_size), persistent=False)

        positions = mamba_positions(depth, mamba_ratio)
        self.mamba_depth = len(positions)
        attn_rates = _linspace(drop_path, depth)
        mamba_rates = _linspace(drop_path, self.mamba_depth)

        def mamba_block(j):
            mixer = Mamba(hidden_size, d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank or None,
                          bidirectional=True, scan_backend=scan_backend)
            return MambaBlock(hidden_size, mixer, drop_path=mamba_rates[j])

        self.blocks = nn.ModuleList([
            DimbaBlock(hidden_size, num_heads, mlp_ratio, drop_path=attn_rates[i],
                       mamba=mamba_block(positions.index(i)) if i in positions else None)
            for i in range(depth)
        ])
        self.final_layer = T2IFinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official order: PixArt's init of every Linear (Mamba's included), then mamba_ssm's rescaling."""
        xavier_init_linears(self)  # this zeroes Mamba's dt_proj bias too, as the official init does
        pos = sincos_pos_embed(self.hidden_size, self.x_embedder.grid_size, self.pe_interpolation)
        with torch.no_grad():
            self.pos_embed.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for linear in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.t_block[1],
                       self.y_embedder.y_proj.fc1, self.y_embedder.y_proj.fc2):
            nn.init.normal_(linear.weight, std=0.02)
        for block in self.blocks:  # cross-attention starts as a no-op
            nn.init.constant_(block.cross_attn.proj.weight, 0)
            nn.init.constant_(block.cross_attn.proj.bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)
        # mamba_ssm's _init_weights over the whole model (n_layer = number of Mamba blocks): every `out_proj` and
        # `fc2` weight (the Mamba outputs and all MLP outputs, the caption MLP's included) re-drawn
        # kaiming-uniform / sqrt(n_layer); Linear biases zero.
        rescale_prenorm_residual_(self, n_layer=self.mamba_depth, names=("out_proj.weight", "fc2.weight"))

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        return unpatchify(x, self.patch_size, self.out_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor | None = None, pooled: torch.Tensor | None = None) -> torch.Tensor:
        if context.shape[-1] != self.caption_channels:
            raise ConfigError(f"the text encoder gives {context.shape[-1]}-dim token features but model.caption_channels="
                              f"{self.caption_channels}: set model.caption_channels={context.shape[-1]}")
        x = self.x_embedder(x) + self.pos_embed.to(x.dtype)  # (N, T, D)
        t_emb = self.t_embedder(t)  # (N, D)
        t0 = self.t_block(t_emb)  # (N, 6D), shared by all blocks
        y = self.y_embedder(context.to(self.y_embedder.y_proj.fc1.weight.dtype))  # (N, L, D)
        residual = None
        for block in self.blocks:
            x, residual = block(x, residual, t0, y, context_mask)
        return self.unpatchify(self.final_layer(x, t_emb))

    def convert_state_dict(self, sd: dict) -> dict:
        """A feizc/Dimba state dict (`state_dict` of dimba-l-512.pt) -> ditk names; a ditk state dict passes
        unchanged. `load_pretrained` calls it; see `convert_official_state_dict`."""
        if "pos_embed" in sd or "y_embedder.y_embedding" in sd or any(k.startswith("mamba_blocks.") for k in sd):
            return convert_official_state_dict(sd, self)
        return dict(sd)

    @staticmethod
    def checkpoint_fields(sd: dict) -> dict:
        """The DimbaConfig fields a ditk-layout Dimba state dict determines (for load errors that name the fix)."""
        fields = {}
        if (w := sd.get("x_embedder.proj.weight")) is not None:  # (D, C, p, p)
            d, c, p = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
            fields.update(hidden_size=d, in_channels=c, patch_size=p)
            if (lin := sd.get("final_layer.linear.weight")) is not None:
                fields["learn_sigma"] = int(lin.shape[0]) == 2 * c * p * p
            if (fc1 := sd.get("blocks.0.mlp.fc1.weight")) is not None:
                fields["mlp_ratio"] = int(fc1.shape[0]) / d
        if (cap := sd.get("y_embedder.y_proj.fc1.weight")) is not None:
            fields["caption_channels"] = int(cap.shape[1])
        depth = count_blocks(sd, "scale_shift_table")
        if depth:
            fields["depth"] = depth
            # Mamba blocks already placed in layers, or still under their official name (an index beyond the model's)
            n_mamba = count_blocks(sd, "mamba.norm.weight") + count_blocks(sd, "norm.weight", prefix="mamba_blocks")
            fields["mamba_ratio"] = n_mamba / depth
        placed = sorted(k for k in sd if re.fullmatch(r"blocks\.\d+\.mamba\.norm\.weight", k))
        if placed:
            fields.update(mamba_fields(sd, placed[0][: -len("norm.weight")] + "mixer."))
        return fields


def _linspace(end: float, n: int) -> list[float]:
    """torch.linspace(0, end, n) as floats, without allocating (works under a meta-device context)."""
    return [0.0] if n == 1 else [end * i / (n - 1) for i in range(n)]


def convert_official_state_dict(state_dict: dict, model: Dimba) -> dict:
    """feizc/Dimba checkpoint keys -> this model's.

    - `mamba_blocks.j.*` becomes `blocks.<layer of Mamba j>.mamba.*`: the official forward runs mamba_blocks[i]
      after layer i when gap = depth // mamba_depth is 1, else mamba_blocks[i // gap] after every layer with
      i % gap == 1 (`mamba_positions` lists those layers). A Mamba index beyond the model's keeps its official
      name, so the load names it as unexpected.
    - the fixed buffers are dropped: `pos_embed` (the official forward recomputes the sin-cos table every call,
      and its own inference script deletes it) and `y_embedder.y_embedding` (PixArt's fixed random null caption,
      used only by training-time caption dropout; sampling uses the encoded empty prompt, as ditk's conditioner does).
    Everything else has the same name, shape and layout in both codes (PixArt blocks: fused timm `attn.qkv`,
    `cross_attn.q_linear` + fused `kv_linear` [k | v], adaLN-single `scale_shift_table` (6, D) with the same
    chunk order; Vision Mamba "v2" mixers with A_log; RMSNorm weights)."""
    layers = [i for i, block in enumerate(model.blocks) if block.mamba is not None]
    out = {}
    for key, value in state_dict.items():
        if key in ("pos_embed", "y_embedder.y_embedding"):
            continue
        m = re.match(r"mamba_blocks\.(\d+)\.(.*)", key)
        if m and int(m.group(1)) < len(layers):
            key = f"blocks.{layers[int(m.group(1))]}.mamba.{m.group(2)}"
        out[key] = value
    return out


@MODELS.register("dimba", config=DimbaConfig,
                 help="Dimba (Transformer + bidirectional-Mamba layers, text cross-attention, Fei et al. 2024)")
def build_dimba(cfg) -> Dimba:
    """Dimba (Transformer + bidirectional-Mamba layers, text cross-attention, Fei et al. 2024)."""
    return Dimba(**section_kwargs(cfg, DimbaConfig))
