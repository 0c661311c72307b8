"""DDNM / DDNM+ (Wang, Yu & Zhang, ICLR 2023): zero-shot restoration by range-null space decomposition.

At each step the prior's clean estimate x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) keeps its null-space
part and takes its range part from the measurement:
    x0' = x0 - lambda_t A^dagger (A x0 - y)          (noise-free: lambda_t = 1, so A x0' = y exactly)
then x_{t-1} is drawn from the DDPM posterior q(x_{t-1} | x_t, x0') = N(a_t x0' + b_t x_t, gamma_t^2 I)
(the paper's Algorithm 1, on the loop's respaced grid: beta_t = 1 - abar_t / abar_prev).

DDNM+ with noise sigma_y, default: the "simplified" scalar form of the paper's code. A^dagger y carries noise of
std ~ sigma_y per pixel, which enters x_{t-1} as a_t lambda_t sigma_y; lambda_t and the added noise gamma_t keep
the total at the posterior's sigma_t:
    sigma_t >= a_t sigma_y:  lambda_t = 1,                        gamma_t = sqrt(sigma_t^2 - (a_t sigma_y)^2)
    otherwise:               lambda_t = sigma_t / (a_t sigma_y),  gamma_t = 0.
Option svd=true: the SVD form of the paper (Eq. 17-19, per singular value s_i of A, through the operator's
decomposition of A A^T): along the right singular vector v_i, A^dagger y carries noise of std
sigma_y / s_i, which enters x_{t-1} as a_t lambda_i sigma_y / s_i; lambda_i and the added noise c_i are chosen so
that every component's noise stays the posterior's sigma_t:
    lambda_i = min(1, sigma_t s_i / (a_t sigma_y)),   c_i = sqrt(sigma_t^2 - (a_t lambda_i sigma_y / s_i)^2),
and the null space of A gets the plain sigma_t. Neither form restores noisy Gaussian deblurring with our small
prior (see the README): y is the same at every step, so its noise, amplified by 1/s_i, adds up coherently over
the steps, which the per-step bound does not see.

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
    options = {"travel_length": 0, "travel_repeat": 1, "svd": False}

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
        """lambda_t, gamma_t of the simplified DDNM+ (1, sigma_t without measurement noise)."""
        s = self.sigma_y
        if s == 0:
            return 1.0, sigma_t
        if sigma_t >= a * s:
            return 1.0, math.sqrt(max(sigma_t ** 2 - (a * s) ** 2, 0.0))
        return sigma_t / (a * s), 0.0

    def spectral(self, a: float, sigma_t: float):
        """(lambda_i, c_i / s_i) as functions of the eigenvalues s_i^2 of A A^T (zero where pinv cuts s_i)."""
        op, sy = self.op, self.sigma_y

        def lam(eig):
            s = eig.clamp_min(0).sqrt()
            return torch.clamp(sigma_t * s / (a * sy), max=1.0)

        def noise_over_s(eig):
            s = eig.clamp_min(0).sqrt()
            keep = op._inv_eig(eig) > 0
            c2 = (sigma_t ** 2 - (a * lam(eig) * sy) ** 2 * op._inv_eig(eig)).clamp_min(0)
            return torch.where(keep, c2.sqrt() / s.clamp_min(1e-30), torch.zeros_like(s))

        return lam, noise_over_s

    def noisy_update(self, x0, x, a, b, sigma_t):
        """DDNM+ (SVD form): x0' = x0 - A^dagger_lambda (A x0 - y), then the posterior mean plus per-component
        noise: c_i along each v_i of the range, sigma_t in the null space."""
        op = self.op
        lam, noise_over_s = self.spectral(a, sigma_t)
        x0 = x0 - op.At(op.gram_apply(op.A(x0) - self.y, lambda eig: lam(eig) * op._inv_eig(eig)))
        new = a * x0 + b * x
        if sigma_t > 0:
            xi = self.noise_like(x)
            xi_y = self.noise_like(op.A(x))
            new = new + sigma_t * (xi - op.pinv(op.A(xi))) + op.At(op.gram_apply(xi_y, noise_over_s))
        return new

    def step_end(self, i, t, x, out, prev):
        self.nfe += 1
        x = x.detach()
        eps = split_eps(out.detach(), x.shape[1])
        ab = self.grid.ab[i]
        x0 = (x - math.sqrt(1.0 - ab) * eps) / math.sqrt(ab)
        a, b, sigma_t = self.coefficients(i)
        if self.sigma_y > 0 and self.opts["svd"]:
            new = self.noisy_update(x0, x, a, b, sigma_t)
        else:  # Algorithm 1 (lambda = 1, gamma = sigma_t without noise), or the simplified DDNM+
            lam, gamma = self.scales(a, sigma_t)
            x0 = x0 - lam * self.op.pinv(self.op.A(x0) - self.y)
            new = a * x0 + b * x
            if gamma > 0:
                new = new + gamma * self.noise_like(x)
        if i + 1 < len(self.grid.t) and self.grid.t[i + 1] != self.grid.prev[i]:  # time-travel: jump back up
            ratio = self.grid.ab[i + 1] / self.grid.ab_prev[i]
            new = math.sqrt(ratio) * new + math.sqrt(1.0 - ratio) * self.noise_like(x)
        return new
