"""ODE grids that run in both directions: the solver entries of `ditk invert` and `ditk edit`.

Each class is a scheduler-like object for the one sampling loop (`ditk.sampling.sample(..., solver=grid)`): it has
`timesteps` (the scheduler timesteps the loop evaluates the model at, in order) and `step(out, t, x)` returning the
next point. The same object integrates towards data (direction "sample") or towards noise ("invert"): inversion is
the sampling loop run over the reversed time grid. Grids are single use (they count their evaluations).

Every evaluation also has a `key` (`eval_key(i)`) that is the same for the inversion evaluation and the sampling
evaluation of the same grid interval and stage, so features captured while inverting can be injected while
sampling (RF-Solver-Edit pairs its stored V by (t, order) the same way).

Nodes are numbered from data (0) to noise (N). DDPM grids hold alpha_bar per node (node 0 = clean, alpha_bar 1);
flow grids hold sigma per node (sigma_0 = 0 data, sigma_N = 1 noise; z = (1 - sigma) x0 + sigma eps).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import numpy as np
import torch

from ..errors import ConfigError

DIRECTIONS = ("sample", "invert")


def _out(x):
    return SimpleNamespace(prev_sample=x)


class _Grid:
    name = "grid"
    init_noise_sigma = 1.0

    def __init__(self, direction: str):
        if direction not in DIRECTIONS:
            raise ConfigError(f"direction must be one of {DIRECTIONS}, got '{direction}'")
        self.direction = direction
        self.invert = direction == "invert"
        self._i = 0  # index of the next evaluation
        self.nfe = 0

    def eval_key(self, i: int):
        return self._keys[i]

    def final_state(self, out: torch.Tensor):
        """(terminal noise, the other state member or None) after an inversion whose loop returned `out`."""
        return out, getattr(self, "pair", None)

    @property
    def num_evaluations(self) -> int:
        return len(self.timesteps)


# ------------------------------------------------------------------------------------------------ DDPM (epsilon)


def ddim_alphas(objective, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The DDIM grid of `ditk sample --solver ddim` (DiT's "ddimN": diffusers "leading", set_alpha_to_one):
    node k >= 1 is training timestep (k - 1) * (T // N), node 0 the clean image (alpha_bar 1, model time 0).
    Returns (model timesteps per node, alpha_bar per node), float64."""
    T = objective.num_timesteps
    if not 1 <= steps <= T:
        raise ConfigError(f"steps={steps} is outside 1..{T}")
    stride = T // steps
    times = np.array([0] + [k * stride for k in range(steps)], dtype=np.int64)
    ac = objective.alphas_cumprod.double().numpy()
    alphas = np.concatenate([[1.0], ac[times[1:]]])
    return times, alphas


def ddim_move(x: torch.Tensor, eps: torch.Tensor, a_from: float, a_to: float) -> torch.Tensor:
    """The deterministic DDIM map between noise levels: x0_hat = (x - sqrt(1-a) eps) / sqrt(a), then
    x' = sqrt(a') x0_hat + sqrt(1 - a') eps (Song et al. 2021, eq. 12 with sigma = 0). Computed in float64
    coefficients; run towards lower a (sampling) or higher noise (DDIM inversion, eps(x_t) ~ eps(x_t+1))."""
    c_x = (a_to / a_from) ** 0.5
    c_e = (1 - a_to) ** 0.5 - (a_to * (1 - a_from) / a_from) ** 0.5
    return c_x * x + c_e * eps


class DDIMGrid(_Grid):
    """DDIM over `ddim_alphas`; inversion evaluates eps at the start of each interval (the usual DDIM inversion,
    whose only error is eps(x_k) != eps(x_{k+1}), which shrinks as the steps grow). 1 NFE per step."""

    name = "ddim"

    def __init__(self, objective, steps: int, direction: str = "sample"):
        super().__init__(direction)
        times, self.alphas = ddim_alphas(objective, steps)
        self.steps = steps
        # sample: evaluate at nodes N..1, move to N-1..0; invert: evaluate at nodes 0..N-1, move to 1..N.
        self.nodes = list(range(0, steps)) if self.invert else list(range(steps, 0, -1))
        self.timesteps = torch.tensor([float(times[k]) for k in self.nodes])
        # interval k = (node k, node k+1)
        self._keys = [("interval", k) if self.invert else ("interval", k - 1) for k in self.nodes]

    def step(self, out, t, x):
        k = self.nodes[self._i]
        to = k + 1 if self.invert else k - 1
        self._i += 1
        self.nfe += 1
        return _out(ddim_move(x, out, float(self.alphas[k]), float(self.alphas[to])))


