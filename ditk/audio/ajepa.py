"""A-JEPA (Fei, Fan & Huang, "A-JEPA: Joint-Embedding Predictive Architecture Can Listen", arXiv 2311.15830):
I-JEPA on log-mel spectrograms, with a masking curriculum that moves from random blocks to time-frequency masks.

The spectrogram (1, n_mels, frames) is cut into p x p patches (frequency = rows, time = columns, as everywhere
in ditk). Three networks, as in I-JEPA (facebookresearch/ijepa, which this file follows: `vision_transformer.py`,
`masks/multiblock.py`, `train.py`):
  - the context encoder, a ViT with fixed 2D sin-cos positions, sees only the context patches;
  - the target encoder, an exponential moving average of the context encoder that never receives gradients,
    sees the whole spectrogram; its layer-normalised outputs at the target patches are what is predicted;
  - the predictor, a narrower ViT, reads the context tokens plus one mask token (with its position) per
    target patch and regresses the target representations, one target block at a time.
Loss: the average L2 distance between prediction and target (the paper's; `smooth_l1` is I-JEPA's code).
The target encoder follows the context encoder with momentum m going linearly from 0.996 to 1.0 over
training (I-JEPA's schedule), and the trained target encoder is the feature network (`features`), as in
I-JEPA's evaluation.

Masks (`sample_masks`), per training step, for the whole global batch:
  - random blocks (I-JEPA's multi-block): 4 target blocks of scale 0.15-0.2 and aspect ratio 0.75-1.5;
  - time-frequency aware: 3 target blocks of scale 0.05-0.075, each a time segment across every frequency or
    a frequency band across the whole clip. The paper gives the count and the scale of these blocks; their
    stripe shape is ditk's reading of "time-frequency aware" (Audio-MAE's time and frequency masking);
  - context: one block of scale 0.85-1.0 minus every target patch (at least `min_keep` patches).
Which of the two a step uses is a Bernoulli draw with P(time-frequency) = f(s) =
min(1, sqrt(s (1 - c0^2) / S) + c0^2), c0 = 0.01 (the paper's curriculum: s the step, S the total).
Scales and aspect ratios are relative to the patch grid's own shape, so that on the 8 x 64 grid of a 10 s clip a
block of scale 0.85 and aspect 1 spans 92% of each side, as it does on I-JEPA's square grids. As in I-JEPA's
collator, block sizes are drawn once per step (shared by the batch) and positions per sample, and every
context is cut to the batch's smallest context (here a random subset, not I-JEPA's first patches), so a batch
is a set of equal-length index lists.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..models.layers import Attention

MASKINGS = ("curriculum", "random-block", "time-frequency", "inverse")
LOSSES = ("l2", "smooth_l1")


#################################################################################
#                                   Encoders                                    #
#################################################################################


def sincos_pos_embed(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """Fixed 2D sin-cos position embedding (I-JEPA/MAE) of a grid_h x grid_w grid, (grid_h * grid_w, dim) float64.

    Token i = row * grid_w + col. The first half of the channels encodes the column, the second half the row
    (MAE's meshgrid puts w first); each half is [sin(pos w_k) | cos(pos w_k)], w_k = 10000^(-k / (dim / 4)).
    For a square grid this is `ditk.models.layers.get_2d_sincos_pos_embed`."""
    if dim % 4:
        raise ConfigError(f"hidden size {dim} is not a multiple of 4: the 2D sin-cos position embedding needs it")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    cols, rows = np.meshgrid(np.arange(grid_w, dtype=np.float64), np.arange(grid_h, dtype=np.float64))

    def one(pos):
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one(cols), one(rows)], axis=1)


class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, (H/p)(W/p), D), row-major over the patch grid (a p x p, stride p convolution)."""

    def __init__(self, input_size: int, frames: int, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.input_size, self.frames, self.patch_size = input_size, frames, patch_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (self.input_size, self.frames):
            raise ConfigError(f"spectrogram is {x.shape[-2]}x{x.shape[-1]} (mel bins x frames) but the model takes "
                              f"{self.input_size}x{self.frames}: set model.input_size / model.frames to the data's")
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """fc1 -> GELU (exact, as I-JEPA's nn.GELU) -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm ViT block (I-JEPA's `Block`): x + attn(norm1(x)), then x + mlp(norm2(x)). Attention is ditk's,
    with its q/k/v/out hook points."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _init_vit(module: nn.Module, blocks: nn.ModuleList, std: float = 0.02) -> None:
    """I-JEPA's initialisation: truncated normal (std 0.02) for linear and conv weights, zero biases, unit
    LayerNorms, and the residual projections of block l divided by sqrt(2 l) (`fix_init_weight`)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=std, a=-2.0, b=2.0)  # timm's trunc_normal_ cuts at +-2 (absolute)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    with torch.no_grad():
        for layer_id, block in enumerate(blocks, start=1):
            block.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
            block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (N, T, D), index (N, K) long -> (N, K, D) (I-JEPA's `apply_masks` for one mask)."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class ViTEncoder(nn.Module):
    """Patch embedding + fixed sin-cos positions + pre-norm blocks + final LayerNorm (I-JEPA's VisionTransformer,
    without a class token). `keep` (N, K) selects the tokens the blocks see (the context)."""

    def __init__(self, input_size: int, frames: int, patch_size: int, in_channels: int, dim: int, depth: int,
                 num_heads: int, mlp_ratio: float):
        super().__init__()
        self.patch_embed = PatchEmbed(input_size, frames, patch_size, in_channels, dim)
        gh, gw = input_size // patch_size, frames // patch_size
        self.register_buffer("pos_embed", torch.from_numpy(sincos_pos_embed(dim, gh, gw)).float()[None],
                             persistent=False)
        self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        _init_vit(self, self.blocks)

    def forward(self, x: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed.to(x.dtype)
        if keep is not None:
            x = gather_tokens(x, keep)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class Predictor(nn.Module):
    """I-JEPA's VisionTransformerPredictor: context tokens (projected to the predictor width, plus positions)
    followed by one mask token per target patch (plus its position) go through the blocks; the mask tokens'
    outputs, projected back to the encoder width, are the predictions."""

    def __init__(self, grid: tuple[int, int], embed_dim: int, dim: int, depth: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.predictor_embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", torch.from_numpy(sincos_pos_embed(dim, *grid)).float()[None],
                             persistent=False)
        self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.proj = nn.Linear(dim, embed_dim)
        _init_vit(self, self.blocks)
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-2.0, b=2.0)

    def forward(self, z: torch.Tensor, context: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """z (N, Kc, D) context-encoder outputs at indices `context` (N, Kc); target (N, Kt) -> (N, Kt, D)."""
        pos = self.pos_embed.to(z.dtype).expand(z.shape[0], -1, -1)
        x = self.predictor_embed(z) + gather_tokens(pos, context)
        queries = self.mask_token.to(z.dtype) + gather_tokens(pos, target)
        x = torch.cat([x, queries], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.proj(self.norm(x)[:, z.shape[1]:])


#################################################################################
#                                    A-JEPA                                     #
#################################################################################


@dataclass
class AJEPAConfig:
    input_size: int = 128  # mel bins (the height); the paper: 128
    frames: int = 1024  # time frames of one clip (the width); the paper: 10.24 s at a 10 ms hop
    patch_size: int = 16  # the paper: 16 x 16 patches
    in_channels: int = 1
    hidden_size: int = 768  # encoder width (ViT-B)
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    predictor_hidden_size: int = 512  # the paper's best predictor width (Table 6)
    predictor_depth: int = 16  # ... and depth (Table 5)
    predictor_num_heads: int = 8
    predictor_mlp_ratio: float = 4.0


class AJEPA(nn.Module):
    """Context encoder + EMA target encoder + predictor.

    `model(x, masks)` (training; masks (N, 1 + M, T) bool from `sample_masks`: row 0 the context, rows 1..M
    the target blocks) -> (predictions, targets), two lists of M tensors (N, K_m, D). `model(x)` -> the target
    encoder's token features (N, T, D); `features(x)` -> their mean over tokens (N, D), one embedding per clip.
    """

    def __init__(self, cfg: AJEPAConfig):
        super().__init__()
        p = int(cfg.patch_size)
        if cfg.input_size % p or cfg.frames % p:
            raise ConfigError(f"model.input_size {cfg.input_size} and model.frames {cfg.frames} must be multiples of "
                              f"model.patch_size {p}")
        self.in_channels, self.input_size, self.frames, self.patch_size = cfg.in_channels, cfg.input_size, cfg.frames, p
        self.grid = (cfg.input_size // p, cfg.frames // p)  # (frequency rows, time columns)
        self.num_patches = self.grid[0] * self.grid[1]
        self.latent_shape = (cfg.in_channels, cfg.input_size, cfg.frames)
        self.hidden_size = cfg.hidden_size
        self.out_channels = cfg.hidden_size  # it outputs features, not an image
        self.learn_sigma = False
        self.num_classes = 0  # unconditional: labels the data set gives are ignored
        self.encoder = ViTEncoder(cfg.input_size, cfg.frames, p, cfg.in_channels, cfg.hidden_size, cfg.depth,
                                  cfg.num_heads, cfg.mlp_ratio)
        # I-JEPA: target_encoder = copy.deepcopy(encoder); its parameters never require gradients.
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.predictor = Predictor(self.grid, cfg.hidden_size, cfg.predictor_hidden_size, cfg.predictor_depth,
                                   cfg.predictor_num_heads, cfg.predictor_mlp_ratio)

    @property
    def blocks(self) -> nn.ModuleList:
        """ditk's hook contract: the context encoder's blocks (a property, so the state dict names them once)."""
        return self.encoder.blocks

    def forward(self, x: torch.Tensor, masks: Optional[torch.Tensor] = None, **unused):
        if masks is None:
            with torch.no_grad():
                return self.target_encoder(x)
        context, targets = split_masks(masks)
        with torch.no_grad():
            h = self.target_encoder(x)
            h = F.layer_norm(h, (h.shape[-1],))  # I-JEPA normalises the targets over the feature dimension
        z = self.encoder(x, context)
        predictions = [self.predictor(z, context, target) for target in targets]
        return predictions, [gather_tokens(h, target) for target in targets]

    def parameter_report(self) -> dict:
        """Parameters of each network (`ditk presets show` prints them)."""
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return {"encoder": count(self.encoder), "target encoder": count(self.target_encoder),
                "predictor": count(self.predictor)}

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, n_mels, frames) -> (N, D): the target encoder's tokens averaged (the clip embedding)."""
        return self.target_encoder(x).mean(dim=1)

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """target <- m target + (1 - m) context encoder (I-JEPA's momentum update)."""
        for p_target, p in zip(self.target_encoder.parameters(), self.encoder.parameters()):
            p_target.mul_(momentum).add_(p.detach().to(p_target.dtype), alpha=1.0 - momentum)


def split_masks(masks: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(N, 1 + M, T) bool -> context indices (N, Kc) and M target index tensors (N, K_m), sorted. Every row
    kind must hold the same number of patches in every sample (as `sample_masks` makes them)."""
    if masks.dim() != 3 or masks.shape[1] < 2:
        raise ValueError(f"masks must be (N, 1 + M, T) with M >= 1 target blocks, got {tuple(masks.shape)}")
    return mask_indices(masks[:, 0]), [mask_indices(masks[:, k]) for k in range(1, masks.shape[1])]


def mask_indices(mask: torch.Tensor) -> torch.Tensor:
    """(N, T) bool with the same count K in every row -> (N, K) long indices in increasing order."""
    counts = mask.sum(1)
    if counts.numel() and bool((counts != counts[0]).any()):
        raise ValueError(f"every sample's mask must select the same number of patches, got {counts.tolist()}")
    return mask.nonzero()[:, 1].reshape(mask.shape[0], -1)


def jepa_loss(predictions: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], kind: str = "l2") -> torch.Tensor:
    """Per-sample loss (N,): the distance averaged over target patches and features, then over the blocks."""
    if kind not in LOSSES:
        raise ConfigError(f"unknown A-JEPA loss '{kind}': use one of {', '.join(LOSSES)}")
    terms = []
    for p, h in zip(predictions, targets):
        h = h.to(p.dtype)
        d = (p - h) ** 2 if kind == "l2" else F.smooth_l1_loss(p, h, reduction="none")
        terms.append(d.mean(dim=(1, 2)))
    return torch.stack(terms).mean(0)


#################################################################################
#                                    Masks                                      #
#################################################################################


@dataclass
class MaskConfig:
    masking: str = "curriculum"  # curriculum | random-block | time-frequency | inverse (the paper's Table 3)
    curriculum_c0: float = 0.01
    block_targets: int = 4  # random-block phase (I-JEPA's multi-block)
    block_scale: List[float] = field(default_factory=lambda: [0.15, 0.2])
    block_aspect_ratio: List[float] = field(default_factory=lambda: [0.75, 1.5])
    tf_targets: int = 3  # time-frequency phase
    tf_scale: List[float] = field(default_factory=lambda: [0.05, 0.075])
    context_scale: List[float] = field(default_factory=lambda: [0.85, 1.0])
    min_keep: int = 10  # fewest context patches (I-JEPA's configs)

    def check(self) -> "MaskConfig":
        if self.masking not in MASKINGS:
            raise ConfigError(f"unknown objective.masking '{self.masking}': use one of {', '.join(MASKINGS)}")
        for name in ("block_scale", "block_aspect_ratio", "tf_scale", "context_scale"):
            lo, hi = (float(v) for v in getattr(self, name))
            if not 0 < lo <= hi or (name != "block_aspect_ratio" and hi > 1):
                raise ConfigError(f"objective.{name} must be [low, high] with 0 < low <= high"
                                  f"{'' if name == 'block_aspect_ratio' else ' <= 1'}, got {list(getattr(self, name))}")
        if self.block_targets < 1 or self.tf_targets < 1 or self.min_keep < 1:
            raise ConfigError("objective.block_targets, tf_targets and min_keep must be >= 1")
        if not 0 <= self.curriculum_c0 <= 1:
            raise ConfigError(f"objective.curriculum_c0 must lie in [0, 1], got {self.curriculum_c0}")
        return self


def curriculum_progress(step: int, total: int, c0: float = 0.01) -> float:
    """The paper's progressing function f(s) = min(1, sqrt(s (1 - c0^2) / S) + c0^2)."""
    s = min(max(int(step), 0), max(int(total), 1))
    return min(1.0, math.sqrt(s * (1.0 - c0**2) / max(int(total), 1)) + c0**2)


def time_frequency_probability(cfg: MaskConfig, step: int, total: int) -> float:
    """P(this step uses time-frequency masks) for the configured masking."""
    f = curriculum_progress(step, total, cfg.curriculum_c0)
    return {"curriculum": f, "inverse": 1.0 - f, "random-block": 0.0, "time-frequency": 1.0}[cfg.masking]


def _uniform(lo_hi, generator) -> float:
    lo, hi = (float(v) for v in lo_hi)
    return lo + float(torch.rand((), generator=generator)) * (hi - lo)


def _block_size(grid, scale: float, aspect: float) -> tuple[int, int]:
    """(rows, cols) of a block covering `scale` of the grid with rows/H : cols/W = aspect."""
    gh, gw = grid
    h = int(round(gh * math.sqrt(scale * aspect)))
    w = int(round(gw * math.sqrt(scale / aspect)))
    return min(max(h, 1), gh), min(max(w, 1), gw)


def _rectangles(n: int, k: int, grid, size, generator) -> torch.Tensor:
    """k blocks of `size` at uniformly random positions in each of n samples: (n, k, H * W) bool."""
    (gh, gw), (h, w) = grid, size
    top = torch.randint(0, gh - h + 1, (n, k), generator=generator)
    left = torch.randint(0, gw - w + 1, (n, k), generator=generator)
    rows, cols = torch.arange(gh), torch.arange(gw)
    in_rows = (rows >= top[..., None]) & (rows < top[..., None] + h)  # (n, k, H)
    in_cols = (cols >= left[..., None]) & (cols < left[..., None] + w)  # (n, k, W)
    return (in_rows[..., :, None] & in_cols[..., None, :]).reshape(n, k, gh * gw)


def random_block_targets(n: int, grid, cfg: MaskConfig, generator) -> torch.Tensor:
    """I-JEPA's target blocks: one size per step (scale and aspect from one uniform draw, as its collator
    does), a position per sample and block. (n, block_targets, T) bool."""
    u = float(torch.rand((), generator=generator))
    scale = cfg.block_scale[0] + u * (cfg.block_scale[1] - cfg.block_scale[0])
    aspect = cfg.block_aspect_ratio[0] + u * (cfg.block_aspect_ratio[1] - cfg.block_aspect_ratio[0])
    return _rectangles(n, int(cfg.block_targets), grid, _block_size(grid, scale, aspect), generator)


def time_frequency_targets(n: int, grid, cfg: MaskConfig, generator) -> torch.Tensor:
    """Time segments across every frequency row and frequency bands across every time column, covering
    tf_scale of the grid each (at least one patch wide): (n, tf_targets, T) bool. The shape of block k
    (orientation, width) is shared by the batch, its position drawn per sample."""
    gh, gw = grid
    out = []
    for _ in range(int(cfg.tf_targets)):
        time_segment = bool(torch.rand((), generator=generator) < 0.5)
        scale = _uniform(cfg.tf_scale, generator)
        size = (gh, max(1, int(round(gw * scale)))) if time_segment else (max(1, int(round(gh * scale))), gw)
        out.append(_rectangles(n, 1, grid, size, generator))
    return torch.cat(out, dim=1)


def context_mask(targets: torch.Tensor, grid, cfg: MaskConfig, generator, tries: int = 20) -> torch.Tensor:
    """One block of context_scale (aspect 1) minus every target patch, per sample: (n, T) bool. Of `tries`
    positions drawn per sample the first leaving min_keep patches is taken (else the fullest; else, when even
    that is too small, every non-target patch). Finally every context is cut to the batch's smallest by a
    random subset, so that all samples keep the same number of patches."""
    n, num = targets.shape[0], targets.shape[-1]
    free = ~targets.any(dim=1)  # (n, T)
    size = _block_size(grid, _uniform(cfg.context_scale, generator), 1.0)
    candidates = _rectangles(n, tries, grid, size, generator) & free[:, None]  # (n, tries, T)
    counts = candidates.sum(-1)
    good = counts >= cfg.min_keep
    pick = torch.where(good.any(1), good.float().argmax(1), counts.argmax(1))
    ctx = candidates[torch.arange(n), pick]
    ctx = torch.where((ctx.sum(-1) >= cfg.min_keep)[:, None], ctx, free)
    if int(ctx.sum(-1).min()) < cfg.min_keep:
        raise ConfigError(f"the target blocks leave fewer than objective.min_keep={cfg.min_keep} context patches of "
                          f"the {grid[0]}x{grid[1]} patch grid: lower min_keep or the target scales")
    keep = int(ctx.sum(-1).min())
    scores = torch.rand(n, num, generator=generator).masked_fill(~ctx, -1.0)
    chosen = scores.topk(keep, dim=1).indices
    return torch.zeros(n, num, dtype=torch.bool).scatter_(1, chosen, True)


def sample_masks(n: int, grid, cfg: MaskConfig, step: int, total: int,
                 generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, str]:
    """Masks of one training step for n samples: ((n, 1 + M, T) bool, "random-block" | "time-frequency").

    Row 0 is the context, rows 1..M the target blocks. Everything is drawn from `generator` (CPU)."""
    grid = (int(grid[0]), int(grid[1]))
    tf = bool(torch.rand((), generator=generator) < time_frequency_probability(cfg, step, total))
    targets = (time_frequency_targets if tf else random_block_targets)(n, grid, cfg, generator)
    context = context_mask(targets, grid, cfg, generator)
    return torch.cat([context[:, None], targets], dim=1), ("time-frequency" if tf else "random-block")


def momentum_at(step: int, total: int, momentum: Sequence[float] = (0.996, 1.0)) -> float:
    """I-JEPA's momentum schedule: m_i = m0 + i (m1 - m0) / S for the i-th update (i = 0, 1, ...)."""
    m0, m1 = float(momentum[0]), float(momentum[1])
    return min(m0 + int(step) * (m1 - m0) / max(int(total), 1), max(m0, m1))
