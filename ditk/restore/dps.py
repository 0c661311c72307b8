"""DPS, diffusion posterior sampling (Chung et al., ICLR 2023).

Each DDPM ancestral step x'_{t-1} ~ p(x_{t-1} | x_t) is followed by a gradient step on the measurement error of
Tweedie's clean estimate:
    x0(x_t) = clip((x_t - sqrt(1 - abar_t) eps(x_t)) / sqrt(abar_t), -1, 1)
    x_{t-1} = x'_{t-1} - zeta * grad_{x_t} || y - A(x0(x_t)) ||          (the norm, not its square, as the code)
The gradient goes through the model (the loop evaluates it with autograd: `needs_grad`). The paper samples 1000
DDPM steps with zeta 0.5 for inpainting and 0.3 for SR and deblurring (its configs, 256 px FFHQ / ImageNet).
zeta is not scale-free: the gradient of the norm is a unit vector in image space, so its per-pixel size grows as
the image shrinks (x8 from 256 px to 32 px), and fewer steps take fewer guidance steps. The defaults here keep the
paper's values for inpainting (0.5) and deblurring (0.3), where they beat the classical baselines on the photos
benchmark, and were tuned elsewhere on validation crops from the training part of the photographs (250 steps,
zeta in 0.1 / 0.3 / 1 / 3; `benchmarks/bench_restore.py --split val`): super-resolution and denoising 1.0 (0.3
left the prior's sample far from y: 21.0 dB vs 22.7 dB for SR x4, 25.9 vs 30.3 dB for denoising), colourisation
0.1 (the mean of R, G, B says nothing of colour, and from 0.3 on the guidance drove the colours to saturation).

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
        name = op.name
        if name.startswith("inpaint"):
            return 0.5  # the paper's
        if name.startswith("sr") or name == "denoise":
            return 1.0  # validation crops, 250 steps (see the module docstring)
        if name == "colorize":
            return 0.1  # validation crops, 250 steps
        return 0.3  # the paper's (deblurring; also compressed sensing)

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