class BDIAGrid(_Grid):
    """BDIA-DDIM (Zhang et al., ECCV 2024, "Exact Diffusion Inversion via Bi-directional Integration Approximation"):
    z_{k-1} = gamma z_{k+1} + (1 - gamma) z_k - gamma D(k -> k+1; z_k) + D(k -> k-1; z_k), with
    D(k -> j; z_k) = ddim_move(z_k, eps(z_k), a_k, a_j) - z_k. Linear in z_{k+1}, so inversion solves it for z_{k+1}
    from (z_k, z_{k-1}) exactly, with the same eps(z_k): the round trip is exact up to floating point.

    The state is a pair: inversion returns z_N and keeps z_{N-1} in `pair`; sampling from a pair (`pair=z_{N-1}`)
    reproduces the inverted trajectory. Sampling from noise alone takes a plain DDIM first step (as the paper).
    Inversion starts with one DDIM-inversion step z_0 -> z_1 (the only approximate step; sampling retraces it
    exactly because it is part of the stored pair chain). gamma = 1 (the default) is the symmetric scheme."""

    name = "bdia"

    def __init__(self, objective, steps: int, direction: str = "sample", gamma: float = 1.0,
                 pair: Optional[torch.Tensor] = None):
        super().__init__(direction)
        if not 0 < gamma <= 1:
            raise ConfigError(f"bdia gamma must be in (0, 1], got {gamma}")
        if steps < 2:
            raise ConfigError("bdia needs at least 2 steps")
        times, self.alphas = ddim_alphas(objective, steps)
        self.gamma, self.steps = float(gamma), steps
        if self.invert:
            self.nodes = list(range(0, steps))
        else:
            # with a pair (z_N, z_{N-1}) the first evaluation is at node N-1; from noise alone at node N
            self.nodes = list(range(steps - 1, 0, -1)) if pair is not None else list(range(steps, 0, -1))
        self.timesteps = torch.tensor([float(times[k]) for k in self.nodes])
        self._keys = [("node", k) for k in self.nodes]
        self.pair = pair  # the other member of the state: z_{k+1} when sampling, z_{k-1} when inverting
        self._started = False

    def _move(self, x, eps, k, j):
        return ddim_move(x, eps, float(self.alphas[k]), float(self.alphas[j]))

    def step(self, out, t, x):
        k = self.nodes[self._i]
        self._i += 1
        self.nfe += 1
        g = self.gamma
        if self.invert:
            if k == 0:  # z_0 -> z_1: DDIM inversion
                new = self._move(x, out, 0, 1)
            else:
                z_prev = self.pair  # z_{k-1}
                rhs = z_prev - (1 - g) * x + g * (self._move(x, out, k, k + 1) - x) - (self._move(x, out, k, k - 1) - x)
                new = rhs / g
            self.pair = x  # after the step, the state is (z_{k+1}, z_k)
            return _out(new)
        if self.pair is None:  # sampling from noise alone: DDIM first step
            new = self._move(x, out, k, k - 1)
        else:
            z_next = self.pair  # z_{k+1}
            new = g * z_next + (1 - g) * x - g * (self._move(x, out, k, k + 1) - x) + (self._move(x, out, k, k - 1) - x)
        self.pair = x
        return _out(new)


