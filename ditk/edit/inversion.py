"""Inversion: the sampling loop (`ditk.sampling.sample`) run over a reversed time grid (`ditk.edit.grids`).

`invert` maps data (pixels or latents) to the noise that regenerates it and `reconstruct` runs the same grid
forwards. Inversion runs without guidance (cfg scale 1): guidance is not invertible (RF-Solver-Edit #16,
prompt-to-prompt #27); the editing pass may guide.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..errors import ConfigError
from .grids import BDIAGrid, DDIMGrid, EDICTGrid, FlowGrid

# method -> (objective it applies to, one-line description, model evaluations per step (NFE for N steps))
METHODS = {
    "ddim": ("ddpm", "DDIM inversion (eps models; the learned-sigma half is ignored)", "N"),
    "bdia": ("ddpm", "BDIA-DDIM, exact inversion (eps models), gamma=1", "N"),
    "edict": ("ddpm", "EDICT, exact inversion by coupled transformations (eps models), p=0.93", "2N"),
    "euler": ("rectified-flow", "Euler steps of the flow ODE", "N"),
    "rf-solver": ("rectified-flow", "RF-Solver, 2nd-order Taylor (midpoint) steps", "2N"),
    "fireflow": ("rectified-flow", "FireFlow, midpoint with the previous step's velocity reused", "N+1"),
    "rf-inversion": ("rectified-flow", "RF-Inversion, controlled forward ODE towards a fixed noise (gamma)", "N"),
}
OPTIONS = {"bdia": ("gamma",), "edict": ("p",), "rf-inversion": ("gamma", "eta", "start", "stop"), "euler": ("shift",),
           "rf-solver": ("shift",), "fireflow": ("shift",)}
DEFAULT_METHOD = {"ddpm": "ddim", "rectified-flow": "rf-solver"}


def check_method(method: str, objective, options: Optional[dict] = None) -> None:
    if method not in METHODS:
        raise ConfigError(f"unknown inversion method '{method}': use one of {', '.join(METHODS)}")
    wants = METHODS[method][0]
    if objective.name != wants:
        fits = ", ".join(m for m, v in METHODS.items() if v[0] == objective.name)
        raise ConfigError(f"--method {method} is for {wants} models; this model is {objective.name}: use one of {fits}")
    allowed = OPTIONS.get(method, ())
    if method in ("rf-inversion",):
        allowed = allowed + ("shift",)
    unknown = sorted(set(options or {}) - set(allowed))
    if unknown:
        raise ConfigError(f"option(s) {', '.join(unknown)} do not apply to --method {method}"
                          + (f": use {', '.join(allowed)}" if allowed else ""))


def make_grid(method: str, objective, steps: int, direction: str, options: Optional[dict] = None,
              pair: Optional[torch.Tensor] = None, y1=None, y0=None):
    """The grid object of `method` for one pass of the loop."""
    options = dict(options or {})
    check_method(method, objective, options)
    if method == "ddim":
        return DDIMGrid(objective, steps, direction)
    if method == "bdia":
        return BDIAGrid(objective, steps, direction, gamma=float(options.get("gamma", 1.0)), pair=pair)
    if method == "edict":
        return EDICTGrid(objective, steps, direction, p=float(options.get("p", 0.93)), pair=pair)
    flow = {k: float(v) for k, v in options.items()}
    return FlowGrid(objective, steps, method=method, direction=direction, y1=y1, y0=y0, **flow)


def grid_metadata(grid) -> dict:
    """The schedule a reconstruction needs to be identical: alpha_bar per node (DDPM) or sigma per node (flow)."""
    if isinstance(grid, FlowGrid):
        return {"kind": "sigmas", "values": [float(s) for s in grid.sigmas]}
    return {"kind": "alphas_cumprod", "values": [float(a) for a in grid.alphas]}


class Trajectory:
    """A step hook that records the point the model is evaluated at before every evaluation, and the end point."""

    def __init__(self):
        self.points: list[torch.Tensor] = []

    def step_begin(self, i, t, x):
        self.points.append(x.detach().cpu().clone())

    def step_end(self, i, t, x, out, prev):
        self._last = prev
        return prev

    def stacked(self) -> torch.Tensor:
        """(K + 1, N, C, H, W): the evaluation points then the end point."""
        return torch.stack(self.points + [self._last.detach().cpu()])


@dataclass
class Inverted:
    noise: torch.Tensor  # (N, C, H, W): the terminal point z_N
    pair: Optional[torch.Tensor]  # the second state member (BDIA z_{N-1}, EDICT y_N); None for the others
    nfe: int
    grid: dict
    trajectory: Optional[torch.Tensor] = None
    extra: dict = field(default_factory=dict)


def invert(model, objective, x0: torch.Tensor, cond: dict, method: str, steps: int, options: Optional[dict] = None,
           step_hooks: Sequence = (), trajectory: bool = False, seed: int = 0, first_index: int = 0,
           progress: bool = False) -> Inverted:
    """Invert data x0 (N, C, H, W) under the condition `cond` (model kwargs), without guidance. Image i of the batch
    is input number first_index + i: rf-inversion draws its noise target from the seed (seed, that number), so the
    result does not depend on the batch size."""
    from ..sampling import sample

    y1 = None
    if method == "rf-inversion":  # the fixed noise target of the controlled forward ODE, one per image
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + first_index + i) for i in range(len(x0))]
        y1 = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(x0.device)
    grid = make_grid(method, objective, steps, "invert", options, y1=y1)
    hooks = list(step_hooks)
    traj = Trajectory() if trajectory else None
    if traj is not None:
        hooks.append(traj)
    out = sample(model, objective, x0, cond, solver=grid, step_hooks=hooks, progress=progress)
    noise, pair = grid.final_state(out)
    return Inverted(noise=noise, pair=pair, nfe=grid.nfe, grid=grid_metadata(grid),
                    trajectory=traj.stacked() if traj is not None else None)


def sampling_start(inverted: Inverted) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(the loop's start point, the grid's pair state) for running an inversion's grid forwards. BDIA's state is
    (z_N, z_{N-1}): the loop starts at z_{N-1} with z_N as the grid's other member; EDICT's (x_N, y_N) starts at y_N;
    other methods start at z_N."""
    if inverted.pair is not None:
        return inverted.pair, inverted.noise
    return inverted.noise, None


def reconstruct(model, objective, inverted: Inverted, cond: dict, method: str, steps: int,
                options: Optional[dict] = None, step_hooks: Sequence = (), progress: bool = False) -> tuple[torch.Tensor, int]:
    """Run the grid of the inversion forwards from its terminal state; returns (x0, NFE)."""
    from ..sampling import sample

    opts = dict(options or {})
    if method == "rf-inversion":
        opts["eta"] = 0.0  # plain reconstruction: no control towards a reference
    start, pair = sampling_start(inverted)
    grid = make_grid(method, objective, steps, "sample", opts, pair=pair)
    x = sample(model, objective, start, cond, solver=grid, step_hooks=list(step_hooks), progress=progress)
    return x, grid.nfe
