"""FluxMusic: a Flux-style MMDiT for text-to-music by rectified flow (Fei et al. 2024, "FLUX that Plays Music";
feizc/FluxMusic `model.py`, `modules/layers.py`, `constants.py`).

The input is a spectrogram-like tensor (N, C, F, T): frequency rows, time columns (a normalised log-mel, or
AudioLDM2 VAE latents of one). It is cut into p x p patches, listed time-major, each flattened as (c, p_time,
p_freq) and linearly embedded (`img_in`), exactly FluxMusic's `rearrange(latent (time, freq), "b c (h ph)
(w pw) -> b (h w) (c ph pw)")`. Then:
  - coarse text + time drive every modulation: vec = time_in(sinusoid(t)) + vector_in(pooled text)
    (FluxMusic: CLAP's pooled embedding);
  - fine text: the encoder's token states (FluxMusic: T5-XXL) are projected (`txt_in`) and join the music
    tokens in attention;
  - m double-stream blocks: text and music tokens keep separate weights and adaLN modulations (6 each) but
    attend jointly over [text; music]; then n single-stream blocks over the concatenated sequence (fused
    qkv + MLP input, parallel attention and MLP, 3 modulations); QK-RMSNorm everywhere;
  - rotary position embedding over 3 axes (FluxMusic's ids: text (0, 0, 0); music patch (0, time, freq)),
    split across the head dimension by `axes_dim`, theta 1e4;
  - final adaLN + linear back to patches. The model predicts the rectified-flow velocity (noise - data).
Parameter names follow FluxMusic (`img_attn.qkv`, `txt_mlp.0`, `linear1`, `modulation.lin`, ...), with
its `double_blocks.i` / `single_blocks.j` stored in depth order in `blocks` (`convert_fluxmusic_state_dict`).

Differences on purpose: time t enters as ditk model time (t * 1000, `objective.time_scale`), the same number
FluxMusic's `timestep_embedding` makes from raw t; modulations and the output layer start at zero (DiT's
adaLN-Zero, so a new model is the identity and predicts 0) where FluxMusic keeps PyTorch's default init;
padding text tokens can be masked out of attention (`mask_text`; FluxMusic attends to all 256 T5 positions);
the model accepts any number of time patches (RoPE has no fixed grid), which long-clip sampling relies on.
Every attention exposes ditk's hook points on the joint sequence (`blocks.i.attn.{q,k,v,out}_hook`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import section_kwargs
from ..errors import ConfigError
from ..registry import MODELS
from .convert import count_blocks
from .layers import FinalLayer, HookPoint, timestep_embedding, xavier_init_linears

# Paper Table 1 = code `constants.build_model`: (double blocks, single blocks, width, RoPE axes_dim).
FLUXMUSIC_SIZES = {
    "small": (8, 16, 512, (8, 12, 12)),
    "base": (12, 24, 768, (16, 16, 16)),
    "large": (12, 24, 1024, (16, 24, 24)),
    "giant": (16, 32, 1408, (16, 36, 36)),
}


@dataclass
class FluxMusicConfig:
    input_size: int = 16  # frequency rows of the input: 64 mel bins / 4 (AudioLDM2 VAE) = 16
    frames: int = 256  # time columns of a training window: 1024 frames / 4 = 256 (10.24 s)
    patch_size: int = 2
    in_channels: int = 8  # AudioLDM2 VAE latent channels (1 for a raw spectrogram)
    hidden_size: int = 512
    num_heads: int = 16
    depth_double: int = 8
    depth_single: int = 16
    mlp_ratio: float = 4.0
    axes_dim: List[int] = field(default_factory=lambda: [8, 12, 12])  # must sum to hidden_size / num_heads
    theta: float = 10000.0
    qkv_bias: bool = True
    context_dim: int = 4096  # text token width (T5-XXL: 4096; MiniLM: 384)
    pooled_dim: int = 768  # pooled text width (CLAP: 768; MiniLM: 384)
    mask_text: bool = False  # leave padding text tokens out of attention (FluxMusic does not)
    class_dropout_prob: float = 0.1  # captions replaced by the empty caption in training (for CFG)
    learn_sigma: bool = False  # rectified flow needs none; true adds C variance channels (DDPM objectives)


#################################################################################
#                           Rotary position embedding                           #
#################################################################################


def rope_angles(ids: torch.Tensor, axes_dim, theta: float) -> torch.Tensor:
    """ids (L, n_axes) positions -> (L, head_dim / 2) rotation angles; axis i owns axes_dim[i] / 2 of them, with
    frequencies theta^(-2j / axes_dim[i]) (Flux's `rope`, computed in float64)."""
    out = []
    for i, d in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=ids.device) / d)
        out.append(ids[:, i].double()[:, None] * omega[None])
    return torch.cat(out, dim=-1)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs (x[2j], x[2j+1]) of x (N, H, L, head_dim) by angles (L, head_dim / 2)."""
    cos, sin = angles.cos().to(torch.float32), angles.sin().to(torch.float32)
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return rotated.reshape(x.shape).type_as(x)


#################################################################################
#                                 Building blocks                               #
#################################################################################


class MLPEmbedder(nn.Module):
    """Linear - SiLU - Linear (Flux's `MLPEmbedder`: in_layer / out_layer)."""

    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """x / rms(x) * scale over the last axis, computed in float32, eps 1e-6 (Flux)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class Modulation(nn.Module):
    """vec -> 3 (single) or 6 (double) chunks (N, 1, D): shift, scale, gate [, shift, scale, gate]."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec: torch.Tensor):
        return self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)


