"""GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers",
ICLR 2023), Algorithm 1, for one Linear layer.

Minimise ||W X - Ŵ X||² column by column: with H = 2 X Xᵀ (eq. 1-2 of OBQ/GPTQ) and the upper Cholesky factor
U of H⁻¹ (H⁻¹ = Uᵀ U), quantize column i, then spread its error over the not-yet-quantized columns:

    δ = (w_i - q(w_i)) / U_ii,      W[:, i:] -= δ U[i, i:]                     (GPTQ eq. 3 / Alg. 1 lines 8-9)

Choices: dampening λ = 0.01 mean(diag H) (the paper's default); the scale of a group is computed when its first
column is reached, from the current (already error-corrected) weights, as in the reference code; no act-order;
lazy block updates of 128 columns (§4: the same arithmetic, batched). Dead input channels (diag H = 0) are zeroed.
"""

from __future__ import annotations

from typing import Optional

import torch

from .quantizers import fake_quant, minmax_params


def gptq(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: Optional[int] = None,
         symmetric: bool = False, damp: float = 0.01, block: int = 128) -> torch.Tensor:
    """Quantized (dequantized) weight of shape (out, in). hessian: X Xᵀ summed over the calibration rows (in, in)."""
    w = weight.detach().double().clone()
    h = hessian.detach().double().clone()
    n_in = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(n_in, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    group = group_size if group_size and group_size < n_in else n_in
    for b0 in range(0, n_in, block):  # lazy batch updates (GPTQ §4 "Step 2"): the same arithmetic, block-wise
        b1 = min(b0 + block, n_in)
        wb, ub = w[:, b0:b1].clone(), u[b0:b1, b0:b1]
        errs = torch.zeros_like(wb)
        for j in range(b1 - b0):
            i = b0 + j
            if i % group == 0:  # a new group: its scale and zero from the group's current (corrected) weights
                cols = torch.cat([wb[:, j:], w[:, b1:]], dim=1)[:, :group]
                scale, zero, qmin, qmax = minmax_params(cols, bits, symmetric)
            q[:, i] = fake_quant(wb[:, j:j + 1], scale, zero, qmin, qmax)[:, 0]
            errs[:, j] = (wb[:, j] - q[:, i]) / ub[j, j]
            wb[:, j:] -= errs[:, j:j + 1] * ub[j, j:][None, :]
        w[:, b1:] -= errs @ u[b0:b1, b1:]
    return q.to(weight.dtype)
