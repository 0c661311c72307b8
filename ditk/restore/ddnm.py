"""DDNM / DDNM+ (Wang, Yu & Zhang, ICLR 2023): zero-shot restoration by range-null space decomposition.

At each step the prior's clean estimate x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) keeps its null-space
part and takes its range part from the measurement:
    x0' = x0 - lambda_t A^dagger (A x0 - y)          (noise-free: lambda_t = 1, so A x0' = y exactly)
then x_{t-1} is drawn from the DDPM posterior q(x_{t-1} | x_t, x0') = N(a_t x0' + b_t x_t, gamma_t^2 I)
(the paper's Algorithm 1, on the loop's respaced grid: beta_t = 1 - abar_t / abar_prev).

DDNM+ with noise sigma_y (the "simplified" scalar form of Eq. 19 of the paper): A^dagger y carries noise of
std ~ sigma_y, which enters x_{t-1} as a_t lambda_t sigma_y; lambda_t and the added noise gamma_t are chosen so
that the total noise stays the posterior's sigma_t:
    sigma_t >= a_t sigma_y:  lambda_t = 1,                        gamma_t = sqrt(sigma_t^2 - (a_t sigma_y)^2)
    otherwise:               lambda_t = sigma_t / (a_t sigma_y),  gamma_t = 0.

Time-travel (DDNM+ / RePaint): every `travel_length` steps, the sample is re-noised back `travel_length` steps
(x_t = sqrt(abar_t / abar_s) x_s + sqrt(1 - abar_t / abar_s) n) and those steps are redone, `travel_repeat`
times; it costs (1 + travel_repeat) times the model calls and helps when the measurement says little (large
boxes, high SR factors). The loop runs the schedule the hook sets in `begin`.
"""

from __future__ import annotations

import math

import torch

from .base import DDPMGrid, Method, register, split_eps


def travel_schedule(ts: list[int], length: int, repeat: int) -> tuple[list[int], list[int]]:
    """(timesteps to evaluate, the timestep each goes to) with the jumps back of time-travel (-1 = x_0)."""
    n = len(ts)
    seq, prev = [], []

    def step(k):
        seq.append(ts[k])
        prev.append(ts[k + 1] if k + 1 < n else -1)

    k = 0
    while k < n:
        step(k)
        k += 1
        if length and k % length == 0 and k < n:
            for _ in range(repeat):
                for j in range(k - length, k):
                    step(j)
    return seq, prev


@register
class DDNM(Method):
    name = "ddnm"
    help = "range-null space decomposition x0' = x0 - A^+(A x0 - y) (DDNM; DDNM+ noise scaling, time-travel)"
    needs_pinv = True
    options = {"travel_length": 0, "travel_repeat": 1}

    def begin(self, scheduler):
        ts = [int(t) for t in scheduler.timesteps]
        seq, prev = travel_schedule(ts, self.opts["travel_length"], self.opts["travel_repeat"])
        if len(seq) != len(ts):  # the loop iterates scheduler.timesteps: give it the schedule with the jumps
            scheduler.timesteps = torch.tensor(seq, device=scheduler.timesteps.device, dtype=scheduler.timesteps.dtype)
        self.grid = DDPMGrid(self.objective, seq, prev)

    def coefficients(self, i: int) -> tuple[float, float, float]:
        """a_t, b_t and sigma_t of the DDPM posterior from step i's timestep to the one it goes to."""
        ab, ab_prev = self.grid.ab[i], self.grid.ab_prev[i]
        beta = 1.0 - ab / ab_prev
        a = math.sqrt(ab_prev) * beta / (1.0 - ab)
        b = math.sqrt(ab / ab_prev) * (1.0 - ab_prev) / (1.0 - ab)
        return a, b, math.sqrt(beta * (1.0 - ab_prev) / (1.0 - ab))

    def scales(self, a: float, sigma_t: float) -> tuple[float, float]:
        """lambda_t, gamma_t of DDNM+ (1, sigma_t without measurement noise)."""
        s = self.sigma_y
        if s == 0:
            return 1.0, sigma_t
        if sigma_t >= a * s:
            return 1.0, math.sqrt(max(sigma_t ** 2 - (a * s) ** 2, 0.0))
        return sigma_t / (a * s), 0.0

    def step_end(self, i, t, x, out, prev):
        self.nfe += 1
        x = x.detach()
        eps = split_eps(out.detach(), x.shape[1])
        ab = self.grid.ab[i]
        x0 = (x - math.sqrt(1.0 - ab) * eps) / math.sqrt(ab)
        a, b, sigma_t = self.coefficients(i)
        lam, gamma = self.scales(a, sigma_t)
        x0 = x0 - lam * self.op.pinv(self.op.A(x0) - self.y)
        new = a * x0 + b * x
        if gamma > 0:
            new = new + gamma * self.noise_like(x)
        if i + 1 < len(self.grid.t) and self.grid.t[i + 1] != self.grid.prev[i]:  # time-travel: jump back up
            ratio = self.grid.ab[i + 1] / self.grid.ab_prev[i]
            new = math.sqrt(ratio) * new + math.sqrt(1.0 - ratio) * self.noise_like(x)
        return new
