"""Layers shared by every ditk backbone (DiT now; DiT-MoE, DiS, RWKV, Dimba, MMDiT later).

The math and the parameter names follow facebookresearch/DiT `models.py` (which takes PatchEmbed,
Attention and Mlp from timm), so official checkpoints load with strict=True. Attention is written out
here (instead of imported from timm) to expose hook points: identity submodules whose standard torch
forward hooks can read or replace q, k, v and the attention output (see `ditk.hooks`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (N, T, D) normalised tokens; shift, scale (N, D) from the conditioning."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class HookPoint(nn.Identity):
    """A named place in the forward pass. It computes nothing; forward hooks on it read or replace the value."""


#################################################################################
#                     Patch, timestep, label and position embeddings            #
#################################################################################


class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, T, D) tokens, T = (H/p)(W/p), row-major over the patch grid (as timm's PatchEmbed)."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int, bias: bool = True):
        super().__init__()
        self.input_size = input_size
        self.patch_size = patch_size
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size**2
        # A p x p convolution with stride p is a Linear applied to each flattened patch.
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] != self.input_size or x.shape[-1] != self.input_size:
            raise ConfigError(
                f"input is {x.shape[-2]}x{x.shape[-1]} but the model was built for "
                f"{self.input_size}x{self.input_size}: set model.input_size to the (latent) resolution of the data"
            )
        return self.proj(x).flatten(2).transpose(1, 2)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, freq_shift: float = 0.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) times t (N,) -> (N, dim), [cos | sin] halves.

    Frequencies are max_period^(-i / (half - freq_shift)), i = 0..half-1. freq_shift=0 is GLIDE/DiT's formula;
    diffusers' DiT port uses freq_shift=1 (its `Timesteps(..., downscale_freq_shift=1)`), which gives
    slightly different frequencies for the same weights.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / (half - freq_shift))
    args = t[:, None].float() * freqs.to(t.device)[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepEmbedder(nn.Module):
    """t (N,) -> (N, D): a fixed 256-d sinusoid followed by Linear-SiLU-Linear (names mlp.0 / mlp.2 as in DiT)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, freq_shift: float = 0.0):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size
        # Not a parameter: 0 reproduces DiT; ditk.models.convert sets 1 only to mimic diffusers' DiT exactly.
        self.freq_shift = freq_shift

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = timestep_embedding(t, self.frequency_embedding_size, freq_shift=self.freq_shift)
        # The sinusoid is always computed in fp32; cast so a bf16/fp16 model works without autocast.
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels (N,) long -> (N, D). Row `num_classes` is the null label used for classifier-free guidance.

    Unlike DiT's LabelEmbedder there is no random label dropout inside forward: the training loop replaces
    labels by `num_classes` with its own seeded generator, so a run is reproducible across process counts.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = int(dropout_prob > 0)  # one extra row for the null label
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


