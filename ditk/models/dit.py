"""DiT: diffusion transformer with adaLN-Zero blocks (Peebles & Xie 2023; facebookresearch/DiT models.py).

Same math, initialisation and parameter names as the official code, so `DiT-XL-2-256x256.pt` loads with
strict=True. Differences on purpose: label dropout is done by the training loop (no randomness in forward),
attention is `ditk.models.layers.Attention` (SDPA + hook points), and CFG lives in `ditk.sampling`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch
import torch.nn as nn

from ..config import section_kwargs
from ..errors import ConfigError
from ..registry import MODELS
from .layers import (
    Attention,
    FinalLayer,
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    get_2d_sincos_pos_embed,
    modulate,
    unpatchify,
    xavier_init_linears,
)

# Named sizes from the paper (Table 1): (depth, hidden_size, num_heads). Patch size is chosen separately.
DIT_SIZES = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}


@dataclass
class DiTConfig:
    input_size: int = 32  # latent (or pixel) height = width
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000  # 0 = unconditional: no label embedding, no `y`
    class_dropout_prob: float = 0.1  # > 0 adds the null-label row used for classifier-free guidance
    learn_sigma: bool = True  # output 2C channels: eps (or velocity) then the variance interpolation
    # Attention heads per block (a head-pruned model, `ditk prune prune.method=heads`); empty = num_heads in every
    # block. The head width stays hidden_size / num_heads, so a block with fewer heads has narrower qkv / proj.
    block_heads: List[int] = field(default_factory=list)


def dit_size_config(size: str, patch_size: int = 2, **overrides) -> DiTConfig:
    """DiTConfig for a named size, e.g. dit_size_config("XL", 2) is DiT-XL/2."""
    if size not in DIT_SIZES:
        raise ConfigError(f"unknown DiT size '{size}': choose one of {', '.join(DIT_SIZES)}")
    depth, hidden_size, num_heads = DIT_SIZES[size]
    return DiTConfig(patch_size=patch_size, depth=depth, hidden_size=hidden_size, num_heads=num_heads, **overrides)


def check_block_heads(block_heads, depth: int) -> list[int]:
    """`model.block_heads` as a list of ints: empty, or one head count >= 1 per block."""
    heads = [int(h) for h in (block_heads or [])]
    if heads and len(heads) != depth:
        raise ConfigError(f"model.block_heads has {len(heads)} entries but model.depth={depth}: give one head count "
                          "per block, or [] for model.num_heads everywhere")
    if any(h < 1 for h in heads):
        raise ConfigError(f"model.block_heads={heads}: every block needs at least 1 attention head")
    return heads


class DiTBlock(nn.Module):
    """Attention and MLP, each wrapped in adaLN-Zero: x + gate * f(modulate(norm(x), shift, scale)).

    `attn` / `mlp` replace DiT's attention and GELU MLP by another token mixer or feed-forward module
    (DiT-MoE passes a sparse mixture of experts) while keeping the block's adaLN-Zero wiring and names.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0,
                 attn: nn.Module | None = None, mlp: nn.Module | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = attn if attn is not None else Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = mlp if mlp is not None else Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class DiT(nn.Module):
    """Diffusion model with a transformer backbone.

    model(x (N, C, H, W), t (N,), y (N,) long) -> (N, out_channels, H, W), out_channels = 2C if learn_sigma else C.
    num_classes=0 builds an unconditional DiT: no label embedder (so no `y_embedder.*` parameters), c = t_emb.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        block_heads: list[int] | None = None,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ConfigError(f"model.input_size {input_size} is not a multiple of model.patch_size {patch_size}")
        if num_classes < 0:
            raise ConfigError(f"model.num_classes={num_classes}: use the number of classes, or 0 for an unconditional model")
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.input_size = input_size
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.mlp_ratio = mlp_ratio
        self.block_heads = check_block_heads(block_heads, depth)
        if self.block_heads and hidden_size % num_heads:
            raise ConfigError(f"hidden size {hidden_size} is not divisible by num_heads {num_heads}: pick a divisor")

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        # Unconditional (num_classes=0): no label table at all, as in Diffusion-RWKV's unconditional release.
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
        # Fixed sin-cos embedding; a (frozen) Parameter rather than a buffer so the official state dict loads.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)

        self.blocks = nn.ModuleList([self.make_block(i) for i in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def heads_of(self, index: int) -> int:
        """Attention heads of block `index` (num_heads unless the model was head-pruned)."""
        return self.block_heads[index] if self.block_heads else self.num_heads

    def make_block(self, index: int) -> nn.Module:
        """Block `index` of the stack; variants (DiT-MoE) override this and reuse everything else."""
        heads = self.heads_of(index)
        if heads == self.num_heads:  # the usual block (timm's Attention layout)
            return DiTBlock(self.hidden_size, self.num_heads, mlp_ratio=self.mlp_ratio)
        attn = Attention(self.hidden_size, heads, qkv_bias=True, head_dim=self.hidden_size // self.num_heads)
        return DiTBlock(self.hidden_size, heads, mlp_ratio=self.mlp_ratio, attn=attn)

    def initialize_weights(self) -> None:
        # Transformer linears: xavier-uniform weights, zero biases (as in ViT/MAE).
        xavier_init_linears(self)

        # Position embedding: fixed 2D sin-cos computed in float64, stored in the parameter dtype.
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.x_embedder.grid_size)
        with torch.no_grad():
            self.pos_embed.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))

        # Patch embedding: initialise the conv like the nn.Linear it is (xavier over the flattened patch).
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        # Label embedding table and timestep MLP weights: N(0, 0.02).
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: zero the modulation of every block, so each block starts as the identity (gates = 0)...
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)

        # ...and zero the output layer, so a freshly built model predicts exactly 0.
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*out_channels) -> (N, out_channels, H, W)."""
        return unpatchify(x, self.patch_size, self.out_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, C, H, W) inputs or latents; t (N,) model time; y (N,) labels, `num_classes` = null label
        (ignored by an unconditional model)."""
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D), T = H * W / patch_size ** 2
        c = self.t_embedder(t)  # (N, D)
        if self.y_embedder is not None:
            if y is None:
                raise ConfigError("this DiT is class-conditional: pass y (use num_classes as the null label)")
            c = c + self.y_embedder(y)
        for block in self.blocks:
            x = block(x, c)  # (N, T, D)
        x = self.final_layer(x, c)  # (N, T, patch_size ** 2 * out_channels)
        return self.unpatchify(x)  # (N, out_channels, H, W)


@MODELS.register("dit", config=DiTConfig, help="DiT (adaLN-Zero diffusion transformer, Peebles & Xie 2023)")
def build_dit(cfg) -> DiT:
    """DiT (adaLN-Zero diffusion transformer, Peebles & Xie 2023)."""
    return DiT(**section_kwargs(cfg, DiTConfig))