class EDICTGrid(_Grid):
    """EDICT (Wallace et al., CVPR 2023, "Exact Diffusion Inversion via Coupled Transformations") over the DDIM
    grid, with the DDIM map written x' = a x + b eps (a, b from `ddim_move`). Sampling one step t -> s:
        x_i = a x_t + b eps(y_t, t);   y_i = a y_t + b eps(x_i, t)
        x_s = p x_i + (1 - p) y_i;     y_s = p y_i + (1 - p) x_s
    Inversion solves the same equations backwards, s -> t (affine in x, y given eps at the same points):
        y_i = (y_s - (1 - p) x_s) / p; x_i = (x_s - (1 - p) y_i) / p
        y_t = (y_i - b eps(x_i, t)) / a;  x_t = (x_i - b eps(y_t, t)) / a
    so the model sees the same two points in both directions: exact up to floating point. 2 NFE per step, p = 0.93
    (the paper's mixing; without its optional "leapfrog" alternation). The loop's x is the next evaluation point
    (y_t, then x_i); the other state member lives in `pair`. Inversion starts from x_0 = y_0 = the image and ends
    with (x_N, y_N); sampling from (x_N, y_N) starts at y_N and returns x_0."""

    name = "edict"

    def __init__(self, objective, steps: int, direction: str = "sample", p: float = 0.93,
                 pair: Optional[torch.Tensor] = None):
        super().__init__(direction)
        if not 0 < p <= 1:
            raise ConfigError(f"edict p must be in (0, 1], got {p}")
        times, self.alphas = ddim_alphas(objective, steps)
        self.p, self.steps = float(p), steps
        # interval k = (node k, node k+1); both evaluations at node k+1's time, in either direction
        self.intervals = list(range(steps)) if self.invert else list(range(steps - 1, -1, -1))
        stages = (1, 0) if self.invert else (0, 1)  # stage 0: eps(y_t); stage 1: eps(x_i)
        self._evals = [(k, st) for k in self.intervals for st in stages]
        self._keys = [("interval", k, st) for k, st in self._evals]
        self.timesteps = torch.tensor([float(times[k + 1]) for k, _ in self._evals])
        self.pair = pair  # sampling: x_t (the loop holds y_t); inverting: set as it goes
        self._x = self._y = self._xi = None

    def final_state(self, out):
        return self.pair, out  # (x_N, y_N): sampling starts the loop at y_N with x_N as the pair

    def _ab(self, k):
        a_t, a_s = float(self.alphas[k + 1]), float(self.alphas[k])  # noisier node t = k+1, cleaner s = k
        a = (a_s / a_t) ** 0.5
        return a, (1 - a_s) ** 0.5 - (a_s * (1 - a_t) / a_t) ** 0.5

    def step(self, out, t, x):
        k, stage = self._evals[self._i]
        self._i += 1
        self.nfe += 1
        a, b = self._ab(k)
        p = self.p
        last = self._i == len(self._evals)
        if not self.invert:
            if stage == 0:  # x is y_t
                x_t = self.pair if self.pair is not None else x  # from noise alone: x_N = y_N
                self._y = x
                self._xi = a * x_t + b * out
                return _out(self._xi)
            y_i = a * self._y + b * out  # x is x_i
            x_s = p * self._xi + (1 - p) * y_i
            y_s = p * y_i + (1 - p) * x_s
            self.pair = x_s
            return _out(x_s if last else y_s)
        if stage == 1:  # x is x_i; the state before this step is (x_s, y_s) with y_i known
            if self._x is None:  # the first step starts from x_0 = y_0 = x, so x_i = y_i = x
                self._yi = x
            self._xi = x
            y_t = (self._yi - b * out) / a
            self._y = y_t
            return _out(y_t)
        x_t = (self._xi - b * out) / a  # x is y_t
        self._x = x_t
        self.pair = x_t
        if last:
            return _out(x)  # the loop ends at y_N; x_N is in `pair`
        y_i = (x - (1 - p) * x_t) / p  # the next step's inverse mixing, computed before its evaluations
        self._yi = y_i
        return _out((x_t - (1 - p) * y_i) / p)


# ------------------------------------------------------------------------------------------------ rectified flow


def flow_sigmas(objective, steps: int, shift: Optional[float] = None) -> np.ndarray:
    """sigma per node 0..N: the grid of `ditk sample --solver euler` (uniform in t, then SD3's shift), ascending.
    float64."""
    from ..objectives.flow import shift_time

    s = objective.shift if shift is None else float(shift)
    if s <= 0:
        raise ConfigError(f"shift must be > 0, got {s}")
    t = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    return shift_time(t, s).numpy()


