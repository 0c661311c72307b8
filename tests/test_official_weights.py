"""Official checkpoints of DiS, Dimba, Diffusion-RWKV and FluxMusic load into ditk (`load_pretrained`).

No official weights are downloaded: each family's official state-dict layout (every key and shape) is written
below from the official module code, filled with seeded random tensors, saved the way the official training
scripts save it, and loaded through `ditk.models.convert.load_pretrained`. The oracles:
  - coverage: the converted dict has exactly the model's keys and shapes, every official tensor is used
    exactly once, and the model loads it with strict=True;
  - numerics: a small functional re-implementation of each official forward pass, reading the *official* keys
    (the Vision Mamba "v2" mixer with the reference selective scan, DiS's and Diffusion-RWKV's U-ViT stacks,
    the Bi-WKV formula of the official CUDA kernel, Dimba's PixArt blocks interleaved with Mamba blocks,
    FluxMusic's double/single-stream blocks with its RoPE matrices), must match the ditk model after
    conversion to <= 1e-5;
  - paper sizes: the preset is built on the meta device and the official key/shape list of that size
    converts onto it completely;
  - errors: a checkpoint of another size or with unknown keys is a one-line ConfigError naming the fix.
None of the four needs a tensor transform: the official codes already use fused qkv (timm / Flux layout),
Vision Mamba's A_log = log(-A) and (d_inner, 1, d_conv) conv weights, DiT's adaLN chunk order, and ditk's
modules keep those layouts; only container names differ (U-ViT `in_blocks`/`mid_block`/`out_blocks`,
`mamba_blocks`, `double_blocks`/`single_blocks`, embedder names). The whole-forward comparisons are what
would catch a layout difference (a transposed weight, a swapped chunk, a reparametrised A, a wrong block order).

Official sources (read through the code library; commit = the stored version):
  DiS     feizc/DiS models_dis.py @4c5af9e (DisModel.__init__ / forward, Block, FinalLayer, LabelEmbedder)
  Mamba   hustvl/Vim mamba-1p1p1/mamba_ssm/modules/mamba_simple.py @4567f9d (Mamba.__init__, bimamba_type="v2";
          forward's fast path: mamba_inner_fn_no_out_proj per direction, out_proj(out + out_b.flip(-1)))
          - the fork vendored by DiS and Dimba
  D-RWKV  feizc/Diffusion-RWKV models_drwkv.py @380fe3b (VRWKV_SpatialMix, VRWKV_ChannelMix, Block, q_shift,
          DiffRWKVModel); Bi-WKV kernel: OpenGVLab/Vision-RWKV .../backbones/cuda/wkv_cuda.cu @b7559a4
  Dimba   feizc/Dimba diffusion/model/nets/dimba.py and dit.py @22881c8 (Dimba, DimbaBlock, create_block;
          PixArt blocks: timm Attention `qkv`/`proj`, MultiHeadCrossAttention `q_linear`/`kv_linear`/`proj`,
          CaptionEmbedder `y_proj` + buffer `y_embedding`, T2IFinalLayer); scripts/inference.py loads
          torch.load(path)["state_dict"] and deletes `pos_embed`
  Flux-   feizc/FluxMusic model.py and modules/layers.py @1623a6d (Flux, DoubleStreamBlock, SingleStreamBlock,
  Music   LastLayer(hidden, 1, 32), rope/apply_rope, timestep_embedding with time_factor 1000), constants.py
          @34c253e (sizes), sample.py @40b7f67 (torch.load(ckpt)["ema"]; latent (8, 256 time, 16 freq) ->
          "b c (h ph) (w pw) -> b (h w) (c ph pw)"; img_ids (0, h, w))
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ditk.errors import ConfigError
from ditk.models.convert import load_pretrained
from ditk.models.dimba import Dimba
from ditk.models.dis import DiS
from ditk.models.mmdit import FluxMusic
from ditk.models.rwkv import DiffusionRWKV


#################################################################################
#               Official key lists (name -> shape), from the module code         #
#################################################################################


def vim_mamba_v2(prefix, d, n=16, expand=2, k=4):
    """hustvl/Vim mamba_simple.Mamba(d, bimamba_type="v2") with its defaults (bias=False, conv_bias=True,
    dt_rank "auto" = ceil(d / 16)): in_proj, conv1d, x_proj, dt_proj, A_log, D, the "_b" copies, out_proj."""
    di, r = expand * d, math.ceil(d / 16)
    s = {prefix + "in_proj.weight": (2 * di, d), prefix + "out_proj.weight": (d, di)}
    for b, a_log, dd in (("", "A_log", "D"), ("_b", "A_b_log", "D_b")):
        s.update({prefix + f"conv1d{b}.weight": (di, 1, k), prefix + f"conv1d{b}.bias": (di,),
                  prefix + f"x_proj{b}.weight": (r + 2 * n, di),
                  prefix + f"dt_proj{b}.weight": (di, r), prefix + f"dt_proj{b}.bias": (di,),
                  prefix + a_log: (di, n), prefix + dd: (di,)})
    return s


def linear(prefix, n_out, n_in, bias=True):
    return {prefix + "weight": (n_out, n_in), **({prefix + "bias": (n_out,)} if bias else {})}


def dis_official(depth, d, p, c=4, num_classes=1000, input_size=32, n=16, skip=True):
    """feizc/DiS DisModel(patch_size=p, embed_dim=d, depth=depth, channels=c, num_classes, learn_sigma=True):
    rms_norm (weight only), bimamba v2; blocks: depth//2 `in_blocks`, `mid_block`, depth//2 `out_blocks`.
    num_classes <= 0 (the official default -1): unconditional, no label_emb, extras 1, FinalLayer(condition=False)."""
    s = {"patch_embed.proj.weight": (d, c, p, p), "patch_embed.proj.bias": (d,),
         **linear("time_embed.0.", 4 * d, d), **linear("time_embed.2.", d, 4 * d),
         "label_emb.embedding_table.weight": (num_classes + 1, d),  # + the CFG null row (dropout 0.1)
         "pos_embed": (1, 2 + (input_size // p) ** 2, d),  # [label, time, patches]
         "norm_f.weight": (d,),
         **linear("final_layer.linear.", p * p * 2 * c, d), **linear("final_layer.adaLN_modulation.1.", 2 * d, d)}
    if num_classes <= 0:
        del s["label_emb.embedding_table.weight"]
        del s["final_layer.adaLN_modulation.1.weight"], s["final_layer.adaLN_modulation.1.bias"]
        s["pos_embed"] = (1, 1 + (input_size // p) ** 2, d)  # [time, patches]
    names = [f"in_blocks.{i}." for i in range(depth // 2)] + ["mid_block."]
    names += [f"out_blocks.{i}." for i in range(depth // 2)]
    for name in names:
        s.update({name + "norm.weight": (d,), **vim_mamba_v2(name + "mixer.", d, n)})
        if skip and name.startswith("out_blocks"):
            s.update(linear(name + "skip_linear.", d, 2 * d))
    return s


def drwkv_official(depth, d, p, c=4, num_classes=1000, input_size=32, hidden_rate=4):
    """feizc/Diffusion-RWKV DiffRWKVModel(patch_size=p, embed_dim=d, depth=depth, channels=c, num_classes):
    key_norm=False, layer_scale=True (adaLN 6D), ln0 on layer 0 only, every out block with skip_linear."""
    s = {"patch_embed.proj.weight": (d, c, p, p), "patch_embed.proj.bias": (d,),
         **linear("time_embed.mlp.0.", d, 256), **linear("time_embed.mlp.2.", d, d),
         "pos_embed": (1, (input_size // p) ** 2, d), "norm_f.weight": (d,), "norm_f.bias": (d,),
         **linear("final_layer.linear.", p * p * 2 * c, d), **linear("final_layer.adaLN_modulation.1.", 2 * d, d)}
    if num_classes > 0:
        s["label_emb.embedding_table.weight"] = (num_classes + 1, d)
    half = depth // 2
    names = [(f"in_blocks.{i}.", i) for i in range(half)] + [("mid_block.", half)]
    names += [(f"out_blocks.{i}.", half + 1 + i) for i in range(half)]
    for name, layer_id in names:
        for ln in ("ln0", "ln1", "ln2") if layer_id == 0 else ("ln1", "ln2"):
            s.update({f"{name}{ln}.weight": (d,), f"{name}{ln}.bias": (d,)})
        s.update({name + "att.spatial_decay": (d,), name + "att.spatial_first": (d,),
                  **{name + f"att.spatial_mix_{x}": (1, 1, d) for x in "kvr"},
                  **{name + f"att.{x}.weight": (d, d) for x in ("key", "value", "receptance", "output")},
                  name + "ffn.spatial_mix_k": (1, 1, d), name + "ffn.spatial_mix_r": (1, 1, d),
                  name + "ffn.key.weight": (hidden_rate * d, d), name + "ffn.receptance.weight": (d, d),
                  name + "ffn.value.weight": (d, hidden_rate * d),
                  **linear(name + "adaLN_modulation.1.", 6 * d, d)})
        if name.startswith("out_blocks"):
            s.update(linear(name + "skip_linear.", d, 2 * d))
    return s


def dimba_official(depth, d, p=2, c=4, cap=4096, mamba_depth=None, n=16, input_size=64, max_length=300):
    """feizc/Dimba Dimba(depth, hidden_size=d, patch_size=p, caption_channels=cap, mamba_ratio, learn_sigma),
    micro_condition=False, no KV compression, qk_norm=False; persistent buffers `pos_embed` and
    `y_embedder.y_embedding` (model_max_length=300 at inference) are in the checkpoint."""
    mamba_depth = depth if mamba_depth is None else mamba_depth
    s = {"x_embedder.proj.weight": (d, c, p, p), "x_embedder.proj.bias": (d,),
         **linear("t_embedder.mlp.0.", d, 256), **linear("t_embedder.mlp.2.", d, d), **linear("t_block.1.", 6 * d, d),
         **linear("y_embedder.y_proj.fc1.", d, cap), **linear("y_embedder.y_proj.fc2.", d, d),
         "y_embedder.y_embedding": (max_length, cap), "pos_embed": (1, (input_size // p) ** 2, d),
         **linear("final_layer.linear.", p * p * 2 * c, d), "final_layer.scale_shift_table": (2, d)}
    for i in range(depth):
        b = f"blocks.{i}."
        s.update({b + "scale_shift_table": (6, d), **linear(b + "attn.qkv.", 3 * d, d), **linear(b + "attn.proj.", d, d),
                  **linear(b + "cross_attn.q_linear.", d, d), **linear(b + "cross_attn.kv_linear.", 2 * d, d),
                  **linear(b + "cross_attn.proj.", d, d), **linear(b + "mlp.fc1.", 4 * d, d),
                  **linear(b + "mlp.fc2.", d, 4 * d)})
    for j in range(mamba_depth):
        s.update({f"mamba_blocks.{j}.norm.weight": (d,), **vim_mamba_v2(f"mamba_blocks.{j}.mixer.", d, n)})
    return s


def fluxmusic_official(depth, depth_single, d, heads=16, c_in=32, vec=768, context=4096, mlp_ratio=4.0):
    """feizc/FluxMusic Flux(FluxParams(in_channels=32, vec_in_dim=768, context_in_dim=4096, hidden_size=d,
    num_heads, depth, depth_single_blocks, qkv_bias=True)); LastLayer(d, patch 1, out_channels 32)."""
    hd, mlp = d // heads, int(d * mlp_ratio)
    s = {**linear("img_in.", d, c_in), **linear("time_in.in_layer.", d, 256), **linear("time_in.out_layer.", d, d),
         **linear("vector_in.in_layer.", d, vec), **linear("vector_in.out_layer.", d, d), **linear("txt_in.", d, context),
         **linear("final_layer.linear.", c_in, d), **linear("final_layer.adaLN_modulation.1.", 2 * d, d)}
    for i in range(depth):
        for stream in ("img", "txt"):
            b = f"double_blocks.{i}.{stream}_"
            s.update({**linear(b + "mod.lin.", 6 * d, d), **linear(b + "attn.qkv.", 3 * d, d),
                      b + "attn.norm.query_norm.scale": (hd,), b + "attn.norm.key_norm.scale": (hd,),
                      **linear(b + "attn.proj.", d, d), **linear(b + "mlp.0.", mlp, d), **linear(b + "mlp.2.", d, mlp)})
    for j in range(depth_single):
        b = f"single_blocks.{j}."
        s.update({**linear(b + "linear1.", 3 * d + mlp, d), **linear(b + "linear2.", d, d + mlp),
                  b + "norm.query_norm.scale": (hd,), b + "norm.key_norm.scale": (hd,),
                  **linear(b + "modulation.lin.", 3 * d, d)})
    return s


def random_state_dict(shapes, seed, dtype=torch.float64, std=0.3):
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(s, generator=g, dtype=torch.float64) * std).to(dtype) for k, s in shapes.items()}


#################################################################################
#              Functional re-implementations of the official forwards           #
#################################################################################


def sub(sd, prefix):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def lin(x, sd, prefix):
    return F.linear(x, sd[prefix + "weight"], sd.get(prefix + "bias"))


def official_timestep_embedding(t, dim):
    """GLIDE/DiT sinusoid, [cos | sin], as in all four repositories."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rms_norm(x, weight, eps=1e-5):
    """mamba_ssm's rms_norm_fn (prenorm RMSNorm, no bias)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def mamba_v2_reference(m, x):
    """Vision Mamba v2 mixer (x (B, L, D)) from the official tensors `m`: the per-direction path of
    mamba_inner_fn_no_out_proj (nn.Conv1d with padding k-1 cut to L, SiLU, x_proj -> dt | B | C, dt_proj +
    bias, softplus, selective_scan_ref with A = -exp(A_log), + D u, * silu(z)) on xz and on xz flipped in time,
    then out_proj(out + out_b.flip). Sequential scan."""
    length = x.shape[1]
    xz = x @ m["in_proj.weight"].T

    def direction(xz, b, a_log, d_skip):
        u, z = xz.chunk(2, dim=-1)
        w = m[f"conv1d{b}.weight"]
        u = F.conv1d(u.transpose(1, 2), w, m[f"conv1d{b}.bias"], padding=w.shape[-1] - 1, groups=w.shape[0])
        u = F.silu(u[..., :length]).transpose(1, 2)  # (B, L, di)
        A = -torch.exp(m[a_log])  # (di, n)
        r, n = m[f"dt_proj{b}.weight"].shape[1], A.shape[1]
        dt, Bm, Cm = (u @ m[f"x_proj{b}.weight"].T).split([r, n, n], dim=-1)
        dt = F.softplus(dt @ m[f"dt_proj{b}.weight"].T + m[f"dt_proj{b}.bias"])
        h, ys = torch.zeros(x.shape[0], A.shape[0], n, dtype=x.dtype), []
        for t in range(length):
            h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[..., None] * Bm[:, t, None, :]
            ys.append((h * Cm[:, t, None, :]).sum(-1))
        return (torch.stack(ys, 1) + u * m[d_skip]) * F.silu(z)

    y = direction(xz, "", "A_log", "D") + direction(xz.flip(1), "_b", "A_b_log", "D_b").flip(1)
    return y @ m["out_proj.weight"].T


def mamba_block_reference(sd, prefix, hidden, residual):
    """Vim `Block` with fused add + RMSNorm (prenorm): residual += hidden; hidden = mixer(norm(residual))."""
    residual = hidden if residual is None else residual + hidden
    return mamba_v2_reference(sub(sd, prefix + "mixer."), rms_norm(residual, sd[prefix + "norm.weight"])), residual


def unpatchify_official(x, channels):
    """einops 'B (h w) (p1 p2 C) -> B C (h p1) (w p2)' (DiS, Diffusion-RWKV)."""
    n, tokens, dim = x.shape
    h = math.isqrt(tokens)
    p = math.isqrt(dim // channels)
    return x.reshape(n, h, h, p, p, channels).permute(0, 5, 1, 3, 2, 4).reshape(n, channels, h * p, h * p)


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


def final_layer_reference(sd, x, c):
    shift, scale = lin(F.silu(c), sd, "final_layer.adaLN_modulation.1.").chunk(2, dim=1)
    return lin(modulate(F.layer_norm(x, x.shape[-1:], eps=1e-6), shift, scale), sd, "final_layer.linear.")


def dis_reference(sd, x, t, y, depth, out_channels):
    """DisModel.forward (eval: no label dropout, no drop path). Class-conditional: tokens [label, time, patches] and
    an adaLN final layer on time + label; unconditional (num_classes=-1, y None): tokens [time, patches] and
    FinalLayer(condition=False) = Linear(LayerNorm(x))."""
    w = sd["patch_embed.proj.weight"]
    d, p = w.shape[0], w.shape[-1]
    tokens = F.conv2d(x, w, sd["patch_embed.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    temb = official_timestep_embedding(t, d).to(x.dtype)
    time_token = lin(F.silu(lin(temb, sd, "time_embed.0.")), sd, "time_embed.2.")
    prefix = [time_token[:, None]]
    if y is not None:
        label = sd["label_emb.embedding_table.weight"][y]
        prefix.insert(0, label[:, None])
    hidden = torch.cat([*prefix, tokens], 1) + sd["pos_embed"]
    residual, skips = None, []
    for i in range(depth // 2):
        hidden, residual = mamba_block_reference(sd, f"in_blocks.{i}.", hidden, residual)
        skips.append(hidden)
    hidden, residual = mamba_block_reference(sd, "mid_block.", hidden, residual)
    for i in range(depth // 2):
        hidden = lin(torch.cat([hidden, skips.pop()], -1), sd, f"out_blocks.{i}.skip_linear.")
        hidden, residual = mamba_block_reference(sd, f"out_blocks.{i}.", hidden, residual)
    hidden = rms_norm(residual + hidden, sd["norm_f.weight"])
    if y is None:
        out = lin(F.layer_norm(hidden, (d,), eps=1e-6), sd, "final_layer.linear.")
    else:
        out = final_layer_reference(sd, hidden, time_token + label)
    return unpatchify_official(out[:, len(prefix):], out_channels)


def q_shift_reference(x, grid, shift=1, gamma=0.25):
    """models_drwkv.q_shift, on (B, C, H, W) as written there."""
    bsz, n, c = x.shape
    x = x.transpose(1, 2).reshape(bsz, c, *grid)
    h, w = grid
    g = int(c * gamma)
    out = torch.zeros_like(x)
    out[:, 0:g, :, shift:w] = x[:, 0:g, :, 0:w - shift]
    out[:, g:2 * g, :, 0:w - shift] = x[:, g:2 * g, :, shift:w]
    out[:, 2 * g:3 * g, shift:h, :] = x[:, 2 * g:3 * g, 0:h - shift, :]
    out[:, 3 * g:4 * g, 0:h - shift, :] = x[:, 3 * g:4 * g, shift:h, :]
    out[:, 4 * g:] = x[:, 4 * g:]
    return out.flatten(2).transpose(1, 2)


def wkv_kernel_reference(w, u, k, v):
    """The Bi-WKV the official CUDA kernel computes (wkv_cuda.cu kernel_forward): per channel,
    y_t = (sum_{i != t} e^{-(|t-i|-1) w + k_i} v_i + e^{u + k_t} v_t) / (same with v = 1, + 1e-6),
    every exponent taken relative to the largest one (the kernel's running maxima)."""
    length = k.shape[1]
    pos = torch.arange(length, dtype=k.dtype)
    dist = (pos[:, None] - pos[None, :]).abs()
    logits = -(dist[None, :, :, None] - 1) * w + k[:, None, :, :]  # (B, t, i, C)
    diag = torch.eye(length, dtype=torch.bool)[None, :, :, None]
    logits = torch.where(diag, (u + k)[:, :, None, :].expand_as(logits), logits)
    e = torch.exp(logits - logits.amax(2, keepdim=True))
    return (e * v[:, None]).sum(2) / (e.sum(2) + 1e-6)


def drwkv_reference(sd, x, t, y, depth, out_channels):
    """DiffRWKVModel.forward (eval), Block.forward with post_norm=False, layer_scale=True."""
    w = sd["patch_embed.proj.weight"]
    d, p = w.shape[0], w.shape[-1]
    grid = (x.shape[-2] // p, x.shape[-1] // p)
    h = F.conv2d(x, w, sd["patch_embed.proj.bias"], stride=p).flatten(2).transpose(1, 2) + sd["pos_embed"]
    temb = official_timestep_embedding(t, 256).to(x.dtype)
    c = lin(F.silu(lin(temb, sd, "time_embed.mlp.0.")), sd, "time_embed.mlp.2.")
    if y is not None:
        c = c + sd["label_emb.embedding_table.weight"][y]

    def ln(z, prefix):
        return F.layer_norm(z, z.shape[-1:], sd[prefix + "weight"], sd[prefix + "bias"], eps=1e-5)

    def mix(z, xx, mu):
        return z * mu + xx * (1 - mu)

    def block(prefix, z, skip=None):
        if skip is not None:
            z = lin(torch.cat([z, skip], -1), sd, prefix + "skip_linear.")
        s_msa, c_msa, g_msa, s_mlp, c_mlp, g_mlp = lin(F.silu(c), sd, prefix + "adaLN_modulation.1.").chunk(6, dim=1)
        if prefix + "ln0.weight" in sd:
            z = ln(z, prefix + "ln0.")
        a = modulate(ln(z, prefix + "ln1."), s_msa, c_msa)
        xx = q_shift_reference(a, grid)
        k = lin(mix(a, xx, sd[prefix + "att.spatial_mix_k"]), sd, prefix + "att.key.")
        v = lin(mix(a, xx, sd[prefix + "att.spatial_mix_v"]), sd, prefix + "att.value.")
        r = torch.sigmoid(lin(mix(a, xx, sd[prefix + "att.spatial_mix_r"]), sd, prefix + "att.receptance."))
        n_tok = a.shape[1]
        wkv = wkv_kernel_reference(sd[prefix + "att.spatial_decay"] / n_tok, sd[prefix + "att.spatial_first"] / n_tok, k, v)
        z = z + g_msa[:, None] * lin(r * wkv, sd, prefix + "att.output.")
        f = modulate(ln(z, prefix + "ln2."), s_mlp, c_mlp)
        xx = q_shift_reference(f, grid)
        key = torch.relu(lin(mix(f, xx, sd[prefix + "ffn.spatial_mix_k"]), sd, prefix + "ffn.key.")) ** 2
        rec = torch.sigmoid(lin(mix(f, xx, sd[prefix + "ffn.spatial_mix_r"]), sd, prefix + "ffn.receptance."))
        return z + g_mlp[:, None] * (rec * lin(key, sd, prefix + "ffn.value."))

    skips = []
    for i in range(depth // 2):
        h = block(f"in_blocks.{i}.", h)
        skips.append(h)
    h = block("mid_block.", h)
    for i in range(depth // 2):
        h = block(f"out_blocks.{i}.", h, skips.pop())
    out = final_layer_reference(sd, ln(h, "norm_f."), c)
    return unpatchify_official(out, out_channels)


def pixart_pos_embed(d, grid, pe_interpolation=1.0):
    """Dimba dit.get_2d_sincos_pos_embed at base_size = grid (float32 grid, float64 frequencies)."""
    pos = np.arange(grid, dtype=np.float32) / (grid / grid) / pe_interpolation
    gw, gh = np.meshgrid(pos, pos)

    def one_d(p):
        omega = 1.0 / 10000 ** (np.arange(d // 4, dtype=np.float64) / (d / 4.0))
        out = np.einsum("m,d->md", p.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return torch.from_numpy(np.concatenate([one_d(gw), one_d(gh)], axis=1))[None]


def attention_reference(q, k, v, heads):
    """softmax(q k^T / sqrt(hd)) v over (N, L, D) tensors split into heads (timm / xformers)."""
    n, lq, d = q.shape
    q, k, v = (z.reshape(n, z.shape[1], heads, d // heads).transpose(1, 2) for z in (q, k, v))
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), -1) @ v
    return a.transpose(1, 2).reshape(n, lq, d)


def dimba_reference(sd, x, t, caption, depth, heads, mamba_depth, out_channels):
    """Dimba.forward (eval, mask=None: every caption token attended, per sample), DimbaBlock.forward."""
    w = sd["x_embedder.proj.weight"]
    d, p = w.shape[0], w.shape[-1]
    gh, gw = x.shape[-2] // p, x.shape[-1] // p
    h = F.conv2d(x, w, sd["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    h = h + pixart_pos_embed(d, gh).to(x.dtype)
    temb = lin(F.silu(lin(official_timestep_embedding(t, 256).to(x.dtype), sd, "t_embedder.mlp.0.")), sd,
               "t_embedder.mlp.2.")
    t0 = lin(F.silu(temb), sd, "t_block.1.")
    yy = lin(F.gelu(lin(caption, sd, "y_embedder.y_proj.fc1."), approximate="tanh"), sd, "y_embedder.y_proj.fc2.")
    gap = depth // mamba_depth
    residual = None
    for i in range(depth):
        b = f"blocks.{i}."
        mods = (sd[b + "scale_shift_table"][None] + t0.reshape(x.shape[0], 6, -1)).chunk(6, dim=1)  # (N, 1, D)
        s_msa, c_msa, g_msa, s_mlp, c_mlp, g_mlp = mods
        a = F.layer_norm(h, (d,), eps=1e-6) * (1 + c_msa) + s_msa
        q, k, v = lin(a, sd, b + "attn.qkv.").chunk(3, dim=-1)  # reshape(B, N, 3, H, hd): [q | k | v]
        h = h + g_msa * lin(attention_reference(q, k, v, heads), sd, b + "attn.proj.")
        kv = lin(yy, sd, b + "cross_attn.kv_linear.").reshape(*yy.shape[:2], 2, d)  # view(1, -1, 2, H, hd)
        ca = attention_reference(lin(h, sd, b + "cross_attn.q_linear."), kv[:, :, 0], kv[:, :, 1], heads)
        h = h + lin(ca, sd, b + "cross_attn.proj.")
        m = F.layer_norm(h, (d,), eps=1e-6) * (1 + c_mlp) + s_mlp
        h = h + g_mlp * lin(F.gelu(lin(m, sd, b + "mlp.fc1."), approximate="tanh"), sd, b + "mlp.fc2.")
        if gap == 1 or i % gap == 1:
            h, residual = mamba_block_reference(sd, f"mamba_blocks.{i if gap == 1 else i // gap}.", h, residual)
    shift, scale = (sd["final_layer.scale_shift_table"][None] + temb[:, None]).chunk(2, dim=1)
    out = lin(F.layer_norm(h, (d,), eps=1e-6) * (1 + scale) + shift, sd, "final_layer.linear.")
    out = out.reshape(x.shape[0], gh, gw, p, p, out_channels)
    return torch.einsum("nhwpqc->nchpwq", out).reshape(x.shape[0], out_channels, gh * p, gw * p)


def flux_rope(pos, dim, theta):
    """modules/layers.rope: (..., L) positions -> (..., L, dim/2, 2, 2) rotation matrices."""
    omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    out = torch.einsum("...n,d->...nd", pos.double(), omega)
    out = torch.stack([torch.cos(out), -torch.sin(out), torch.sin(out), torch.cos(out)], dim=-1)
    return out.reshape(*out.shape[:-1], 2, 2).float()


def flux_attention(q, k, v, pe):
    """modules/layers.attention: apply_rope (matrix form) then SDPA, heads merged."""
    def rot(z):
        z_ = z.float().reshape(*z.shape[:-1], -1, 1, 2)
        return (pe[..., 0] * z_[..., 0] + pe[..., 1] * z_[..., 1]).reshape(*z.shape).type_as(z)

    out = F.scaled_dot_product_attention(rot(q), rot(k), v)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def flux_reference(sd, img, img_ids, txt, txt_ids, t, vec_in, depth, depth_single, heads, axes_dim, theta=10000):
    """Flux.forward (model.py) with DoubleStreamBlock / SingleStreamBlock / LastLayer of modules/layers.py."""
    def rms(z, scale):
        return (z.float() * torch.rsqrt(z.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(z.dtype) * scale

    def split(qkv, prefix):  # "B L (K H D) -> K B H L D", then QKNorm
        n, l, _ = qkv.shape
        q, k, v = qkv.reshape(n, l, 3, heads, -1).permute(2, 0, 3, 1, 4)
        return rms(q, sd[prefix + "query_norm.scale"]), rms(k, sd[prefix + "key_norm.scale"]), v

    def ln(z):
        return F.layer_norm(z, z.shape[-1:], eps=1e-6)

    img = lin(img, sd, "img_in.")
    vec = lin(F.silu(lin(official_timestep_embedding(1000 * t, 256), sd, "time_in.in_layer.")), sd, "time_in.out_layer.")
    vec = vec + lin(F.silu(lin(vec_in, sd, "vector_in.in_layer.")), sd, "vector_in.out_layer.")
    txt = lin(txt, sd, "txt_in.")
    ids = torch.cat([txt_ids, img_ids], 1)
    pe = torch.cat([flux_rope(ids[..., i], axes_dim[i], theta) for i in range(3)], dim=-3)[:, None]
    for i in range(depth):
        b = f"double_blocks.{i}."
        im = lin(F.silu(vec), sd, b + "img_mod.lin.")[:, None].chunk(6, -1)
        tm = lin(F.silu(vec), sd, b + "txt_mod.lin.")[:, None].chunk(6, -1)
        iq, ik, iv = split(lin((1 + im[1]) * ln(img) + im[0], sd, b + "img_attn.qkv."), b + "img_attn.norm.")
        tq, tk, tv = split(lin((1 + tm[1]) * ln(txt) + tm[0], sd, b + "txt_attn.qkv."), b + "txt_attn.norm.")
        attn = flux_attention(torch.cat([tq, iq], 2), torch.cat([tk, ik], 2), torch.cat([tv, iv], 2), pe)
        ta, ia = attn[:, :txt.shape[1]], attn[:, txt.shape[1]:]
        img = img + im[2] * lin(ia, sd, b + "img_attn.proj.")
        img = img + im[5] * lin(F.gelu(lin((1 + im[4]) * ln(img) + im[3], sd, b + "img_mlp.0."), approximate="tanh"),
                                sd, b + "img_mlp.2.")
        txt = txt + tm[2] * lin(ta, sd, b + "txt_attn.proj.")
        txt = txt + tm[5] * lin(F.gelu(lin((1 + tm[4]) * ln(txt) + tm[3], sd, b + "txt_mlp.0."), approximate="tanh"),
                                sd, b + "txt_mlp.2.")
    x = torch.cat([txt, img], 1)
    for j in range(depth_single):
        b = f"single_blocks.{j}."
        shift, scale, gate = lin(F.silu(vec), sd, b + "modulation.lin.")[:, None].chunk(3, -1)
        d = x.shape[-1]
        qkv, mlp = lin((1 + scale) * ln(x) + shift, sd, b + "linear1.").split([3 * d, sd[b + "linear1.weight"].shape[0] - 3 * d], -1)
        q, k, v = split(qkv, b + "norm.")
        x = x + gate * lin(torch.cat([flux_attention(q, k, v, pe), F.gelu(mlp, approximate="tanh")], 2), sd, b + "linear2.")
    x = x[:, txt.shape[1]:]
    shift, scale = lin(F.silu(vec), sd, "final_layer.adaLN_modulation.1.").chunk(2, dim=1)
    return lin((1 + scale[:, None]) * ln(x) + shift[:, None], sd, "final_layer.linear.")


#################################################################################
#                          Small models of each family                          #
#################################################################################


def small_dis(num_classes=5):
    return DiS(input_size=8, patch_size=2, in_channels=3, hidden_size=16, depth=4, d_state=4, num_classes=num_classes,
               scan_backend="torch")


def small_dis_official(num_classes=5):
    return dis_official(4, 16, 2, c=3, num_classes=num_classes, input_size=8, n=4)


def small_drwkv(num_classes=5):
    return DiffusionRWKV(input_size=8, patch_size=2, in_channels=3, hidden_size=16, depth=5, num_classes=num_classes,
                         wkv_impl="torch")


def small_drwkv_official(num_classes=5):
    return drwkv_official(5, 16, 2, c=3, num_classes=num_classes, input_size=8)


def small_dimba():  # depth 4, mamba_ratio 0.5: Mamba blocks after layers 1 and 3 (gap 2)
    return Dimba(input_size=8, patch_size=2, in_channels=3, hidden_size=16, depth=4, num_heads=2, mamba_ratio=0.5,
                 caption_channels=12, d_state=4, scan_backend="torch")


def small_dimba_official():
    return dimba_official(4, 16, c=3, cap=12, mamba_depth=2, n=4, input_size=8, max_length=7)


def small_flux():  # official in_channels = C p p = 2 * 2 * 2 = 8
    return FluxMusic(input_size=4, frames=6, patch_size=2, in_channels=2, hidden_size=16, num_heads=2, depth_double=2,
                     depth_single=2, axes_dim=(2, 2, 4), context_dim=12, pooled_dim=10)


def small_flux_official():
    return fluxmusic_official(2, 2, 16, heads=2, c_in=8, vec=10, context=12)


FAMILIES = {  # name: (ditk model, official shapes, official buffers dropped by the conversion, save key)
    "dis": (small_dis, small_dis_official, (), "ema"),
    # official DiS with num_classes=-1 (its default): no label_emb, no adaLN in the final layer (ditk: 0)
    "dis-uncond": (lambda: small_dis(0), lambda: small_dis_official(-1), (), "ema"),
    "diffusion-rwkv": (small_drwkv, small_drwkv_official, (), "ema"),
    # the released M-2-uncond-32.pt is unconditional: no label_emb (ditk: model.num_classes=0)
    "diffusion-rwkv-uncond": (lambda: small_drwkv(0), lambda: small_drwkv_official(0), (), "ema"),
    "dimba": (small_dimba, small_dimba_official, ("pos_embed", "y_embedder.y_embedding"), "state_dict"),
    "fluxmusic": (small_flux, small_flux_official, (), "ema"),
}


def save_official(tmp_path, sd, key):
    """As the official scripts save: torch.save({"model", "ema", "opt", "args"}) (DiS, D-RWKV, FluxMusic train.py)
    or a dict with "state_dict" (Dimba's PixArt save_checkpoint)."""
    path = tmp_path / "official.pth"
    torch.save({key: sd}, path)
    return path


#################################################################################
#                                  Coverage                                     #
#################################################################################


@pytest.mark.parametrize("family", list(FAMILIES))
def test_official_layout_covers_every_parameter_exactly_once(family, tmp_path):
    make_model, make_shapes, dropped, key = FAMILIES[family]
    model = make_model().double()
    official = random_state_dict(make_shapes(), seed=1)
    converted = model.convert_state_dict(official)
    ours = model.state_dict()
    assert set(converted) == set(ours)  # nothing missing, nothing left over
    assert all(tuple(converted[k].shape) == tuple(ours[k].shape) for k in ours)
    # every official tensor is used exactly once (the conversion only renames), apart from the fixed buffers
    used = [id(v) for v in converted.values()]
    assert len(set(used)) == len(used) == len(official) - len(dropped)
    assert set(used) == {id(v) for k, v in official.items() if k not in dropped}

    load_pretrained(model, save_official(tmp_path, official, key))
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], converted[k]) for k in loaded)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_ditk_layout_passes_through_unchanged(family):
    model = FAMILIES[family][0]()
    sd = model.state_dict()
    converted = model.convert_state_dict(sd)
    assert list(converted) == list(sd) and all(converted[k] is sd[k] for k in sd)


def test_dimba_mamba_blocks_land_after_the_layers_the_official_forward_runs_them():
    official = random_state_dict(small_dimba_official(), seed=2)
    converted = small_dimba().convert_state_dict(official)
    # gap = depth // mamba_depth = 2: mamba_blocks[i // 2] runs after layer i for i % 2 == 1
    for j, layer in ((0, 1), (1, 3)):
        assert converted[f"blocks.{layer}.mamba.mixer.A_b_log"] is official[f"mamba_blocks.{j}.mixer.A_b_log"]
    assert not any(k.startswith(("blocks.0.mamba", "blocks.2.mamba")) for k in converted)


def test_uvit_stack_order():
    """in_blocks.i -> blocks.i, mid_block -> blocks.depth//2, out_blocks.i -> blocks.depth//2+1+i."""
    official = random_state_dict(small_dis_official(), seed=3)
    converted = small_dis().convert_state_dict(official)
    for src, dst in (("in_blocks.1", "blocks.1"), ("mid_block", "blocks.2"), ("out_blocks.0", "blocks.3"),
                     ("out_blocks.1", "blocks.4")):
        assert converted[f"{dst}.norm.weight"] is official[f"{src}.norm.weight"]
    assert converted["blocks.3.skip_linear.weight"] is official["out_blocks.0.skip_linear.weight"]


#################################################################################
#                 Numerics: the official forward, from official keys            #
#################################################################################


def test_dis_matches_the_official_forward():
    official = random_state_dict(small_dis_official(), seed=4)
    official["label_emb.embedding_table.weight"] *= 3  # make the label visible in the output
    model = small_dis().double().eval()
    model.load_state_dict(model.convert_state_dict(official))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    t, y = torch.tensor([3.0, 917.0]), torch.tensor([1, 5])  # 5 = the null label
    with torch.no_grad():
        ours = model(x, t, y)
    ref = dis_reference(official, x, t, y, depth=4, out_channels=6)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert ours.std() > 0.1  # a non-trivial output


@pytest.mark.parametrize("num_classes", [5, 0])
def test_diffusion_rwkv_matches_the_official_forward(num_classes):
    official = random_state_dict(small_drwkv_official(num_classes), seed=5)
    model = small_drwkv(num_classes).double().eval()
    model.load_state_dict(model.convert_state_dict(official))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([10.0, 500.0])
    y = torch.tensor([0, 4]) if num_classes else None
    with torch.no_grad():
        ours = model(x, t, y)
    ref = drwkv_reference(official, x, t, y, depth=5, out_channels=6)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert ours.std() > 0.1


def test_dimba_matches_the_official_forward():
    official = random_state_dict(small_dimba_official(), seed=6)
    model = small_dimba().double().eval()
    model.load_state_dict(model.convert_state_dict(official))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    caption = torch.randn(2, 5, 12, generator=g, dtype=torch.float64)
    t = torch.tensor([20.0, 700.0])
    with torch.no_grad():
        ours = model(x, t, caption)
    ref = dimba_reference(official, x, t, caption, depth=4, heads=2, mamba_depth=2, out_channels=6)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert ours.std() > 0.1


def test_fluxmusic_matches_the_official_forward():
    official = random_state_dict(small_flux_official(), seed=7, dtype=torch.float32, std=0.2)
    model = small_flux().eval()
    model.load_state_dict(model.convert_state_dict(official))
    g = torch.Generator().manual_seed(3)
    n, c, f, frames, p = 2, 2, 4, 6, 2
    latent = torch.randn(n, c, frames, f, generator=g)  # the official layout: (b, c, time, freq)
    txt, pooled = torch.randn(n, 5, 12, generator=g), torch.randn(n, 10, generator=g)
    t = torch.tensor([0.3, 0.9])  # rectified-flow time; ditk's model time is 1000 t
    # sample.prepare: tokens "b c (h ph) (w pw) -> b (h w) (c ph pw)", img_ids (0, h, w), txt_ids 0
    img = latent.reshape(n, c, frames // p, p, f // p, p).permute(0, 2, 4, 1, 3, 5).reshape(n, -1, c * p * p)
    img_ids = torch.zeros(frames // p, f // p, 3)
    img_ids[..., 1] += torch.arange(frames // p)[:, None]
    img_ids[..., 2] += torch.arange(f // p)[None, :]
    img_ids = img_ids.reshape(1, -1, 3).expand(n, -1, -1)
    ref = flux_reference(official, img, img_ids, txt, torch.zeros(n, 5, 3), t, pooled, 2, 2, heads=2, axes_dim=(2, 2, 4))
    ref = ref.reshape(n, frames // p, f // p, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(n, c, frames, f)
    with torch.no_grad():
        ours = model(latent.transpose(-1, -2), 1000 * t, context=txt, pooled=pooled)  # ditk: (N, C, F, T)
    torch.testing.assert_close(ours.transpose(-1, -2), ref, rtol=1e-5, atol=1e-5)
    assert ours.std() > 0.1


#################################################################################
#                  Paper-size presets: the official list converts               #
#################################################################################


UNCOND_32 = ("model.num_classes=0", "model.input_size=32", "model.in_channels=3", "autoencoder.name=identity")
PAPER_PRESETS = {  # preset: (overrides, official key/shape list of that size, from the official model code)
    "dis-h-2": ((), lambda: dis_official(48, 1536, 2)),  # dis_h_2: embed_dim 1536, depth 48
    "drwkv-h-2": ((), lambda: drwkv_official(37, 1024, 2)),  # DRWKV-H/2: embed_dim 1024, depth 37
    # the released M-2-uncond-32.pt: DRWKV-M/2, unconditional, 32x32x3 pixels (test.py's setting, 132.1M)
    "drwkv-m-2": (UNCOND_32, lambda: drwkv_official(25, 512, 2, c=3, num_classes=0)),
    "dimba-l-2": ((), lambda: dimba_official(28, 1152)),  # Dimba_L_2: depth 28, hidden 1152, 512 px (latent 64)
    "fluxmusic-giant": ((), lambda: fluxmusic_official(16, 32, 1408)),  # constants.build_model else-branch
    "fluxmusic-small": ((), lambda: fluxmusic_official(8, 16, 512)),
}


@pytest.mark.parametrize("preset", list(PAPER_PRESETS))
def test_paper_size_preset_takes_the_official_checkpoint(preset):
    from ditk.build import build_model
    from ditk.config import resolve

    overrides, shapes = PAPER_PRESETS[preset]
    cfg = resolve(preset, overrides, allow_missing=("data", "autoencoder", "conditioner"))
    with torch.device("meta"):
        model = build_model(cfg)
        official = {k: torch.empty(s) for k, s in shapes().items()}
    converted = model.convert_state_dict(official)
    ours = model.state_dict()
    assert set(converted) == set(ours)
    assert all(tuple(converted[k].shape) == tuple(ours[k].shape) for k in ours)


#################################################################################
#                           Errors name the fix                                 #
#################################################################################


def load_error(model, sd, tmp_path, key="ema"):
    with pytest.raises(ConfigError) as info:
        load_pretrained(model, save_official(tmp_path, sd, key))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_official_checkpoint_of_another_size_names_the_fix(tmp_path):
    bigger = random_state_dict(dis_official(6, 16, 2, c=3, num_classes=5, input_size=8, n=4), seed=8)
    assert "set model.depth=6 " in load_error(small_dis(), bigger, tmp_path)
    wider = random_state_dict(drwkv_official(7, 24, 2, c=3, num_classes=5, input_size=8), seed=9)
    message = load_error(small_drwkv(), wider, tmp_path)
    assert "model.hidden_size=24" in message and "model.depth=7" in message
    unconditional = random_state_dict(small_drwkv_official(num_classes=0), seed=9)
    assert "set model.num_classes=0 " in load_error(small_drwkv(), unconditional, tmp_path)
    flux = random_state_dict(fluxmusic_official(3, 1, 16, heads=2, c_in=8, vec=10, context=12), seed=10)
    message = load_error(small_flux(), flux, tmp_path)
    assert "model.depth_double=3" in message and "model.depth_single=1" in message
    dimba = random_state_dict(dimba_official(4, 16, c=3, cap=12, mamba_depth=4, n=4, input_size=8), seed=11)
    assert "model.mamba_ratio=1.0" in load_error(small_dimba(), dimba, tmp_path, key="state_dict")


def test_unknown_or_missing_keys_are_named(tmp_path):
    sd = random_state_dict(small_dis_official(), seed=12)
    sd["in_blocks.0.mixer.gamma"] = torch.ones(16, dtype=torch.float64)  # Vim's init_layer_scale option
    assert "unexpected 'blocks.0.mixer.gamma'" in load_error(small_dis(), sd, tmp_path)
    sd = random_state_dict(small_flux_official(), seed=13)
    del sd["single_blocks.1.linear2.bias"]
    assert "lacks 'blocks.3.linear2.bias'" in load_error(small_flux(), sd, tmp_path)


def test_unconditional_dis_checkpoint_into_a_class_model_names_the_fix(tmp_path):
    sd = random_state_dict(small_dis_official(num_classes=-1), seed=14)
    assert "set model.num_classes=0 " in load_error(small_dis(), sd, tmp_path)


#################################################################################
#                   The sampling entry point takes official files               #
#################################################################################


def test_load_pipeline_reads_an_official_file_with_a_preset(tmp_path):
    """`ditk sample FILE --preset digits-drwkv` goes through generate.load_pipeline -> load_pretrained."""
    from ditk.build import build_model
    from ditk.config import resolve
    from ditk.generate import load_pipeline

    cfg = resolve("digits-drwkv", allow_missing=("data",))
    m = cfg.model
    shapes = drwkv_official(m.depth, m.hidden_size, m.patch_size, c=m.in_channels, num_classes=m.num_classes,
                            input_size=m.input_size, hidden_rate=int(m.mlp_ratio))
    official = random_state_dict(shapes, seed=15, dtype=torch.float32)
    path = save_official(tmp_path, official, "ema")
    pipe = load_pipeline(str(path), preset="digits-drwkv", device="cpu")
    expected = build_model(cfg).convert_state_dict(official)
    loaded = pipe.model.state_dict()
    assert set(loaded) == set(expected) and all(torch.equal(loaded[k], expected[k]) for k in loaded)
