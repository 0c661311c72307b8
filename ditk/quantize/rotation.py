"""Orthogonal Hadamard rotations for activation outliers (QuaRot / LRQ-DiT style): Y = X Wᵀ = (X R)(W R)ᵀ for any
orthogonal R, and X R spreads a channel's outlier over the whole block, so per-token activation quantization loses
less. R is a normalised Sylvester Hadamard matrix, block-diagonal when the width is not a power of two."""

from __future__ import annotations

import torch


def hadamard(n: int, dtype=torch.float32) -> torch.Tensor:
    """Sylvester Hadamard matrix of order n (a power of two), scaled by 1/sqrt(n) so that H Hᵀ = I."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power-of-two order, not {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n**0.5).to(dtype)


def block_size(n: int) -> int:
    """The largest power of two dividing n: the Hadamard block of a width-n rotation (96 -> 32)."""
    return n & -n


def block_hadamard(n: int, block: int, dtype=torch.float32) -> torch.Tensor:
    """diag(H_block, ..., H_block) (n, n): orthogonal, rotating each run of `block` channels."""
    return torch.block_diag(*[hadamard(block, torch.float64)] * (n // block)).to(dtype)