class FlowGrid(_Grid):
    """Integrates dz/dsigma = v(z, sigma) over `flow_sigmas` in either direction, with h = sigma_to - sigma_from
    (negative when sampling). Methods (all in the same formulas both ways):

    euler       z <- z + h v(z, s)                                            1 NFE/step
    rf-solver   RF-Solver (Wang et al., ICML 2025) 2nd-order Taylor: v1 = v(z, s), z_mid = z + h/2 v1,
                v2 = v(z_mid, s + h/2), dv = (v2 - v1) / (h/2), z <- z + h v1 + h^2/2 dv   2 NFE/step
    fireflow    FireFlow (Deng et al., ICML 2025): midpoint step whose half-step uses the previous step's midpoint
                velocity: z_mid = z + h/2 v_prev, v_mid = v(z_mid, s + h/2), z <- z + h v_mid, v_prev <- v_mid;
                v_prev starts as v(z_0, s_0)                                  N + 1 NFE
    rf-inversion RF-Inversion (Rout et al., ICLR 2025) controlled Euler: inverting, u_hat = u + gamma ((y1 - z) /
                (1 - s) - u) towards a fixed noise y1; sampling, v_hat = v + eta ((z - y0) / s - v) towards the
                source image y0 on the sampling steps [start, stop) (fractions of the steps)   1 NFE/step
    """

    METHODS = ("euler", "rf-solver", "fireflow", "rf-inversion")

    def __init__(self, objective, steps: int, method: str = "euler", direction: str = "sample",
                 shift: Optional[float] = None, gamma: float = 0.5, eta: float = 0.9, start: float = 0.0,
                 stop: float = 0.25, y1: Optional[torch.Tensor] = None, y0: Optional[torch.Tensor] = None):
        super().__init__(direction)
        if method not in self.METHODS:
            raise ConfigError(f"unknown flow method '{method}': use one of {', '.join(self.METHODS)}")
        if steps < 1:
            raise ConfigError(f"steps must be >= 1, got {steps}")
        self.name, self.method, self.steps = method, method, steps
        self.sigmas = flow_sigmas(objective, steps, shift)
        self.gamma, self.eta, self.y1, self.y0 = float(gamma), float(eta), y1, y0
        self.control_steps = set(range(int(round(start * steps)), int(round(stop * steps))))
        intervals = list(range(steps)) if self.invert else list(range(steps - 1, -1, -1))
        self.intervals = intervals
        # (interval, stage, sigma at which v is evaluated); the model time is sigma * 1000 (diffusers' convention)
        evals = []
        for j, k in enumerate(intervals):
            s_from, s_to = self._ends(k)
            mid = 0.5 * (s_from + s_to)
            if method in ("euler", "rf-inversion"):
                evals.append((k, 0, s_from))
            elif method == "rf-solver":
                evals += [(k, 0, s_from), (k, 1, mid)]
            else:  # fireflow
                if j == 0:
                    evals.append((k, 0, s_from))
                evals.append((k, 1, mid))
        self._evals = evals
        # FireFlow's one extra evaluation (v at the start point) has no counterpart in the other direction
        self._keys = [("initial",) if method == "fireflow" and stage == 0 else ("interval", k, stage)
                      for k, stage, _ in evals]
        self.timesteps = torch.tensor([s * 1000.0 for _, _, s in evals], dtype=torch.float64)
        self._z = None  # the node point of the current step (2-stage methods)
        self._v = None  # rf-solver: v1 of this step; fireflow: the previous midpoint velocity

    def _ends(self, k: int) -> tuple[float, float]:
        lo, hi = float(self.sigmas[k]), float(self.sigmas[k + 1])
        return (lo, hi) if self.invert else (hi, lo)

    def step(self, out, t, x):
        k, stage, s_eval = self._evals[self._i]
        self._i += 1
        self.nfe += 1
        s_from, s_to = self._ends(k)
        h = s_to - s_from
        v = out
        if self.method == "euler":
            return _out(x + h * v)
        if self.method == "rf-inversion":
            if self.invert and self.gamma > 0:
                if self.y1 is None:
                    raise ConfigError("rf-inversion needs the fixed noise y1")
                v = v + self.gamma * ((self.y1 - x) / (1.0 - s_from) - v)
            elif not self.invert and self.eta > 0 and (self.steps - 1 - k) in self.control_steps:
                if self.y0 is None:
                    raise ConfigError("rf-inversion editing needs the source image y0")
                v = v + self.eta * ((x - self.y0) / s_from - v)
            return _out(x + h * v)
        if self.method == "rf-solver":
            if stage == 0:
                self._z, self._v = x, v
                return _out(x + 0.5 * h * v)  # the loop evaluates v at z_mid next
            z, v1 = self._z, self._v
            dv = (v - v1) / (0.5 * h)
            return _out(z + h * v1 + 0.5 * h * h * dv)
        # fireflow
        if stage == 0:  # the one extra evaluation: v_prev = v(z_0, s_0)
            self._z, self._v = x, v
            return _out(x + 0.5 * h * v)
        z_new = self._z + h * v
        self._v = v
        if self._i < len(self._evals):  # the next step's midpoint, from the reused velocity
            k2 = self._evals[self._i][0]
            f2, t2 = self._ends(k2)
            self._z = z_new
            return _out(z_new + 0.5 * (t2 - f2) * v)
        return _out(z_new)
