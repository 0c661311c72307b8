"""Long clips (MusicCM, Fei et al. 2024 sec. "long music generation"; MultiDiffusion, Bar-Tal et al. 2023).

A clip longer than the training window is generated on one canvas of the full length. At every solver step the
canvas is cut into overlapping windows of the training width, each window is one diffusion process (the model
sees exactly what it was trained on, with its own window-local positions), and the processes are reconciled on
their overlaps: the canvas' update is the per-position weighted average of the windows' predictions. That is
MultiDiffusion's closed-form step, argmin_J sum_i ||W_i * (crop_i(J) - Psi(crop_i(J_t)))||^2 (MusicCM's "shared,
restricted" crops fused by least squares): since every solver step is linear in the model output, averaging the
outputs and stepping once equals stepping each window and averaging the results.

Weights: `uniform` is MultiDiffusion's plain average. It leaves seams: a window knows least near its own edges,
and where one window ends and the next begins the set being averaged changes abruptly, so the fused update jumps
there at every step (tests/test_long_clip.py measures seam jumps about twice the changes inside windows on data
with a known exact model). `hann` (default) weights each window by sin^2(pi (j + 1/2) / width), which fades every
window out towards its edges: the fused update is continuous and the finished clip has no seams.

`MultiDiffusion` wraps a ditk model with the same call signature, so `ditk.sampling.sample` (every solver, CFG)
runs unchanged on the wide canvas. Feature caching (`ditk.cache`) reaches the wrapped model's blocks through
`cache_denoiser`: each call of the model within one evaluation (a group of at most `max_batch` windows, the same
group at every step) keeps its own cache state, and every row of it is one window of one sample's conditional or
unconditional pass, so a window's cache never serves another window or the other CFG branch.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..errors import ConfigError


def window_starts(total: int, window: int, stride: int) -> list[int]:
    """Start columns of windows of width `window` that cover [0, total): every `stride`, plus one flush with the end."""
    if window <= 0 or stride <= 0 or stride > window:
        raise ConfigError(f"window {window} and stride {stride} must satisfy 0 < stride <= window")
    if total <= window:
        return [0]
    starts = list(range(0, total - window + 1, stride))
    if starts[-1] != total - window:
        starts.append(total - window)
    return starts


WEIGHTINGS = ("hann", "uniform")


def window_weights(window: int, weighting: str = "hann") -> torch.Tensor:
    if weighting not in WEIGHTINGS:
        raise ConfigError(f"unknown window weighting '{weighting}': use one of {', '.join(WEIGHTINGS)}")
    if weighting == "uniform":
        return torch.ones(window)
    return torch.sin(math.pi * (torch.arange(window) + 0.5) / window) ** 2  # > 0 everywhere, small at the edges


class MultiDiffusion(nn.Module):
    """model(x (N, C, F, W), t, **cond) with W > window: the weighted average, at every column, of the model's
    outputs on all the windows that contain it. Windows of one sample share its conditioning and time."""

    def __init__(self, model: nn.Module, window: int, stride: int, max_batch: int = 64, weighting: str = "hann"):
        super().__init__()
        self.model = model
        self.window, self.stride, self.max_batch = int(window), int(stride), int(max_batch)
        self.weights = window_weights(self.window, weighting)
        for name in ("in_channels", "out_channels", "input_size", "learn_sigma", "num_classes"):
            setattr(self, name, getattr(model, name))

    @property
    def cache_denoiser(self) -> nn.Module:
        """The module whose blocks a cache policy patches (see ditk.cache.base.Session)."""
        return self.model

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        n, width = x.shape[0], x.shape[-1]
        starts = window_starts(width, self.window, self.stride)
        if len(starts) == 1 and width == self.window:
            return self.model(x, t, **cond)
        if width < self.window:
            raise ConfigError(f"canvas of {width} columns is narrower than the window ({self.window})")
        crops = torch.cat([x[..., s:s + self.window] for s in starts])  # window-major: (windows * N, C, F, window)
        times = t.repeat(len(starts))
        conds = {k: v.repeat(len(starts), *([1] * (v.dim() - 1))) for k, v in cond.items()}
        outs = []
        for b in range(0, crops.shape[0], self.max_batch):
            part = slice(b, b + self.max_batch)
            outs.append(self.model(crops[part], times[part], **{k: v[part] for k, v in conds.items()}))
        outs = torch.cat(outs).reshape(len(starts), n, -1, *x.shape[2:-1], self.window)
        w = self.weights.to(outs.dtype).to(x.device)
        total = torch.zeros(n, outs.shape[2], *x.shape[2:], dtype=outs.dtype, device=x.device)
        norm = torch.zeros(width, dtype=outs.dtype, device=x.device)
        for out, s in zip(outs, starts):
            total[..., s:s + self.window] += out * w
            norm[s:s + self.window] += w
        return total / norm


def canvas_width(frames: int, window: int, multiple: int) -> int:
    """Columns of a canvas holding `frames` columns: at least one window, rounded up to a multiple of the patch."""
    width = max(int(frames), int(window))
    return int(math.ceil(width / multiple) * multiple)


def seam_jumps(spec: torch.Tensor, seams: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Column-to-column change |x[..., j] - x[..., j-1]| (mean over the other axes) at the `seams` and elsewhere.

    spec: (..., W). Returns (changes at the seams, changes at every other column)."""
    diff = (spec[..., 1:] - spec[..., :-1]).abs()
    per_col = diff.reshape(-1, diff.shape[-1]).mean(0)  # change into column j + 1
    at = torch.tensor([s - 1 for s in seams if 0 < s < spec.shape[-1]], dtype=torch.long)
    mask = torch.ones_like(per_col, dtype=torch.bool)
    mask[at] = False
    return per_col[at], per_col[mask]
