"""Uniform (integer) fake quantizers: the one piece of arithmetic every simulated method shares.

Asymmetric min-max quantization of a group of values v with b bits (Jacob et al. 2018, eq. 1-3):

    s = (max v - min v) / (2^b - 1),   z = round(-min v / s),   Q(v) = s * (clamp(round(v / s) + z, 0, 2^b - 1) - z)

so every value inside [min v, max v] is reproduced within s / 2 (the error bound tests/test_quantize.py checks).
Symmetric: s = max|v| / (2^(b-1) - 1), z = 0, codes in [-(2^(b-1) - 1), 2^(b-1) - 1] (error <= s / 2 as well).

"Groups" decide what shares one (s, z):
  weights W (out, in):  per-tensor; per-channel (one row = one output channel); per-group of `g` consecutive
                        input channels of a row (Q-DiT, SVDQuant, GPTQ's groups).
  activations X (..., in): per-tensor; per-token (one row of features, ViDiT-Q, dynamic); per-group of `g`
                        channels of one token (SVDQuant's W4A4); per-sample per-group (Q-DiT: one (s, z) per sample
                        and channel group, over all its tokens).
Dynamic quantizers compute (s, z) from the tensor at hand; static ones use a scale calibrated beforehand.
The result is "fake-quantized": dequantized back to floating point, so it measures quality, not speed.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import ConfigError


def check_bits(bits: int, what: str = "bits", low: int = 2, high: int = 16) -> int:
    if not isinstance(bits, int) or not low <= bits <= high:
        raise ConfigError(f"{what}={bits} is not supported: use an integer from {low} to {high}")
    return bits


def minmax_params(v: torch.Tensor, bits: int, symmetric: bool = False, dim: int = -1):
    """(scale, zero, qmin, qmax) for the groups laid out along `dim` of v (kept as size-1 dims)."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        amax = v.abs().amax(dim=dim, keepdim=True)
        scale = (amax / qmax).clamp_min(1e-12)
        return scale, torch.zeros_like(scale), -qmax, qmax
    qmax = 2**bits - 1
    lo = v.amin(dim=dim, keepdim=True).clamp_max(0)  # the grid always contains 0 (exact zeros stay zero)
    hi = v.amax(dim=dim, keepdim=True).clamp_min(0)
    scale = ((hi - lo) / qmax).clamp_min(1e-12)
    zero = torch.round(-lo / scale)
    return scale, zero, 0, qmax


def fake_quant(v: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Quantize to integer codes and back (broadcasting scale/zero over v)."""
    q = torch.clamp(torch.round(v / scale) + zero, qmin, qmax)
    return (q - zero) * scale


def quantize_groups(v: torch.Tensor, bits: int, symmetric: bool = False) -> torch.Tensor:
    """Fake-quantize every row of the last dim of v as one group (dynamic min-max)."""
    return fake_quant(v, *minmax_params(v, bits, symmetric))


def quantize_weight(w: torch.Tensor, bits: int, group_size: Optional[int] = None, symmetric: bool = False) -> torch.Tensor:
    """W (out, in): per output channel (group_size None) or per group of `group_size` input channels."""
    out_f, in_f = w.shape
    if group_size is None or group_size >= in_f:
        return quantize_groups(w, bits, symmetric)
    if in_f % group_size:
        raise ConfigError(f"group size {group_size} does not divide the layer's {in_f} input channels: pick a divisor")
    return quantize_groups(w.reshape(out_f, in_f // group_size, group_size), bits, symmetric).reshape(out_f, in_f)


def quantize_activation(x: torch.Tensor, bits: int, granularity: str = "token", group_size: Optional[int] = None,
                        symmetric: bool = False, static_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """X (..., in). granularity: 'tensor' (static_scale: calibrated symmetric per-tensor scale, else dynamic),
    'token' (one scale per row), 'token-group' (one per group of `group_size` channels of a row),
    'sample-group' (Q-DiT: one per sample and channel group, X is (N, T, in) or (N, in))."""
    if granularity == "tensor":
        if static_scale is not None:
            qmax = 2 ** (bits - 1) - 1
            return fake_quant(x, static_scale, torch.zeros_like(static_scale), -qmax, qmax)
        return quantize_groups(x.reshape(1, -1), bits, symmetric).reshape(x.shape)
    if granularity == "token":
        return quantize_groups(x, bits, symmetric)
    in_f = x.shape[-1]
    g = group_size or in_f
    if in_f % g:
        raise ConfigError(f"activation group size {g} does not divide {in_f} channels: pick a divisor")
    if granularity == "token-group":
        return quantize_groups(x.reshape(*x.shape[:-1], in_f // g, g), bits, symmetric).reshape(x.shape)
    if granularity == "sample-group":
        n = x.shape[0]
        t = x.reshape(n, -1, in_f // g, g).transpose(1, 2)  # (N, groups, T, g)
        q = quantize_groups(t.reshape(n, in_f // g, -1), bits, symmetric).reshape(t.shape)
        return q.transpose(1, 2).reshape(x.shape)
    raise ConfigError(f"unknown activation granularity '{granularity}': tensor, token, token-group or sample-group")


def static_scale(amax: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-tensor scale for a calibrated absolute maximum."""
    return (amax / (2 ** (bits - 1) - 1)).clamp_min(1e-12).reshape(1)
