"""DDRM, Denoising Diffusion Restoration Models (Kawar, Elad, Ermon & Song, NeurIPS 2022).

DDRM works in the spectral space of A = U S V^T, in the variance-exploding form x_t = x_0 + sigma_t n of the
DDPM chain (sigma_t = sqrt((1 - abar_t) / abar_t); ditk's x_t is sqrt(abar_t) times it). Per right singular
vector v_i, xbar_i = v_i^T x and ybar_i = (U^T y)_i / s_i (the measurement's value of that coordinate, noise
std sigma_y / s_i). Each step goes from sigma (step i) to sigma' (the next step, 0 after the last) from the
prior's clean estimate x0 (Eq. 7-8, the paper's code `efficient_generalized_steps`):

    s_i = 0 (null space):      xbar'_i = x0_i + sqrt(1 - eta^2) sigma' eps_i + eta sigma' n_i
    s_i sigma' <  sigma_y:     xbar'_i = x0_i + sqrt(1 - eta^2) sigma' (ybar_i - x0_i) s_i / sigma_y + eta sigma' n_i
    s_i sigma' >= sigma_y:     xbar'_i = (1 - eta_b) x0_i + eta_b ybar_i + sqrt(sigma'^2 - eta_b^2 sigma_y^2 / s_i^2) n_i

(eps_i = (xbar_i - x0_i) / sigma, the prior's noise estimate). Without measurement noise and eta_b = 1 every
range coordinate is ybar_i plus fresh noise of the right scale, and after the last step (sigma' = 0) it is ybar_i:
A x = y exactly. The first x_T is drawn from the paper's p(x_T | y): ybar_i + sqrt(sigma_T^2 - sigma_y^2 / s_i^2) n
where s_i sigma_T > sigma_y, plain N(0, sigma_T^2) elsewhere.

The SVD comes from the operator's eigen-decomposition of A A^T (`to_basis` = U^T, `eig` = s_i^2): v_i = A^T u_i
/ s_i, so a range vector with coordinates c_i is A^T U (c / s), and the range coordinates of x are U^T A x / s.
Singular values that the operator's pseudo-inverse cuts (below pinv_tol * max) count as zero, as in DDRM's own
H_funcs. Everything is a function of the eigenvalues applied in that basis, which is what makes DDRM cheap here;
an operator without that decomposition is refused.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from .base import DDPMGrid, METHODS, Method, register, split_eps
from .operators import Operator


@register
class DDRM(Method):
    name = "ddrm"
    help = "per-singular-value update in the spectral space of A: x0, ybar = U^T y / s, noise by sigma_t vs sigma_y/s"
    needs_pinv = True
    options = {"eta": 0.85, "eta_b": 1.0}
    # The paper's 20 NFE is for its ImageNet/CelebA priors. On the small photos prior 20 steps leave visible noise
    # (validation crops, 50 % random inpainting: FID 1.51 at 20 steps, 0.41 at 50, 0.23 at 100; DDNM at 20 steps is
    # just as bad, so it is the step count, not the update): 100, as DDNM and PiGDM.
    default_steps = 100

    @classmethod
    def check(cls, op, objective_name, latent):
        super().check(op, objective_name, latent)
        if type(op).eig is Operator.eig:  # no eigen-decomposition of A A^T: no cheap SVD
            fits = sorted(n for n, m in METHODS.items() if not m.needs_pinv and objective_name in m.objectives)
            raise ConfigError(f"method ddrm needs an SVD form of A, which task {op.name} lacks: "
                              f"use --method {' or '.join(fits)}")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for key in ("eta", "eta_b"):
            if not 0.0 <= self.opts[key] <= 1.0:
                raise ConfigError(f"method ddrm: option {key} must be in [0, 1], got {self.opts[key]}")

    def begin(self, scheduler):
        self.grid = DDPMGrid(self.objective, [int(t) for t in scheduler.timesteps])

    # -- the spectral pieces -----------------------------------------------------------------------------------
    def _spectrum(self, like):
        """s_i, and where s_i counts as nonzero (the pseudo-inverse's cut), in the operator's basis."""
        eig = self.op.eig().to(like.device)
        keep = self.op._inv_eig(eig) > 0
        return eig.clamp_min(0).sqrt(), keep

    def _range_vector(self, coords, s, keep):
        """sum_i v_i c_i = A^T U (c / s) over the kept singular values."""
        z = torch.where(keep, coords / s.clamp_min(1e-30), torch.zeros_like(coords))
        return self.op.At(self.op.from_basis(z).to(self.y.dtype))

    def _null(self, x):
        return x - self.op.pinv(self.op.A(x))

    def update(self, x0, eps, sigma_next, xi_x, xi_y):
        """x'^VE (Eq. 7-8) from the clean estimate x0, the noise estimate eps and standard normal xi_x (image
        space, for the null space) and xi_y (measurement space, for the range coordinates)."""
        op, eta, eta_b, sy = self.op, self.opts["eta"], self.opts["eta_b"], self.sigma_y
        s, keep = self._spectrum(x0)
        ybar = op.to_basis(self.y) / s.clamp_min(1e-30)
        c0 = op.to_basis(op.A(x0)) / s.clamp_min(1e-30)
        n = op.to_basis(xi_y)
        before = s * sigma_next >= sy  # the coordinate's measurement is noisier than x_t: take it (eta_b)
        std_b = (sigma_next ** 2 - (eta_b * sy / s.clamp_min(1e-30)) ** 2).clamp_min(0).sqrt()
        c_before = (1 - eta_b) * c0 + eta_b * ybar + std_b * n
        pull = math.sqrt(1 - eta ** 2) * sigma_next * s / sy if sy > 0 else torch.zeros_like(s)
        c_after = c0 + pull * (ybar - c0) + eta * sigma_next * n
        coords = torch.where(before, c_before, c_after)
        null = x0 + math.sqrt(1 - eta ** 2) * sigma_next * eps + eta * sigma_next * xi_x
        return self._range_vector(coords, s, keep) + self._null(null)

    def step_begin(self, i, t, x):
        """Step 0: replace the loop's N(0, I) start by the paper's p(x_T | y) (in ditk's scale)."""
        if i != 0:
            return None
        op, sy = self.op, self.sigma_y
        ab = self.grid.ab[0]
        sigma = math.sqrt((1 - ab) / ab)
        s, keep = self._spectrum(x)
        known = keep & (s * sigma > sy)
        ybar = op.to_basis(self.y) / s.clamp_min(1e-30)
        std = (sigma ** 2 - (sy / s.clamp_min(1e-30)) ** 2).clamp_min(0).sqrt()
        xi_y = self.noise_like(op.A(x))
        coords = torch.where(known, ybar + std * op.to_basis(xi_y), sigma * op.to_basis(xi_y))
        # the loop's own noise x serves for the null space, sigma_T * x there
        xT = self._range_vector(coords, s, keep) + sigma * self._null(x)
        return math.sqrt(ab) * xT

    def step_end(self, i, t, x, out, prev):
        self.nfe += 1
        x = x.detach()
        eps = split_eps(out.detach(), x.shape[1])
        ab, ab_prev = self.grid.ab[i], self.grid.ab_prev[i]
        x0 = (x - math.sqrt(1.0 - ab) * eps) / math.sqrt(ab)
        sigma_next = math.sqrt((1.0 - ab_prev) / ab_prev)
        xi_x = self.noise_like(x)
        xi_y = self.noise_like(self.op.A(x))
        return math.sqrt(ab_prev) * self.update(x0, eps, sigma_next, xi_x, xi_y)
