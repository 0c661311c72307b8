"""DiS: diffusion with a state-space (Mamba) backbone (Fei et al. 2024, "Scalable Diffusion Models with State
Space Backbone"; feizc/DiS models_dis.py).

Time, class label and noisy patches are all tokens: [label, time, patch_1 .. patch_T] + a learned position
embedding, run through bidirectional Mamba blocks laid out as a U-ViT: depth//2 "in" blocks, a middle block
and depth//2 "out" blocks, each out block first merging the output of its mirror in block through a long
skip Linear(2D -> D). A final RMSNorm, then DiT's final layer (adaLN from time + label tokens), and the extra
tokens are dropped.

With num_classes=0 the model is unconditional, as the official code with num_classes=-1: no label token
(tokens [time, patch_1 .. patch_T]) and a final layer without adaLN (LayerNorm, Linear).

`model.blocks` holds the depth + 1 blocks in execution order (in, mid, out). Each block maps
(hidden, residual[, skip]) -> (hidden, residual) (see `ditk.models.mamba.MambaBlock`); a forward hook on
`blocks.i` sees that pair, and the model state after block i is residual + hidden. Each mixer has an
`out_hook` hook point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import section_kwargs
from ..errors import ConfigError
from ..registry import MODELS
from .layers import FinalLayer, LabelEmbedder, PatchEmbed, WideTimestepEmbedder, unpatchify
from .convert import count_blocks, is_official_uvit, official_uvit_to_ditk
from .mamba import SCAN_BACKENDS, DropPath, Mamba, MambaBlock, mamba_fields, rescale_prenorm_residual_

# Named sizes of the official code (DiS_models): (depth argument, hidden size); blocks = depth + 1.
DIS_SIZES = {
    "S": (24, 368),
    "B": (24, 768),
    "M": (48, 768),
    "L": (48, 1024),
    "H": (48, 1536),
}


@dataclass
class DiSConfig:
    input_size: int = 32  # latent (or pixel) height = width
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 768
    depth: int = 24  # the official depth argument (even): depth/2 in blocks + 1 middle + depth/2 out blocks
    d_state: int = 16  # Mamba state size per channel
    expand: int = 2  # d_inner = expand * hidden_size
    d_conv: int = 4  # causal depthwise conv width
    dt_rank: int = 0  # 0 = ceil(hidden_size / 16)
    num_classes: int = 1000  # 0 = unconditional (official num_classes=-1): no label token, no adaLN in the final layer
    class_dropout_prob: float = 0.1  # > 0 adds the null-label row used for classifier-free guidance
    learn_sigma: bool = True
    drop_path: float = 0.0  # stochastic depth, linear 0 -> drop_path over the blocks (official default 0.1)
    skip: bool = True  # the long skip connections between mirrored in/out blocks
    scan_backend: str = "auto"  # auto (CUDA: mamba_ssm when installed, else Triton; CPU: compiled C++ scan when a compiler is there) | torch | compiled | mamba_ssm | triton


def dis_size_config(size: str, patch_size: int = 2, **overrides) -> DiSConfig:
    """DiSConfig for a named size, e.g. dis_size_config("H", 2) is DiS-H/2."""
    if size not in DIS_SIZES:
        raise ConfigError(f"unknown DiS size '{size}': choose one of {', '.join(DIS_SIZES)}")
    depth, hidden_size = DIS_SIZES[size]
    return DiSConfig(patch_size=patch_size, depth=depth, hidden_size=hidden_size, **overrides)


class DiS(nn.Module):
    """model(x (N, C, H, W), t (N,), y (N,) long) -> (N, out_channels, H, W)."""

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 768,
                 depth: int = 24, d_state: int = 16, expand: int = 2, d_conv: int = 4, dt_rank: int = 0,
                 num_classes: int = 1000, class_dropout_prob: float = 0.1, learn_sigma: bool = True,
                 drop_path: float = 0.0, skip: bool = True, scan_backend: str = "auto"):
        super().__init__()
        if input_size % patch_size:
            raise ConfigError(f"model.input_size {input_size} is not a multiple of model.patch_size {patch_size}")
        if depth < 2 or depth % 2:
            raise ConfigError(f"model.depth={depth}: DiS needs an even depth >= 2 "
                              "(depth/2 in blocks, 1 middle, depth/2 out)")
        if num_classes < 0:
            raise ConfigError(f"model.num_classes={num_classes}: use the number of classes, or 0 for an unconditional "
                              "model (the official code's -1)")
        if scan_backend not in SCAN_BACKENDS:
            raise ConfigError(f"unknown model.scan_backend '{scan_backend}': use one of {', '.join(SCAN_BACKENDS)}")
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.input_size, self.patch_size, self.hidden_size = input_size, patch_size, hidden_size
        self.learn_sigma, self.num_classes = learn_sigma, num_classes
        self.extras = 2 if num_classes > 0 else 1  # [label token,] time token

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        # Time token: a D-dim sinusoid through Linear(D, 4D) - SiLU - Linear(4D, D) (official `time_embed`).
        self.t_embedder = WideTimestepEmbedder(hidden_size, hidden_size, 4 * hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
        # Learned, zero-initialised position embedding over [label, time, patches] (official).
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + self.x_embedder.num_patches, hidden_size))

        self.num_in = depth // 2
        n_blocks = depth + 1
        # official: linspace(0, drop_path, depth), shifted by one block
        rates = [0.0] + [drop_path * i / (depth - 1) for i in range(depth)]

        def mixer():
            return Mamba(hidden_size, d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank or None,
                         bidirectional=True, scan_backend=scan_backend)

        self.blocks = nn.ModuleList([
            MambaBlock(hidden_size, mixer(), drop_path=rates[i], skip=skip and i > self.num_in)
            for i in range(n_blocks)
        ])
        self.drop_path = DropPath(drop_path)
        self.norm_f = nn.RMSNorm(hidden_size, eps=1e-5)
        # The official unconditional head has no adaLN: its final layer sees no condition at all.
        self.final_layer = (FinalLayer(hidden_size, patch_size, self.out_channels) if num_classes > 0
                            else PlainFinalLayer(hidden_size, patch_size, self.out_channels))
        # mamba_ssm's init over the whole model (as the official code applies it): zero Linear biases but dt_proj's,
        # N(0, 0.02) label table, out_proj re-drawn and divided by sqrt(depth). Everything else keeps PyTorch's
        # default init; the final layer is not zeroed (unlike DiT).
        rescale_prenorm_residual_(self, n_layer=depth)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        return unpatchify(x, self.patch_size, self.out_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, C, H, W); t (N,) model time; y (N,) labels, `num_classes` = null label (unconditional: none)."""
        patches = self.x_embedder(x)  # (N, T, D)
        time_token = self.t_embedder(t).to(patches.dtype)  # (N, D)
        if self.y_embedder is None:  # unconditional: [time, patches]; y (if any) is ignored
            label_token = None
            hidden = torch.cat([time_token[:, None], patches], dim=1) + self.pos_embed
        else:
            if y is None:
                raise ConfigError("this DiS is class-conditional: pass y (use num_classes as the null label)")
            label_token = self.y_embedder(y).to(patches.dtype)  # (N, D)
            hidden = torch.cat([label_token[:, None], time_token[:, None], patches], dim=1) + self.pos_embed
        residual, skips = None, []
        for i, block in enumerate(self.blocks):
            if i < self.num_in:
                hidden, residual = block(hidden, residual)
                skips.append(hidden)  # the mixer output (not the residual sum) feeds the mirrored out block
            elif i == self.num_in:
                hidden, residual = block(hidden, residual)
            else:
                hidden, residual = block(hidden, residual, skip=skips.pop())
        hidden = self.norm_f(residual + self.drop_path(hidden))
        if label_token is None:
            out = self.final_layer(hidden)  # (N, extras + T, p*p*out_channels)
        else:
            out = self.final_layer(hidden, time_token + label_token)
        return self.unpatchify(out[:, self.extras:])

    def convert_state_dict(self, sd: dict) -> dict:
        """A feizc/DiS state dict -> ditk names (a ditk state dict passes unchanged); `load_pretrained` calls it.

        Both codes build the same layers (the Mamba mixers are Vision Mamba's `bimamba_type="v2"` with the same
        names and shapes, A stored as A_log = log(-A) in both, conv1d weights (d_inner, 1, d_conv), RMSNorm
        without bias), so only the names of the containers differ:

            patch_embed.proj             -> x_embedder.proj
            time_embed.0 / time_embed.2  -> t_embedder.mlp.0 / t_embedder.mlp.2
            label_emb.embedding_table    -> y_embedder.embedding_table   (absent in unconditional checkpoints)
            in_blocks.i, mid_block, out_blocks.i -> blocks.i, blocks.depth/2, blocks.depth/2+1+i
            pos_embed, norm_f, final_layer.*     unchanged (unconditional: no final_layer.adaLN_modulation)
        """
        if not is_official_uvit(sd):
            return dict(sd)
        return official_uvit_to_ditk(sd, DIS_OFFICIAL_RENAMES)

    @staticmethod
    def checkpoint_fields(sd: dict) -> dict:
        """The DiSConfig fields a ditk-layout DiS state dict determines (for load errors that name the fix)."""
        fields = {}
        if (w := sd.get("x_embedder.proj.weight")) is not None:  # (D, C, p, p)
            d, c, p = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
            fields.update(hidden_size=d, in_channels=c, patch_size=p)
            table = sd.get("y_embedder.embedding_table.weight")
            if (pos := sd.get("pos_embed")) is not None:  # [label, time, patches], unconditional [time, patches]
                extras = 2 if table is not None else 1
                fields["input_size"] = math.isqrt(max(int(pos.shape[1]) - extras, 0)) * p
            if (lin := sd.get("final_layer.linear.weight")) is not None:
                fields["learn_sigma"] = int(lin.shape[0]) == 2 * c * p * p
        if (n_blocks := count_blocks(sd, "norm.weight")) > 0:  # a DiS state dict at all
            table = sd.get("y_embedder.embedding_table.weight")
            fields["num_classes"] = int(table.shape[0]) - 1 if table is not None else 0  # with the null-label row
            fields["depth"] = n_blocks - 1
            fields["skip"] = count_blocks(sd, "skip_linear.weight") > 0
        fields.update(mamba_fields(sd, "blocks.0.mixer."))
        return fields


class PlainFinalLayer(nn.Module):
    """The official unconditional DiS head (`FinalLayer(condition=False)`): LayerNorm without affine, then
    Linear to p*p*out_channels values per token; no adaLN. Same names as `FinalLayer` minus adaLN_modulation."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm_final(x))


# Top-level names of feizc/DiS models_dis.py (`DisModel`) -> ditk's; the block stack is handled by
# `official_uvit_to_ditk`.
DIS_OFFICIAL_RENAMES = (
    ("patch_embed.", "x_embedder."),
    ("time_embed.0.", "t_embedder.mlp.0."),
    ("time_embed.2.", "t_embedder.mlp.2."),
    ("label_emb.", "y_embedder."),
)


@MODELS.register("dis", config=DiSConfig, help="DiS (bidirectional-Mamba U-ViT diffusion backbone, Fei et al. 2024)")
def build_dis(cfg) -> DiS:
    """DiS (bidirectional-Mamba U-ViT diffusion backbone, Fei et al. 2024)."""
    return DiS(**section_kwargs(cfg, DiSConfig))