class StreamAttention(nn.Module):
    """One stream's attention weights in a double block: fused qkv, QK-RMSNorm, output projection."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def split(self, x: torch.Tensor):
        """(N, L, D) -> q, k, v (N, H, L, head_dim), q and k RMS-normalised."""
        n, l, d = x.shape
        q, k, v = self.qkv(x).reshape(n, l, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k = self.norm(q, k, v)
        return q, k, v


class JointAttention(nn.Module):
    """Softmax attention over a joint [text; music] sequence with RoPE, and ditk's hook points: `q_hook`,
    `k_hook` (after QK-norm and RoPE), `v_hook` (N, H, L, head_dim) and `out_hook` (N, L, D, heads merged)."""

    def __init__(self):
        super().__init__()
        self.q_hook = HookPoint()
        self.k_hook = HookPoint()
        self.v_hook = HookPoint()
        self.out_hook = HookPoint()

    def forward(self, q, k, v, angles, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        q, k = apply_rope(q, angles), apply_rope(k, angles)
        q, k, v = self.q_hook(q), self.k_hook(k), self.v_hook(v)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        n, h, l, hd = x.shape
        return self.out_hook(x.transpose(1, 2).reshape(n, l, h * hd))


def _mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden, bias=True), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim, bias=True))


class DoubleStreamBlock(nn.Module):
    """Text and music streams with their own modulation, attention weights and MLP; one joint attention."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True):
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_attn = StreamAttention(hidden_size, num_heads, qkv_bias)
        self.img_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_mlp = _mlp(hidden_size, mlp_hidden)
        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_attn = StreamAttention(hidden_size, num_heads, qkv_bias)
        self.txt_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = _mlp(hidden_size, mlp_hidden)
        self.attn = JointAttention()

    def forward(self, img, txt, vec, angles, mask=None):
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.img_mod(vec)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(vec)
        iq, ik, iv = self.img_attn.split((1 + i_scale1) * self.img_norm1(img) + i_shift1)
        tq, tk, tv = self.txt_attn.split((1 + t_scale1) * self.txt_norm1(txt) + t_shift1)
        attn = self.attn(torch.cat([tq, iq], 2), torch.cat([tk, ik], 2), torch.cat([tv, iv], 2), angles, mask)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1]:]
        img = img + i_gate1 * self.img_attn.proj(img_attn)
        img = img + i_gate2 * self.img_mlp((1 + i_scale2) * self.img_norm2(img) + i_shift2)
        txt = txt + t_gate1 * self.txt_attn.proj(txt_attn)
        txt = txt + t_gate2 * self.txt_mlp((1 + t_scale2) * self.txt_norm2(txt) + t_shift2)
        return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over [text; music]: linear1 gives q, k, v and the MLP input; attention and MLP run in parallel
    and linear2 maps their concatenation back (ViT-22B's parallel block with adaLN)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.mlp_hidden = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden, hidden_size)
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False)
        self.attn = JointAttention()

    def forward(self, x, vec, angles, mask=None):
        shift, scale, gate = self.modulation(vec)
        return x + gate * self.branch((1 + scale) * self.pre_norm(x) + shift, angles, mask)

    def branch(self, h, angles, mask=None):
        """The parallel attention + MLP branch on the modulated input h, before the gate (its own method so that
        feature caches can reuse it as DiT's attention and MLP outputs are reused)."""
        qkv, mlp = torch.split(self.linear1(h), [3 * self.hidden_size, self.mlp_hidden], dim=-1)
        n, l, _ = h.shape
        q, k, v = qkv.reshape(n, l, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = self.norm(q, k, v)
        attn = self.attn(q, k, v, angles, mask)
        return self.linear2(torch.cat([attn, self.mlp_act(mlp)], dim=2))


#################################################################################
#                                   The model                                   #
#################################################################################


class FluxMusic(nn.Module):
    """model(x (N, C, F, T), t (N,) model time, context (N, L, context_dim), context_mask (N, L) bool,
    pooled (N, pooled_dim)) -> velocity (N, C, F, T) (2C channels with learn_sigma)."""

    def __init__(self, input_size=16, frames=256, patch_size=2, in_channels=8, hidden_size=512, num_heads=16,
                 depth_double=8, depth_single=16, mlp_ratio=4.0, axes_dim=(8, 12, 12), theta=10000.0, qkv_bias=True,
                 context_dim=4096, pooled_dim=768, mask_text=False, class_dropout_prob=0.1, learn_sigma=False):
        super().__init__()
        if hidden_size % num_heads:
            raise ConfigError(f"model.hidden_size {hidden_size} is not divisible by model.num_heads {num_heads}")
        head_dim = hidden_size // num_heads
        if len(axes_dim) != 3 or sum(axes_dim) != head_dim or any(d % 2 for d in axes_dim):
            raise ConfigError(f"model.axes_dim {list(axes_dim)} must be 3 even numbers summing to hidden_size / num_heads "
                              f"= {head_dim}")
        if input_size % patch_size or frames % patch_size:
            raise ConfigError(f"model.input_size {input_size} and model.frames {frames} must be multiples of "
                              f"model.patch_size {patch_size}")
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.input_size, self.frames, self.patch_size = input_size, frames, patch_size
        self.latent_shape = (in_channels, input_size, frames)  # one training window
        self.num_classes = 0  # text-conditioned: no class table
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.axes_dim, self.theta = tuple(int(d) for d in axes_dim), float(theta)
        self.mask_text = mask_text
        self.depth_double = depth_double

        self.img_in = nn.Linear(in_channels * patch_size * patch_size, hidden_size, bias=True)
        self.time_in = MLPEmbedder(256, hidden_size)
        self.vector_in = MLPEmbedder(pooled_dim, hidden_size)
        self.txt_in = nn.Linear(context_dim, hidden_size)
        self.blocks = nn.ModuleList(
            [DoubleStreamBlock(hidden_size, num_heads, mlp_ratio, qkv_bias) for _ in range(depth_double)]
            + [SingleStreamBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth_single)]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @property
    def double_blocks(self) -> list:
        return list(self.blocks[: self.depth_double])

    @property
    def single_blocks(self) -> list:
        return list(self.blocks[self.depth_double:])

    def initialize_weights(self) -> None:
        xavier_init_linears(self)
        for emb in (self.time_in, self.vector_in):
            nn.init.normal_(emb.in_layer.weight, std=0.02)
            nn.init.normal_(emb.out_layer.weight, std=0.02)
        for block in self.blocks:
            for mod in (block.img_mod, block.txt_mod) if isinstance(block, DoubleStreamBlock) else (block.modulation,):
                nn.init.zeros_(mod.lin.weight)
                nn.init.zeros_(mod.lin.bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, F, T) -> (N, (T/p)(F/p), C p p): time-major tokens, features ordered (c, p_time, p_freq)."""
        n, c, f, t = x.shape
        p = self.patch_size
        x = x.reshape(n, c, f // p, p, t // p, p).permute(0, 4, 2, 1, 5, 3)
        return x.reshape(n, (t // p) * (f // p), c * p * p)

    def unpatchify(self, tokens: torch.Tensor, f: int, t: int) -> torch.Tensor:
        n, p, c = tokens.shape[0], self.patch_size, self.out_channels
        x = tokens.reshape(n, t // p, f // p, c, p, p).permute(0, 3, 2, 5, 1, 4)
        return x.reshape(n, c, f, t)

    def position_ids(self, text_len: int, f: int, t: int, device) -> torch.Tensor:
        """(text_len + patches, 3): text at (0, 0, 0); patch (time i, freq j) at (0, i, j)."""
        p = self.patch_size
        ti, fj = torch.meshgrid(torch.arange(t // p, device=device), torch.arange(f // p, device=device), indexing="ij")
        img = torch.stack([torch.zeros_like(ti), ti, fj], dim=-1).reshape(-1, 3)
        return torch.cat([torch.zeros(text_len, 3, dtype=img.dtype, device=device), img]).float()

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                context_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        n, c, f, w = x.shape
        p = self.patch_size
        if c != self.in_channels or f % p or w % p:
            raise ConfigError(f"input is {c}x{f}x{w} but the model takes {self.in_channels} channels and sizes that are "
                              f"multiples of the patch size {p}")
        for key, got, want in (("context_dim", context.shape[-1], self.txt_in.in_features),
                               ("pooled_dim", pooled.shape[-1], self.vector_in.in_layer.in_features)):
            if got != want:  # the conditioner's encoders decide these widths (T5-XXL 4096, CLAP 768, MiniLM 384)
                raise ConfigError(f"the text conditioner gives {got}-d {key[:-4]} vectors but model.{key}={want}: "
                                  f"set model.{key}={got}")
        img = self.img_in(self.patchify(x))
        vec = self.time_in(timestep_embedding(t, 256).to(img.dtype)) + self.vector_in(pooled.to(img.dtype))
        txt = self.txt_in(context.to(img.dtype))
        angles = rope_angles(self.position_ids(txt.shape[1], f, w, x.device), self.axes_dim, self.theta)
        mask = None
        if self.mask_text and context_mask is not None:
            keep = torch.cat([context_mask.bool(), torch.ones(n, img.shape[1], dtype=torch.bool, device=x.device)], 1)
            mask = keep[:, None, None, :]  # (N, 1, 1, L): every query sees the real text tokens and all music
        for block in self.blocks[: self.depth_double]:
            img, txt = block(img, txt, vec, angles, mask)
        seq = torch.cat([txt, img], dim=1)
        for block in self.blocks[self.depth_double:]:
            seq = block(seq, vec, angles, mask)
        img = self.final_layer(seq[:, txt.shape[1]:], vec)
        return self.unpatchify(img, f, w)

    def convert_state_dict(self, sd: dict) -> dict:
        """An official FluxMusic state dict (the `ema` dict of musicflow_*.pt) -> ditk names; a ditk state dict
        passes unchanged. `load_pretrained` calls it; see `convert_fluxmusic_state_dict`. The split point is the
        checkpoint's own number of double blocks, so a checkpoint of another size fails to load by name (with
        the fix: model.depth_double/depth_single) instead of being mis-assigned."""
        if not any(k.startswith(("double_blocks.", "single_blocks.")) for k in sd):
            return dict(sd)
        return convert_fluxmusic_state_dict(sd, depth_double=count_blocks(sd, "img_mod.lin.weight", "double_blocks"))

    def checkpoint_fields(self, sd: dict) -> dict:
        """The FluxMusicConfig fields a ditk-layout state dict determines (for load errors that name the fix).
        in_channels is read from img_in's width at this model's patch size."""
        fields = {"depth_double": count_blocks(sd, "img_mod.lin.weight"),
                  "depth_single": count_blocks(sd, "linear1.weight")}
        if (w := sd.get("img_in.weight")) is not None:  # (D, C p p)
            fields.update(hidden_size=int(w.shape[0]), in_channels=int(w.shape[1]) // self.patch_size**2)
            d = int(w.shape[0])
            if (fc := sd.get("blocks.0.img_mlp.0.weight")) is not None:
                fields["mlp_ratio"] = int(fc.shape[0]) / d
            norm = sd.get("blocks.0.img_attn.norm.query_norm.scale")
            if norm is not None and int(norm.shape[0]):
                fields["num_heads"] = d // int(norm.shape[0])
        if (txt := sd.get("txt_in.weight")) is not None:
            fields["context_dim"] = int(txt.shape[1])
        if (vec := sd.get("vector_in.in_layer.weight")) is not None:
            fields["pooled_dim"] = int(vec.shape[1])
        if fields["depth_double"]:
            fields["qkv_bias"] = "blocks.0.img_attn.qkv.bias" in sd
        if (lin := sd.get("final_layer.linear.weight")) is not None and "in_channels" in fields:
            fields["learn_sigma"] = int(lin.shape[0]) == 2 * fields["in_channels"] * self.patch_size**2
        return fields


def convert_fluxmusic_state_dict(state_dict: dict, depth_double: int) -> dict:
    """An official FluxMusic checkpoint's `ema` dict (double_blocks.i.*, single_blocks.j.*) -> ditk names
    (blocks.i.*, blocks.<depth_double + j>.*); every other key is already the same.

    The layouts agree (feizc/FluxMusic model.py / modules/layers.py): fused `qkv` split as (K=3, H, D) in both,
    QK-RMSNorm `scale`, Modulation `lin` chunks (shift, scale, gate[, shift, scale, gate]), single blocks'
    `linear1` = [q | k | v | mlp_in], LastLayer(hidden, 1, 32) whose `linear` (32, D) is ditk's p*p*C = 2*2*8 with
    the same (c, p_time, p_freq) order and (shift, scale) adaLN; img_in (D, 32). The guidance embedder is
    commented out in the official model, so there is no `guidance_in` key."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("double_blocks."):
            i, rest = key[len("double_blocks."):].split(".", 1)
            key = f"blocks.{int(i)}.{rest}"
        elif key.startswith("single_blocks."):
            j, rest = key[len("single_blocks."):].split(".", 1)
            key = f"blocks.{depth_double + int(j)}.{rest}"
        out[key] = value
    return out


@MODELS.register("fluxmusic", config=FluxMusicConfig,
                 help="FluxMusic (MMDiT: double- then single-stream blocks, RoPE, text tokens + pooled text)")
def build_fluxmusic(cfg) -> FluxMusic:
    """FluxMusic (MMDiT: double- then single-stream blocks, RoPE, text tokens + pooled text)."""
    kwargs = section_kwargs(cfg, FluxMusicConfig)
    return FluxMusic(**{**kwargs, "axes_dim": tuple(int(d) for d in kwargs["axes_dim"])})
