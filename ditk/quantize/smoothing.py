"""Channel balancing between activations and weights (SmoothQuant, Xiao et al. ICML 2023, eq. 4), used by PTQ4DiT's
CSB and SVDQuant's smoothing:

    b_j = s(X_j)^α / s(W_j)^(1-α),     X' = X diag(b)⁻¹,     W' = W diag(b)          (W: (out, in), y = X Wᵀ)

so X' W'ᵀ = X Wᵀ exactly (in exact arithmetic; tests/test_quantize_methods.py checks it in float64), while the
quantization difficulty moves from the activation channels with large salience s(X_j) = max|X_j| to the weights.
α = 0.5 is PTQ4DiT's b_j = sqrt(s(X_j) / s(W_j)) (its eq. 6).
"""

from __future__ import annotations

import torch


def weight_salience(weight: torch.Tensor) -> torch.Tensor:
    """s(W_j) = max over output channels of |W_oj|, per input channel j."""
    return weight.abs().amax(dim=0)


def balance_factors(x_salience: torch.Tensor, weight: torch.Tensor, alpha: float = 0.5, eps: float = 1e-8) -> torch.Tensor:
    """b (in,) with b_j = s(X_j)^α / s(W_j)^(1-α); channels that never fire (s(X_j) = 0) keep b_j = 1."""
    sx = x_salience.double().clamp_min(eps)
    sw = weight_salience(weight).double().clamp_min(eps)
    b = sx.pow(alpha) / sw.pow(1 - alpha)
    b = torch.where(x_salience.double() > eps, b, torch.ones_like(b))
    return b.to(weight.dtype)


def balance(weight: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """W diag(b): the weight that multiplies X diag(b)⁻¹."""
    return weight * b[None, :]
