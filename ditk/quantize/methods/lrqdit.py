"""LRQ-DiT (Yang et al., "LRQ-DiT: Log-Rotation Post-Training Quantization of Diffusion Transformers", arXiv
2508.03485, 2025). No official code; written from the paper's description, not its exact equations (which were
not available offline), so every formula below is ours and named as such.

  1. Twin-Log Quantization (TLQ) of the weights. DiT weights are Gaussian-like with long tails: a uniform grid
     wastes levels on the tail, a single log2 grid s·2^{-i} puts its levels too near zero. TLQ uses two log2 grids
     per output channel: a dense-region grid τ·2^{-i} (i = 0..L-2, plus 0) and a tail grid m·2^{-i}
     (i = 0..L-1, m = max|w|), L = 2^(b-2) levels each (1 sign bit, 1 bit selects the grid, b-2 bits the
     exponent). τ is searched per channel over τ = m·2^{-k/4}, k = 1..4·max(2L, 8), minimising ‖w − Q(w)‖²,
     and each weight takes the nearest level of the two grids (nearest in value: the least squared error for
     the given grids). τ = m·2^{-L} gives back the single b-bit log2 grid (2L − 1 powers of two and 0), so the
     search can only improve on it.
  2. Adaptive Rotation Scheme (ARS). Activations get an orthogonal Hadamard rotation R (block-diagonal, block =
     largest power of two dividing the width): Y = X Wᵀ = (X R)(W R)ᵀ exactly, and per-token quantization of X R
     suffers less from mild outliers. Layers with salient outliers (few channels much larger than the rest,
     measured by the fluctuation max_j s(X_j) / median_j s(X_j) of the calibration absmax above `threshold`)
     are first balanced (SmoothQuant, α 0.5) and then rotated: our reading of the paper's "outlier-aware
     rotation"; the others get the plain Hadamard rotation.
  3. Activations: dynamic per-token, symmetric, after the rotation.

Defaults: --wbits 4 --abits 8, --opt threshold=8 alpha=0.5.
"""

from __future__ import annotations

import torch

from ...registry import PTQ_METHODS
from ..quantizers import check_bits
from ..rotation import block_hadamard, block_size
from ..smoothing import balance_factors
from ._common import act_bits, collect, merge_options, swap


def nearest_level(w: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """sign(w) · the level (per row, levels (rows, K) of magnitudes) nearest to |w| (rows, n)."""
    mag = w.abs()
    idx = (mag.unsqueeze(-1) - levels.unsqueeze(1)).abs().argmin(dim=-1)
    return torch.sign(w) * levels.gather(1, idx)


def log2_quantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    """The single log2 quantizer (per row): 1 sign bit, magnitudes {0} ∪ {m·2^{-i}: i = 0..2^(b-1)-2}."""
    m = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
    exps = torch.arange(2 ** (bits - 1) - 1, dtype=w.dtype)
    levels = torch.cat([m * 2.0 ** -exps, torch.zeros_like(m)], dim=1)
    return nearest_level(w, levels)


def twin_log_quantize(w: torch.Tensor, bits: int, ratios: int = 4) -> torch.Tensor:
    """TLQ (per row): nearest of the dense grid {0} ∪ τ·2^{-i}, i < L-1, and the tail grid m·2^{-i}, i < L;
    L = 2^(b-2); τ = m·2^{-k/ratios} (k = 1..ratios·max(2L, 8)) chosen per row for the least squared error."""
    L = 2 ** (bits - 2)
    m = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
    tail = m * 2.0 ** -torch.arange(L, dtype=w.dtype)  # (rows, L)
    best, best_err = None, None
    for k in range(1, ratios * max(2 * L, 8) + 1):  # τ from just below m down to m·2^{-max(2L, 8)}
        tau = m * 2.0 ** (-k / ratios)
        dense = torch.cat([tau * 2.0 ** -torch.arange(L - 1, dtype=w.dtype), torch.zeros_like(m)], dim=1)
        q = nearest_level(w, torch.cat([tail, dense], dim=1))  # 2L magnitudes: b - 1 bits + the sign
        err = ((q - w) ** 2).sum(dim=1, keepdim=True)
        if best is None:
            best, best_err = q, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, q, best), torch.minimum(err, best_err)
    return best


def fluctuation(absmax: torch.Tensor) -> float:
    """max_j s(X_j) / median_j s(X_j): large when a few channels carry salient outliers."""
    return float(absmax.max() / absmax.median().clamp_min(1e-12))


DEFAULTS = {"threshold": 8.0, "alpha": 0.5}


@PTQ_METHODS.register("lrqdit", help="LRQ-DiT: twin-log weight quantizer + adaptive Hadamard rotation (W4A8)")
def lrqdit(model, layers, inputs, wbits=None, abits=None, group_size=None, options=None, log=print):
    opts = merge_options(DEFAULTS, options, "lrqdit")
    wb = check_bits(4 if wbits is None else wbits, "--wbits", 3, 8)
    ab = act_bits(8 if abits is None else abits)
    stats = collect(model, layers, inputs)
    records, chosen = {}, {}
    for name in layers:
        linear = model.get_submodule(name)
        w = linear.weight.data.float()
        fl = fluctuation(stats.absmax[name])
        smooth = balance_factors(stats.absmax[name], w, float(opts["alpha"])) if fl > float(opts["threshold"]) else None
        w_s = w if smooth is None else w * smooth[None, :]
        block = block_size(linear.in_features)
        w_r = w_s @ block_hadamard(linear.in_features, block).to(w.device)  # (W diag(s)) R
        chosen[name] = {"fluctuation": round(fl, 2), "rotation": "smooth+hadamard" if smooth is not None else "hadamard",
                        "block": block}
        act = None if ab is None else {"bits": ab, "granularity": "token", "symmetric": True}
        records[name] = swap(model, name, twin_log_quantize(w_r, wb).to(linear.weight.dtype), act,
                             {"weight_bits": wb, "weights": "twin-log per channel", "act_bits": ab,
                              "activations": "dynamic per token", **chosen[name]},
                             smooth=smooth, rotation=block)
    return {"weight_bits": wb, "act_bits": ab, "layers": records, "report": {"rotation": chosen}}


lrqdit.defaults = DEFAULTS  # checked by ditk.quantize.api before anything is loaded
