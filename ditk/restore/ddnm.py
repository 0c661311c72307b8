"""DDNM / DDNM+ (Wang, Yu & Zhang, ICLR 2023): zero-shot restoration by range-null space decomposition.

At each step the prior's clean estimate x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) keeps its null-space
part and takes its range part from the measurement:
    x0' = x0 - lambda_t A^dagger (A x0 - y)          (noise-free: lambda_t = 1, so A x0' = y exactly)
then x_{t-1} is drawn from the DDPM posterior q(x_{t-1} | x_t, x0') = N(a_t x0' + b_t x_t, gamma_t^2 I)
(the paper's Algorithm 1, on the loop's respaced grid: beta_t = 1 - abar_t / abar_prev).

DDNM+ with noise sigma_y (default, option svd=true): the SVD form that the paper's code runs for its noisy
results (functions/svd_ddnm.py `ddnm_plus_diffusion`, Lambda / Lambda_noise of svd_operators.py; the paper's
Eq. 17-19 and 51), through the operator's eigen-decomposition of A A^T. Each step is a DDIM(eta) step to
abar_next (a = sqrt(abar_next), sigma_t = sqrt(1 - abar_next): the whole noise of x_{t-1}, not the DDPM
posterior's std). Along the right singular vector v_i, A^dagger y carries noise of std sigma_y / s_i, which
enters x_{t-1} as a lambda_i sigma_y / s_i:
    sigma_t s_i >= a sigma_y:  lambda_i = 1,                                  fresh noise sqrt(sigma_t^2 - (a sigma_y / s_i)^2)
    otherwise:                 lambda_i = s_i sigma_t sqrt(1 - eta^2) / (a sigma_y),  fresh noise eta sigma_t
(the inherited measurement noise then stands in for DDIM's eps-term), and the null space of A gets DDIM's
eta sigma_t fresh noise + sqrt(1 - eta^2) sigma_t eps. Every component's noise is sigma_t, and a range component
takes y afresh at each step instead of through x_t, so y's noise, amplified by 1/s_i, does not pile up over the
steps. eta = 0.85, the paper's setting (README commands and configs).

Option svd=false: the "simplified" scalar form (lambda_t, gamma_t of Eq. 19 with the DDPM posterior's sigma_t):
    sigma_t >= a_t sigma_y:  lambda_t = 1,                        gamma_t = sqrt(sigma_t^2 - (a_t sigma_y)^2)
    otherwise:               lambda_t = sigma_t / (a_t sigma_y),  gamma_t = 0.
It assumes A^dagger y's noise is ~sigma_y per pixel, true for inpainting, denoising and colourisation but not for
deblurring, where A^dagger amplifies it by up to 1/s (~950 for the photos blur): noisy Gaussian deblurring then
fails (5.3 dB on the photos benchmark; 29.8 dB in the SVD form).

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
    options = {"travel_length": 0, "travel_repeat": 1, "svd": True, "eta": 0.85}

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
        """(lambda_i, c_i / s_i) as functions of the eigenvalues s_i^2 of A A^T (zero where pinv cuts s_i): the
        paper's code (Lambda, Lambda_noise of functions/svd_operators.py), a = sqrt(abar_next), sigma_t =
        sqrt(1 - abar_next). A component whose measurement noise a sigma_y / s_i fits under sigma_t takes y fully
        (lambda_i = 1) and fresh noise c_i = sqrt(sigma_t^2 - (a sigma_y / s_i)^2); a noisier one takes
        lambda_i = s_i sigma_t sqrt(1 - eta^2) / (a sigma_y), whose inherited noise stands in for DDIM's
        eps-term, plus fresh noise c_i = eta sigma_t. Either way the component's noise is sigma_t."""
        op, sy, eta = self.op, self.sigma_y, self.opts["eta"]

        def s_of(eig):
            return eig.clamp_min(0).sqrt()

        def clean(eig):  # the measurement's noise on this component fits under sigma_t
            return sigma_t * s_of(eig) >= a * sy

        def lam(eig):
            partial = s_of(eig) * sigma_t * math.sqrt(1 - eta ** 2) / (a * sy)
            return torch.where(clean(eig), torch.ones_like(eig), partial)

        def noise_over_s(eig):
            s = s_of(eig)
            keep = op._inv_eig(eig) > 0
            c = torch.where(clean(eig), (sigma_t ** 2 - (a * sy) ** 2 * op._inv_eig(eig)).clamp_min(0).sqrt(),
                            torch.full_like(s, eta * sigma_t))
            return torch.where(keep, c / s.clamp_min(1e-30), torch.zeros_like(s))

        return lam, noise_over_s

    def plus_update(self, x0, eps, a: float, sigma_t: float, xi_x, xi_y):
        """DDNM+ in its SVD form, as the paper's code runs it (svd_ddnm.ddnm_plus_diffusion, Eq. 17 and the
        appendix's Eq. 51): a DDIM(eta) step to abar_next = a^2 (sigma_t^2 = 1 - a^2) from
        x0' = x0 - A^dagger_lambda (A x0 - y), with the per-component noise of `spectral` in the range of A^T (from
        the standard normal xi_y, measurement space) and, in the null space, DDIM's split of fresh noise (xi_x)
        and the prior's eps."""
        op, eta = self.op, self.opts["eta"]
        lam, noise_over_s = self.spectral(a, sigma_t)
        x0 = x0 - op.At(op.gram_apply(op.A(x0) - self.y, lambda eig: lam(eig) * op._inv_eig(eig)))
        null = sigma_t * (eta * xi_x + math.sqrt(1 - eta ** 2) * eps)
        return a * x0 + (null - op.pinv(op.A(null))) + op.At(op.gram_apply(xi_y, noise_over_s))

    def step_end(self, i, t, x, out, prev):
        self.nfe += 1
        x = x.detach()
        eps = split_eps(out.detach(), x.shape[1])
        ab = self.grid.ab[i]
        x0 = (x - math.sqrt(1.0 - ab) * eps) / math.sqrt(ab)
        a, b, sigma_t = self.coefficients(i)
        if self.sigma_y > 0 and self.opts["svd"]:
            a_next = math.sqrt(self.grid.ab_prev[i])
            new = self.plus_update(x0, eps, a_next, math.sqrt(1.0 - self.grid.ab_prev[i]), self.noise_like(x),
                                   self.noise_like(self.op.A(x)))
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
