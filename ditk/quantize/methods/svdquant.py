"""SVDQuant (Li et al., "SVDQuant: Absorbing Outliers by Low-Rank Components for 4-Bit Diffusion Models", ICLR 2025).

  1. smoothing (its eq. 4, SmoothQuant): X̂ = X diag(λ)⁻¹, Ŵ = W diag(λ), λ_j = s(X_j)^α / s(W_j)^(1-α);
  2. low-rank branch (eq. 5-7): Ŵ = L₁L₂ + R with L₁L₂ the rank-r truncated SVD of Ŵ (the best rank-r fit, so
     the residual R = Ŵ - L₁L₂ has the smallest norm), kept in 16 bits;
  3. Y = Q(X̂) Q(R)ᵀ + X̂ L₂ᵀ L₁ᵀ: residual and activations in 4 bits, symmetric, per group of 64 input channels
     (its INT4 W4A4 setting), activations dynamic per token and group.

Choices: α = 0.5 for every layer (the paper searches α per layer); the 16-bit branch is rounded to bfloat16; a
group of 64 that does not divide a layer's width becomes its largest divisor below 64. With rank = the full rank,
R = 0 and the layer reproduces W exactly (tested). Defaults: --wbits 4 --abits 4, --opt rank=32 alpha=0.5.
"""

from __future__ import annotations

import torch

from ...registry import PTQ_METHODS
from ..quantizers import check_bits, quantize_weight
from ..smoothing import balance, balance_factors
from ._common import act_bits, collect, fit_group, merge_options, swap


def low_rank_split(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L₁ (out, r), L₂ (r, in), R = W - L₁L₂) from the SVD of W, computed in float64."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    l1 = u[:, :rank] * s[:rank]
    l2 = vh[:rank]
    return l1.to(weight.dtype), l2.to(weight.dtype), (weight.double() - l1 @ l2).to(weight.dtype)


DEFAULTS = {"rank": 32, "alpha": 0.5, "lowrank_dtype": "bfloat16"}


@PTQ_METHODS.register("svdquant", help="SVDQuant: smoothing + rank-r 16-bit low-rank branch + 4-bit residual (W4A4)")
def svdquant(model, layers, inputs, wbits=None, abits=None, group_size=None, options=None, log=print):
    opts = merge_options(DEFAULTS, options, "svdquant")
    wb = check_bits(4 if wbits is None else wbits, "--wbits", 2, 8)
    ab = act_bits(4 if abits is None else abits)
    group = 64 if group_size is None else group_size
    stats = collect(model, layers, inputs)
    records, residual = {}, {}
    for name in layers:
        linear = model.get_submodule(name)
        w = linear.weight.data
        lam = balance_factors(stats.absmax[name], w, float(opts["alpha"]))
        w_hat = balance(w, lam)
        rank = min(int(opts["rank"]), *w.shape)
        l1, l2, r = low_rank_split(w_hat, rank)
        g = fit_group(linear.in_features, group)
        act = None if ab is None else {"bits": ab, "granularity": "token-group", "group_size": g, "symmetric": True}
        residual[name] = round(float(r.norm() / w_hat.norm()), 4)
        records[name] = swap(model, name, quantize_weight(r, wb, g, symmetric=True), act,
                             {"weight_bits": wb, "group_size": g, "act_bits": ab, "rank": rank, "alpha": opts["alpha"],
                              "activations": "dynamic per token and group"},
                             smooth=lam, down=l2, up=l1, lowrank_dtype=opts["lowrank_dtype"])
    return {"weight_bits": wb, "act_bits": ab, "layers": records,
            "report": {"residual_norm_fraction": residual, "rank": int(opts["rank"]), "alpha": opts["alpha"]}}


svdquant.defaults = DEFAULTS  # checked by ditk.quantize.api before anything is loaded