def xavier_init_linears(module: nn.Module) -> None:
    """Every nn.Linear inside `module`: xavier-uniform weight, zero bias (ViT/MAE's init, which DiT and the seed
    papers' official codes apply to the whole model before their special cases). Linears are visited in
    registration order, as `module.apply` visits them, so seeded initialisations are unchanged."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """Fixed 2D sin-cos position embedding (MAE/DiT), float64 array (grid_size**2, embed_dim).

    Token i = row*grid_size + col. The first half of the channels encodes the column, the second half the
    row (DiT's meshgrid puts w first); each half is [sin(pos*w_k) | cos(pos*w_k)], w_k = 10000^(-k/(D/4)).
    """
    if embed_dim % 4:
        raise ConfigError(f"hidden size {embed_dim} is not a multiple of 4: the 2D sin-cos position embedding needs it")
    grid_h = np.arange(grid_size, dtype=np.float64)
    grid_w = np.arange(grid_size, dtype=np.float64)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0)  # here w goes first
    emb_a = _1d_sincos(embed_dim // 2, grid[0].reshape(-1))  # column index
    emb_b = _1d_sincos(embed_dim // 2, grid[1].reshape(-1))  # row index
    return np.concatenate([emb_a, emb_b], axis=1)


def _1d_sincos(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # (D/2,)
    out = np.einsum("m,d->md", pos, omega)  # (M, D/2), outer product
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


#################################################################################
#                           Attention, MLP, final layer                         #
#################################################################################


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm's layout and names: `qkv`, `proj`).

    Hook points: `q_hook`, `k_hook`, `v_hook` see (N, heads, T, head_dim) after the qkv split;
    `out_hook` sees the attention output (N, T, heads * head_dim) before the output projection.

    `head_dim` given: `num_heads` heads of that width, which need not fill `dim` (a head-pruned block keeps the
    source's head width but fewer heads: qkv (dim -> 3 * heads * head_dim), proj (heads * head_dim -> dim)).
    Default: head_dim = dim / num_heads, timm's layout.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, head_dim: int | None = None):
        super().__init__()
        if head_dim is None:
            if dim % num_heads:
                raise ConfigError(f"hidden size {dim} is not divisible by num_heads {num_heads}: pick a divisor")
            head_dim = dim // num_heads
        if num_heads < 1:
            raise ConfigError(f"an attention layer needs at least 1 head, not {num_heads}")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.inner_dim = num_heads * head_dim  # = dim unless heads were pruned
        self.qkv = nn.Linear(dim, self.inner_dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(self.inner_dim, dim)
        self.q_hook = HookPoint()
        self.k_hook = HookPoint()
        self.v_hook = HookPoint()
        self.out_hook = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        # qkv output channels are [q | k | v], each split into heads of head_dim (timm / diffusers layout).
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k, v = self.q_hook(q), self.k_hook(k), self.v_hook(v)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v
        x = self.out_hook(x.transpose(1, 2).reshape(n, t, self.inner_dim))
        return self.proj(x)


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2 (timm's Mlp names; DiT uses the tanh approximation)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + Linear to p*p*out_channels values per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def unpatchify(x: torch.Tensor, patch_size: int, channels: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """(N, T, p*p*C) -> (N, C, h*p, w*p); each token's values are ordered (p_row, p_col, C) as in DiT.

    grid (h, w) defaults to a square grid.
    """
    if grid is None:
        h = w = int(round(x.shape[1] ** 0.5))
    else:
        h, w = grid
    assert h * w == x.shape[1], f"{x.shape[1]} tokens do not form a {h}x{w} grid"
    p = patch_size
    x = x.reshape(x.shape[0], h, w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], channels, h * p, w * p)


class WideTimestepEmbedder(TimestepEmbedder):
    """t (N,) -> (N, D) through a `frequency_embedding_size` sinusoid and Linear-SiLU-Linear with a hidden layer
    of its own width (U-ViT style, as DiS: a D-dim sinusoid and a 4D hidden layer). Same names (mlp.0, mlp.2)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int, mlp_hidden_size: int):
        nn.Module.__init__(self)
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, mlp_hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(mlp_hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size
        self.freq_shift = 0.0


class CrossAttention(nn.Module):
    """Multi-head attention of tokens x (N, T, D) to a context (N, L, D_ctx) (PixArt's MultiHeadCrossAttention
    layout: `q_linear`, `kv_linear` (fused [k | v]), `proj`), with an optional key mask (N, L) bool, True = attend.

    Hook points as in `Attention`: `q_hook`, `k_hook`, `v_hook` see (N, heads, T or L, head_dim), `out_hook`
    the attention output (N, T, D) before `proj`. A sample whose mask is all False gets a zero output.
    """

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"hidden size {dim} is not divisible by num_heads {num_heads}: pick a divisor")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_linear = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv_linear = nn.Linear(context_dim or dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.q_hook = HookPoint()
        self.k_hook = HookPoint()
        self.v_hook = HookPoint()
        self.out_hook = HookPoint()

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        n, t, d = x.shape
        q = self.q_linear(x).reshape(n, t, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv_linear(context).reshape(n, context.shape[1], 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = self.q_hook(q), self.k_hook(kv[0]), self.v_hook(kv[1])
        attn_mask, empty = None, None
        if mask is not None:
            mask = mask.to(device=x.device, dtype=torch.bool)
            empty = ~mask.any(dim=1)  # (N,): nothing to attend to
            attn_mask = (mask | empty[:, None])[:, None, None, :]  # (N, 1, 1, L), broadcast over heads and queries
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        if empty is not None:
            out = out.masked_fill(empty[:, None, None, None], 0.0)
        out = self.out_hook(out.transpose(1, 2).reshape(n, t, d))
        return self.proj(out)
