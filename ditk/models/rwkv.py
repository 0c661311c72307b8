"""Diffusion-RWKV: bidirectional RWKV blocks for diffusion (Fei et al. 2024, arXiv 2404.04478).

Architecture read from feizc/Diffusion-RWKV `models_drwkv.py` (HEAD d1b43f2), which builds on
OpenGVLab/Vision-RWKV ("Bi-RWKV"); the code here is ours, with the official sub-module names kept inside a
block (`att`, `ffn`, `ln0/ln1/ln2`, `spatial_decay`, ...), so a state-dict conversion is a key rename.

- Tokens: patchify + a 2D sin-cos position embedding that, unlike DiT, is *trainable*.
- Conditioning: adaLN-Zero, c = t_emb + y_emb (no condition tokens), as DiT; shared embedders and final
  layer from `ditk.models.layers`, plus the official final LayerNorm `norm_f` before the final layer.
- Layout (U-ViT style): `depth` blocks = depth//2 "in" blocks, one "mid" block, depth//2 "out" blocks; each
  out block first fuses a long skip from the mirrored in block, Linear(concat(h, skip), 2D -> D). All
  blocks live, in forward order, in `model.blocks` (the hook point for caching/pruning).
- Block: x += gate1 * SpatialMix(modulate(LN1 x)); x += gate2 * ChannelMix(modulate(LN2 x)).
  * Token shift "q_shift": channel quarters are shifted one pixel right/left/down/up on the h x w patch
    grid, then mixed with the unshifted tokens by learned per-channel mu (RWKV's token shift, in 2D).
  * SpatialMix: k, v, r = Linear(mix_k/v/r(x)); out = Linear(sigmoid(r) * BiWKV(k, v)).
  * ChannelMix: out = sigmoid(Linear_r(x_r)) * Linear_v(relu(Linear_k(x_k))^2), hidden width 4D.
- Bi-WKV (Vision-RWKV's bidirectional WKV with w = spatial_decay / T, u = spatial_first / T):

      y_t = (sum_{i != t} e^{-(|t-i|-1) w + k_i} v_i + e^{u + k_t} v_t)
            / (sum_{i != t} e^{-(|t-i|-1) w + k_i}     + e^{u + k_t})

  The official op is a CUDA kernel (fp32, T <= 1024). `bi_wkv` below computes it exactly in plain PyTorch
  in a chunked, parallel form whose time and memory are linear in T (see its docstring); no loop over tokens.
  On CUDA with Triton installed a fused forward kernel (`_rwkv_triton.py`) is used for inference when
  `model.wkv_impl` allows it; it is never required.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import section_kwargs
from ..errors import ConfigError
from ..registry import MODELS
from . import _cpu_kernels
from .convert import count_blocks, is_official_uvit, official_uvit_to_ditk
from .layers import (
    FinalLayer,
    HookPoint,
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    get_2d_sincos_pos_embed,
    modulate,
    unpatchify,
    xavier_init_linears,
)

# Named sizes of the official code (`DRWKV_models`): (blocks, hidden size); each with patch 2 or 4.
DRWKV_SIZES = {
    "S": (13, 384),
    "B": (25, 384),
    "M": (25, 512),
    "L": (37, 768),
    "H": (37, 1024),
}
WKV_IMPLS = ("auto", "torch", "compiled", "triton")
INIT_MODES = ("fancy", "local", "global")


@dataclass
class DiffusionRWKVConfig:
    input_size: int = 32  # latent (or pixel) height = width
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1024
    depth: int = 37  # number of Bi-RWKV blocks, odd: depth//2 in, 1 mid, depth//2 out (long skips)
    mlp_ratio: float = 4.0  # ChannelMix hidden width = mlp_ratio * hidden_size (official `hidden_rate`)
    num_classes: int = 1000  # 0 = unconditional (no label embedding; `y` is ignored)
    class_dropout_prob: float = 0.1  # > 0 adds the null-label row used for classifier-free guidance
    learn_sigma: bool = True
    shift_pixel: int = 1  # q_shift distance in patches (0 disables the token shift)
    channel_gamma: float = 0.25  # fraction of channels shifted in each of the 4 directions
    init_mode: str = "fancy"  # RWKV init of decay/first/mix: fancy | local | global
    skip: bool = True  # U-ViT long skips into the out blocks (the paper's layout)
    drop_path_rate: float = 0.0  # stochastic depth, linear 0 -> rate over blocks (official default 0.1)
    # auto: a fused inference kernel (Triton on CUDA, compiled C++ on CPU) when available, else torch
    wkv_impl: str = "auto"  # auto | torch | compiled | triton


def drwkv_size_config(size: str, patch_size: int = 2, **overrides) -> DiffusionRWKVConfig:
    """DiffusionRWKVConfig for a named size, e.g. drwkv_size_config("H", 2) is DRWKV-H/2."""
    if size not in DRWKV_SIZES:
        raise ConfigError(f"unknown Diffusion-RWKV size '{size}': choose one of {', '.join(DRWKV_SIZES)}")
    depth, hidden = DRWKV_SIZES[size]
    return DiffusionRWKVConfig(patch_size=patch_size, depth=depth, hidden_size=hidden, **overrides)


#################################################################################
#                               Bidirectional WKV                               #
#################################################################################


def _prefix_sums(x: torch.Tensor, dim: int, backward: bool):
    """(sum_{j' < j} x, or sum_{j' > j} x when backward; and the total) along dim. x holds terms <= 1 (times v)
    relative to a maximum term of 1 (see bi_wkv), so the subtraction loses at most ~eps * L against it."""
    inclusive = torch.cumsum(x, dim)
    total = inclusive.narrow(dim, x.shape[dim] - 1, 1).clone()
    # in place on the cumsum's output (autograd keeps nothing of it), so no second full-size tensor
    return (inclusive.neg_().add_(total) if backward else inclusive.sub_(x)), total


def _chunk_carry(m: torch.Tensor, z: torch.Tensor, lw: torch.Tensor, backward: bool):
    """Sum over the other chunks c (before c', or after c' when backward) of e^{m_c - |c'-c| L w} Z_c.

    m (B, N, C) chunk log-scales; z (B, N, C, 2) chunk sums (numerator, denominator) relative to them;
    lw = L * w (C,). Returns (log-scale R (B, N, 1, C), sums (B, N, 1, C, 2)). The N x N chunk-to-chunk
    weights are stabilised row by row (like a log-sum-exp), so no chunk far from the maximum can overflow.
    """
    n = m.shape[1]
    idx = torch.arange(n, device=m.device)
    dist = (idx[:, None] - idx[None, :]).to(m.dtype)  # c' - c
    if backward:
        dist = -dist
    mask = torch.zeros_like(dist).masked_fill_(dist <= 0, float("-inf"))  # only chunks strictly before (after)
    # Laid out (B, C, N', N) so the combination below is one contiguous batched matmul.
    logits = m.transpose(1, 2)[:, :, None, :] - dist * lw[:, None, None] + mask
    # Row maxima; a row with no valid chunk (the first chunk) is -inf and is floored so its weights are 0.
    r = logits.amax(dim=3, keepdim=True).clamp_min(-1e30).detach()  # (B, C, N', 1)
    sums = torch.matmul(torch.exp(logits - r), z.permute(0, 2, 1, 3))  # (B, C, N', 2)
    return r.permute(0, 2, 3, 1), sums.permute(0, 2, 1, 3).unsqueeze(2)


def _wkv_half(k, v, w, jw, size: int, backward: bool):
    """One direction of the Bi-WKV for chunked k, v (B, N, L, C): (numerator, denominator, log-scale).

    Forward (sources i < t): token t = c'L + j gets e^{-(j-1) w} [in-chunk exclusive prefix sum of
    e^{k_i + j' w} v_i + carry of the earlier chunks]; backward (i > t) mirrors it with e^{(j+1) w} and
    e^{k_i - j' w}. The in-chunk part is relative to the detached chunk maximum, the carry to its own row
    maximum; both are merged per chunk at the larger of the two scales.
    """
    e = k - jw if backward else k + jw
    with torch.no_grad():
        m = e.amax(dim=2, keepdim=True)  # (B, N, 1, C)
    p = e.sub_(m).exp_()  # in place: e is needed for nothing else (keeps one full-size temporary less)
    pv = p * v
    num, tot_num = _prefix_sums(pv, 2, backward)
    den, tot_den = _prefix_sums(p, 2, backward)
    r, carry = _chunk_carry(m[:, :, 0], torch.stack([tot_num[:, :, 0], tot_den[:, :, 0]], -1), size * w, backward)
    m_all = torch.maximum(m, r)
    e_in, e_carry = torch.exp(m - m_all), torch.exp(r - m_all)  # (B, N, 1, C): per chunk
    num = torch.addcmul(e_carry * carry[..., 0], e_in, num)
    den = torch.addcmul(e_carry * carry[..., 1], e_in, den)
    return num, den, (m_all + jw if backward else m_all - jw) + w


def bi_wkv(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Bidirectional WKV (Vision-RWKV / Diffusion-RWKV), exact, in a chunked parallel form.

    w, u: (C,) per-channel decay and bonus (already divided by T, as the official code passes them);
    k, v: (B, T, C). Returns y (B, T, C) in v's dtype (computed in at least float32, like the official op):

        y_t = (sum_{i != t} e^{-(|t-i|-1) w + k_i} v_i + e^{u + k_t} v_t) / (same with v = 1)

    Algorithm: split T into N chunks of L ~ sqrt(T) tokens. The forward half (i < t) factorises as
    e^{-(t-1-i) w} = e^{-(j-1) w} e^{j' w} e^{-(c'-c) L w} for token t = c'L + j, i = cL + j', so
      * inside a chunk it is an exclusive cumulative sum of e^{k_i + j' w} v_i (j' < L keeps e^{j' w} tame),
      * across chunks it is an N x N lower-triangular combination of the chunk totals;
    the backward half (i > t) is the mirror image, and the diagonal term is elementwise. Time and memory are
    O(B T C) for N ~ L ~ sqrt(T) (the N x N chunk matrix has ~T entries per channel), with no loop over
    tokens. Every exponential is taken relative to a detached running maximum (per chunk, and per row of
    the chunk matrix) and all parts are merged at a common per-token scale, so large keys or decays never
    overflow; the maxima cancel exactly in value and gradient, so autograd gives the exact gradient.
    """
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"k and v must both be (B, T, C), got {tuple(k.shape)} and {tuple(v.shape)}")
    bsz, t_len, chans = k.shape
    out_dtype = v.dtype
    dtype = torch.promote_types(k.dtype, torch.float32)
    w, u, k, v = w.to(dtype), u.to(dtype), k.to(dtype), v.to(dtype)

    size = int(chunk) if chunk else math.isqrt(max(t_len - 1, 0)) + 1  # ceil(sqrt(T))
    n = -(-t_len // size)
    pad = n * size - t_len
    if pad:  # padded keys are -inf: weight e^{-inf} = 0, and every chunk keeps >= 1 real token
        k = F.pad(k, (0, 0, 0, pad), value=float("-inf"))
        v = F.pad(v, (0, 0, 0, pad))
    k = k.view(bsz, n, size, chans)
    v = v.view(bsz, n, size, chans)
    jw = torch.arange(size, device=k.device, dtype=dtype)[:, None] * w  # (L, C): j w

    # Each half on its own (its temporaries are freed before the other starts), then the token itself with
    # the bonus u, all merged at a common per-token scale.
    fwd_num, fwd_den, s_fwd = _wkv_half(k, v, w, jw, size, backward=False)
    bwd_num, bwd_den, s_bwd = _wkv_half(k, v, w, jw, size, backward=True)
    s_self = u + k
    with torch.no_grad():
        scale = torch.maximum(torch.maximum(s_fwd, s_bwd), s_self)
    # fused in place where autograd allows it: one full-size tensor per line instead of three to five
    e_f, e_b, e_s = (s_fwd - scale).exp_(), (s_bwd - scale).exp_(), (s_self - scale).exp_()
    num = (e_s * v).addcmul_(e_f, fwd_num).addcmul_(e_b, bwd_num)
    den = torch.addcmul(e_s, e_f, fwd_den).addcmul_(e_b, bwd_den)
    y = (num / den).reshape(bsz, n * size, chans)[:, :t_len]
    return y.to(out_dtype)


def bi_wkv_flops(batch: int, tokens: int, channels: int) -> int:
    """The paper's analytic count for one Bi-WKV: FLOPs = 13 * T * D per sample (Diffusion-RWKV, Sec. 3)."""
    return 13 * batch * tokens * channels


class BiWKV(nn.Module):
    """Holds no weights: it dispatches the Bi-WKV to a fused inference kernel or the PyTorch form.

    A module of its own so profilers (and `benchmarks/bench_backbones.py`) can attribute its cost.
    """

    def __init__(self, impl: str = "auto"):
        super().__init__()
        if impl not in WKV_IMPLS:
            raise ConfigError(f"unknown model.wkv_impl '{impl}': choose one of {', '.join(WKV_IMPLS)}")
        self.impl = impl

    def _kernel(self, k: torch.Tensor, needs_grad: bool):
        """The fused forward to use, or None for the PyTorch form. auto: the compiled C++ loop on CPU (when a
        C++ compiler is there) and the Triton kernel on CUDA (when Triton imports), for forwards without
        gradients; compiled / triton: the same, but an error where it cannot run; torch: never. Forwards that
        need gradients always use the PyTorch form (the kernels have no backward)."""
        if self.impl == "torch":
            return None
        if k.device.type == "cpu":
            if self.impl == "triton":
                raise ConfigError("model.wkv_impl=triton needs a CUDA device: use model.wkv_impl=auto or torch")
            from . import _wkv_cpu

            if _wkv_cpu.library() is None:
                if self.impl == "compiled":
                    raise ConfigError("model.wkv_impl=compiled could not build its CPU kernel ("
                                      f"{_cpu_kernels.error(_wkv_cpu.NAME) or 'DITK_CPU_KERNELS=0'}): install a C++ "
                                      "compiler (g++) or use model.wkv_impl=auto or torch")
                return None
            return None if needs_grad else _wkv_cpu.bi_wkv_cpu
        if k.device.type != "cuda" or self.impl == "compiled":
            if self.impl != "auto":
                raise ConfigError(f"model.wkv_impl={self.impl} cannot run on {k.device.type}: use auto or torch")
            return None
        from . import _rwkv_triton

        if not _rwkv_triton.available():
            if self.impl == "triton":
                raise ConfigError("model.wkv_impl=triton but Triton is not installed: install it or use auto")
            return None
        return None if needs_grad else _rwkv_triton.bi_wkv_triton

    def forward(self, w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (w, u, k, v))
        kernel = self._kernel(k, needs_grad)
        return bi_wkv(w, u, k, v) if kernel is None else kernel(w, u, k, v)


#################################################################################
#                        Token shift, spatial mix, channel mix                  #
#################################################################################


def q_shift(x: torch.Tensor, grid: tuple[int, int], shift_pixel: int = 1, gamma: float = 0.25) -> torch.Tensor:
    """Quad-directional token shift (Vision-RWKV): (B, T, C) tokens on an h x w grid (row-major).

    Channel quarter 0 takes the value of the token `shift_pixel` to its left (shift right), quarter 1 of the
    token to its right, quarter 2 of the token above, quarter 3 of the token below; outside the grid is 0.
    Channels beyond 4 * int(C * gamma) are not shifted.
    """
    bsz, t_len, chans = x.shape
    h, w = grid
    s = shift_pixel
    g = int(chans * gamma)
    x = x.view(bsz, h, w, chans)
    out = torch.zeros_like(x)
    out[:, :, s:, 0:g] = x[:, :, : w - s, 0:g]
    out[:, :, : w - s, g : 2 * g] = x[:, :, s:, g : 2 * g]
    out[:, s:, :, 2 * g : 3 * g] = x[:, : h - s, :, 2 * g : 3 * g]
    out[:, : h - s, :, 3 * g : 4 * g] = x[:, s:, :, 3 * g : 4 * g]
    out[..., 4 * g :] = x[..., 4 * g :]
    return out.view(bsz, t_len, chans)


def _mix_ramp(n_embd: int) -> torch.Tensor:
    """i / C for channel i, shaped (1, 1, C): the base of RWKV's 'fancy' token-mix init."""
    return (torch.arange(n_embd, dtype=torch.float32) / n_embd).view(1, 1, n_embd)


class SpatialMix(nn.Module):
    """RWKV time mixing over the patch grid: q_shift, k/v/r projections, Bi-WKV, receptance gate, output.

    Hook points (identity modules, like `ditk.models.layers.Attention`): `k_hook`, `v_hook` see the (B, T, C)
    keys and values entering the WKV; `out_hook` sees sigmoid(r) * wkv before the output projection.
    """

    def __init__(self, n_embd: int, n_layer: int, layer_id: int, grid: tuple[int, int], shift_pixel: int = 1,
                 channel_gamma: float = 0.25, init_mode: str = "fancy", wkv_impl: str = "auto"):
        super().__init__()
        self.n_embd, self.grid = n_embd, grid
        self.shift_pixel, self.channel_gamma = shift_pixel, channel_gamma
        self._init_mix(n_embd, n_layer, layer_id, init_mode)
        self.key = nn.Linear(n_embd, n_embd, bias=False)
        self.value = nn.Linear(n_embd, n_embd, bias=False)
        self.receptance = nn.Linear(n_embd, n_embd, bias=False)
        self.output = nn.Linear(n_embd, n_embd, bias=False)
        self.wkv = BiWKV(wkv_impl)
        self.k_hook = HookPoint()
        self.v_hook = HookPoint()
        self.out_hook = HookPoint()

    def _init_mix(self, c: int, n_layer: int, layer_id: int, init_mode: str) -> None:
        if init_mode == "fancy":  # RWKV-4's init, as in Vision-RWKV / Diffusion-RWKV
            ratio_0_to_1 = layer_id / (n_layer - 1) if n_layer > 1 else 0.0
            ratio_1_to_almost0 = 1.0 - layer_id / n_layer
            h = torch.arange(c, dtype=torch.float32)
            # decay from -5 (slow; w < 0 even grows with distance) to 3 (fast) across channels
            decay = -5 + 8 * (h / max(c - 1, 1)) ** (0.7 + 1.3 * ratio_0_to_1)
            zigzag = ((h + 1) % 3 - 1) * 0.5
            ramp = _mix_ramp(c)
            self.spatial_decay = nn.Parameter(decay)
            self.spatial_first = nn.Parameter(torch.full((c,), math.log(0.3)) + zigzag)
            self.spatial_mix_k = nn.Parameter(ramp**ratio_1_to_almost0)
            self.spatial_mix_v = nn.Parameter(ramp**ratio_1_to_almost0 + 0.3 * ratio_0_to_1)
            self.spatial_mix_r = nn.Parameter(ramp ** (0.5 * ratio_1_to_almost0))
        elif init_mode == "local":
            self.spatial_decay = nn.Parameter(torch.ones(c))
            self.spatial_first = nn.Parameter(torch.ones(c))
            for name in ("k", "v", "r"):
                setattr(self, f"spatial_mix_{name}", nn.Parameter(torch.ones(1, 1, c)))
        elif init_mode == "global":
            self.spatial_decay = nn.Parameter(torch.zeros(c))
            self.spatial_first = nn.Parameter(torch.zeros(c))
            for name in ("k", "v", "r"):
                setattr(self, f"spatial_mix_{name}", nn.Parameter(torch.full((1, 1, c), 0.5)))
        else:
            raise ConfigError(f"unknown model.init_mode '{init_mode}': choose one of {', '.join(INIT_MODES)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t_len = x.shape[1]
        if self.shift_pixel > 0:
            xx = q_shift(x, self.grid, self.shift_pixel, self.channel_gamma)
            xk = torch.lerp(xx, x, self.spatial_mix_k)  # x * mu + xx * (1 - mu)
            xv = torch.lerp(xx, x, self.spatial_mix_v)
            xr = torch.lerp(xx, x, self.spatial_mix_r)
        else:
            xk = xv = xr = x
        k = self.k_hook(self.key(xk))
        v = self.v_hook(self.value(xv))
        sr = torch.sigmoid(self.receptance(xr))
        wkv = self.wkv(self.spatial_decay / t_len, self.spatial_first / t_len, k, v)
        return self.output(self.out_hook(sr * wkv))


class ChannelMix(nn.Module):
    """RWKV channel mixing: q_shift, squared-ReLU key projection to hidden_rate * C, receptance gate."""

    def __init__(self, n_embd: int, n_layer: int, layer_id: int, grid: tuple[int, int], shift_pixel: int = 1,
                 channel_gamma: float = 0.25, hidden_rate: float = 4.0, init_mode: str = "fancy"):
        super().__init__()
        self.grid, self.shift_pixel, self.channel_gamma = grid, shift_pixel, channel_gamma
        if init_mode == "fancy":
            ramp = _mix_ramp(n_embd) ** (1.0 - layer_id / n_layer)
            self.spatial_mix_k = nn.Parameter(ramp.clone())
            self.spatial_mix_r = nn.Parameter(ramp.clone())
        elif init_mode in ("local", "global"):
            fill = 1.0 if init_mode == "local" else 0.5
            self.spatial_mix_k = nn.Parameter(torch.full((1, 1, n_embd), fill))
            self.spatial_mix_r = nn.Parameter(torch.full((1, 1, n_embd), fill))
        else:
            raise ConfigError(f"unknown model.init_mode '{init_mode}': choose one of {', '.join(INIT_MODES)}")
        hidden = int(hidden_rate * n_embd)
        self.key = nn.Linear(n_embd, hidden, bias=False)
        self.receptance = nn.Linear(n_embd, n_embd, bias=False)
        self.value = nn.Linear(hidden, n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shift_pixel > 0:
            xx = q_shift(x, self.grid, self.shift_pixel, self.channel_gamma)
            xk = torch.lerp(xx, x, self.spatial_mix_k)
            xr = torch.lerp(xx, x, self.spatial_mix_r)
        else:
            xk = xr = x
        k = torch.relu(self.key(xk))
        k = k * k  # squared ReLU (torch.square runs as a generic pow on CPU: ~6x slower than this product)
        return torch.sigmoid(self.receptance(xr)) * self.value(k)


class DropPath(nn.Module):
    """Stochastic depth per sample (timm's drop_path); identity in eval mode or with p = 0."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class RWKVBlock(nn.Module):
    """Bi-RWKV block with adaLN-Zero: [skip fusion] -> [ln0 on block 0] -> spatial mix -> channel mix."""

    def __init__(self, n_embd: int, n_layer: int, layer_id: int, grid: tuple[int, int], *, skip: bool = False,
                 shift_pixel: int = 1, channel_gamma: float = 0.25, hidden_rate: float = 4.0,
                 init_mode: str = "fancy", drop_path: float = 0.0, wkv_impl: str = "auto"):
        super().__init__()
        self.layer_id = layer_id
        self.skip_linear = nn.Linear(2 * n_embd, n_embd) if skip else None
        self.ln0 = nn.LayerNorm(n_embd) if layer_id == 0 else None  # RWKV normalises the embeddings once
        self.ln1 = nn.LayerNorm(n_embd)
        self.ln2 = nn.LayerNorm(n_embd)
        self.att = SpatialMix(n_embd, n_layer, layer_id, grid, shift_pixel, channel_gamma, init_mode, wkv_impl)
        self.ffn = ChannelMix(n_embd, n_layer, layer_id, grid, shift_pixel, channel_gamma, hidden_rate, init_mode)
        self.drop_path = DropPath(drop_path)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(n_embd, 6 * n_embd, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            if skip is None:
                raise ValueError(f"block {self.layer_id} fuses a long skip: pass skip=")
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        if self.ln0 is not None:
            x = self.ln0(x)
        x = x + self.drop_path(gate_msa.unsqueeze(1) * self.att(modulate(self.ln1(x), shift_msa, scale_msa)))
        x = x + self.drop_path(gate_mlp.unsqueeze(1) * self.ffn(modulate(self.ln2(x), shift_mlp, scale_mlp)))
        return x


#################################################################################
#                                   The model                                   #
#################################################################################


class DiffusionRWKV(nn.Module):
    """Diffusion-RWKV: model(x (N, C, H, W), t (N,), y (N,) long) -> (N, out_channels, H, W)."""

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1024,
                 depth: int = 37, mlp_ratio: float = 4.0, num_classes: int = 1000, class_dropout_prob: float = 0.1,
                 learn_sigma: bool = True, shift_pixel: int = 1, channel_gamma: float = 0.25,
                 init_mode: str = "fancy", skip: bool = True, drop_path_rate: float = 0.0, wkv_impl: str = "auto"):
        super().__init__()
        if input_size % patch_size:
            raise ConfigError(f"model.input_size {input_size} is not a multiple of model.patch_size {patch_size}")
        if depth < 1 or depth % 2 == 0:
            raise ConfigError(f"model.depth={depth}: Diffusion-RWKV needs an odd number of blocks "
                              "(depth//2 in, 1 mid, depth//2 out), e.g. 13, 25 or 37")
        if not 0 < channel_gamma <= 0.25:
            raise ConfigError(f"model.channel_gamma={channel_gamma}: q_shift shifts 4 groups, use 0 < gamma <= 0.25")
        grid_size = input_size // patch_size
        if not 0 <= shift_pixel < grid_size:
            raise ConfigError(f"model.shift_pixel={shift_pixel} must lie in 0..{grid_size - 1} (the patch grid is "
                              f"{grid_size}x{grid_size})")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ConfigError(f"model.drop_path_rate={drop_path_rate} must lie in [0, 1)")
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.input_size = input_size
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.num_classes = num_classes
        self.depth = depth

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
        # Sin-cos initialised but trainable, as in the official code (DiT freezes it).
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size))

        grid = (grid_size, grid_size)
        rates = [drop_path_rate * i / depth for i in range(depth)]  # official rule: linspace(0, rate, depth + 1)[i]
        half = depth // 2
        self.blocks = nn.ModuleList([
            RWKVBlock(hidden_size, depth, i, grid, skip=skip and i > half, shift_pixel=shift_pixel,
                      channel_gamma=channel_gamma, hidden_rate=mlp_ratio, init_mode=init_mode,
                      drop_path=rates[i], wkv_impl=wkv_impl)
            for i in range(depth)
        ])
        self.skip = skip
        self.norm_f = nn.LayerNorm(hidden_size)
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # As the official code: xavier-uniform linears with zero bias everywhere (this overrides RWKV's own
        # `scale_init` hints, which the official model never applies), then the DiT-style special cases.
        xavier_init_linears(self)
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.x_embedder.grid_size)
        with torch.no_grad():
            self.pos_embed.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)  # the official code zeroes it (DiT does not)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every block starts as the identity (up to ln0 / skip fusion)
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        return unpatchify(x, self.patch_size, self.out_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, C, H, W); t (N,) model time; y (N,) labels (`num_classes` = null label), ignored if unconditional."""
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            if y is None:
                raise ConfigError("this Diffusion-RWKV is class-conditional: pass y (use num_classes as the null label)")
            c = c + self.y_embedder(y)
        half = self.depth // 2
        skips = []
        for i, block in enumerate(self.blocks):
            if i < half:
                x = block(x, c)
                skips.append(x)
            elif i == half or not self.skip:
                x = block(x, c)
            else:
                x = block(x, c, skip=skips.pop())  # in-block i pairs with out-block depth-1-i
        x = self.final_layer(self.norm_f(x), c)
        return self.unpatchify(x)

    def convert_state_dict(self, sd: dict) -> dict:
        """A feizc/Diffusion-RWKV state dict -> ditk names (a ditk state dict passes unchanged); `load_pretrained`
        calls it. Inside a block every name and shape is the official one (att.key/value/receptance/output,
        spatial_decay/first (C,), spatial_mix_* (1, 1, C), ffn.*, ln0/ln1/ln2, adaLN_modulation.1 with DiT's
        chunk order, skip_linear), and w = spatial_decay / T, u = spatial_first / T are formed in forward by both
        codes, so only the containers are renamed:

            patch_embed.proj           -> x_embedder.proj
            time_embed.mlp.{0,2}       -> t_embedder.mlp.{0,2}
            label_emb.embedding_table  -> y_embedder.embedding_table   (absent in unconditional checkpoints)
            in_blocks.i, mid_block, out_blocks.i -> blocks.i, blocks.depth//2, blocks.depth//2+1+i
            pos_embed, norm_f, final_layer.*     unchanged
        """
        return official_uvit_to_ditk(sd, DRWKV_OFFICIAL_RENAMES) if is_official_uvit(sd) else dict(sd)

    @staticmethod
    def checkpoint_fields(sd: dict) -> dict:
        """The DiffusionRWKVConfig fields a ditk-layout state dict determines (for load errors that name the fix)."""
        fields = {}
        if (w := sd.get("x_embedder.proj.weight")) is not None:  # (D, C, p, p)
            d, c, p = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
            fields.update(hidden_size=d, in_channels=c, patch_size=p)
            if (pos := sd.get("pos_embed")) is not None:
                fields["input_size"] = math.isqrt(int(pos.shape[1])) * p
            if (lin := sd.get("final_layer.linear.weight")) is not None:
                fields["learn_sigma"] = int(lin.shape[0]) == 2 * c * p * p
            if (key := sd.get("blocks.0.ffn.key.weight")) is not None:
                fields["mlp_ratio"] = int(key.shape[0]) / d
        if (depth := count_blocks(sd, "ln1.weight")) > 0:  # a Diffusion-RWKV state dict at all
            fields["depth"] = depth
            table = sd.get("y_embedder.embedding_table.weight")
            fields["num_classes"] = int(table.shape[0]) - 1 if table is not None else 0  # with the null-label row
            fields["skip"] = count_blocks(sd, "skip_linear.weight") > 0
        return fields


# Top-level names of feizc/Diffusion-RWKV models_drwkv.py (`DiffRWKVModel`) -> ditk's; the block stack is handled
# by `official_uvit_to_ditk`.
DRWKV_OFFICIAL_RENAMES = (
    ("patch_embed.", "x_embedder."),
    ("time_embed.", "t_embedder."),
    ("label_emb.", "y_embedder."),
)


@MODELS.register("diffusion-rwkv", config=DiffusionRWKVConfig,
                 help="Diffusion-RWKV (bidirectional RWKV blocks, long skips, adaLN-Zero; Fei et al. 2024)")
def build_diffusion_rwkv(cfg) -> DiffusionRWKV:
    """Diffusion-RWKV (bidirectional RWKV blocks, long skips, adaLN-Zero; Fei et al. 2024)."""
    return DiffusionRWKV(**section_kwargs(cfg, DiffusionRWKVConfig))
