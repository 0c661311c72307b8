"""DPS, diffusion posterior sampling (Chung et al., ICLR 2023).

Each DDPM ancestral step x'_{t-1} ~ p(x_{t-1} | x_t) is followed by a gradient step on the measurement error of
Tweedie's clean estimate:
    x0(x_t) = clip((x_t - sqrt(1 - abar_t) eps(x_t)) / sqrt(abar_t), -1, 1)
    x_{t-1} = x'_{t-1} - zeta * grad_{x_t} || y - A(x0(x_t)) ||          (the norm, not its square, as the code)
The gradient goes through the model (the loop evaluates it with autograd: `needs_grad`). zeta per task follows
the paper's configs: 0.5 for inpainting, 0.3 otherwise; the paper samples 1000 DDPM steps.

Latent models: A applies after the VAE decoder, so the gradient also goes back through the decoder (PSLD-style
"DPS through the decoder"): correct, but each step costs a decoder forward and backward; `restore` warns.
"""

from __future__ import annotations

import math

import torch

from .base import DDPMGrid, Method, register, split_eps


@register
class DPS(Method):
    name = "dps"
    help = "posterior sampling: DDPM step - zeta * grad ||y - A(x0_hat)|| through the model (1000 steps)"
    needs_grad = True
    latent_ok = True
    default_steps = 1000
    options = {"zeta": None}

    @classmethod
    def default_option(cls, key, op):
        return 0.5 if op.name.startswith("inpaint") else 0.3

    @property
    def solver_options(self) -> dict:
        # DPS's DDPM step uses the clipped x0 (clip_denoised); in latent space there is no [-1, 1] to clip to.
        return {} if self.decode is not None else {"clip_sample": True}

    def begin(self, scheduler):
        self.grid = DDPMGrid(self.objective, [int(t) for t in scheduler.timesteps])

    def data_term(self, x, out, i):
        """|| y - A(x0_hat) || per image (x and out carry the autograd graph)."""
        ab = self.grid.ab[i]
        x0 = (x - math.sqrt(1.0 - ab) * split_eps(out, x.shape[1])) / math.sqrt(ab)
        if self.decode is None:
            x0 = x0.clamp(-1, 1)
        residual = self.y - self.op.A(self.pixels(x0))
        return residual.flatten(1).norm(dim=1)

    def model_output(self, i, t, x, out):
        self.nfe += 1
        norm = self.data_term(x, out, i)
        self.grad = torch.autograd.grad(norm.sum(), x)[0]  # images are independent: the sum's gradient splits
        return out

    def step_end(self, i, t, x, out, prev):
        return prev - self.opts["zeta"] * self.grad
