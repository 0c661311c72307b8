"""PnP-Flow (Martin, Gagneux, Hurault & Delon, ICLR 2025): plug-and-play restoration with a flow-matching prior.

In the paper's time (s = 0 noise, 1 data) each step on the grid s_k = k / N does
    z  = x - gamma_k grad F(x),          F(x) = 1/2 ||A x - y||^2,  gamma_k = lr (1 - s_k)^alpha / L
    z~ = s_k z + (1 - s_k) n,            n ~ N(0, I)                (back onto the flow's path at time s_k)
    x  = D(z~) = z~ + (1 - s_k) v(z~, s_k),   averaged over `samples` draws of n
with L = the largest eigenvalue of A^T A when option `normalize` is on (lr = 1 is then a 1/L gradient step), or
L = 1 as in the authors' code (annegnx/PnP-Flow pnp_flow.py: gamma = sigma^2 lr (1 - s)^alpha times the gradient
A^T (A x - y) / sigma^2, so sigma cancels; config: lr 1, alpha 0.5, 5 samples, 100 steps). In ditk's flow convention t = 1 - s is the noise level, the model predicts
u = eps - x0, and the denoiser is D(z~) = z~ - t u(z~, t). The loop's Euler grid t = 1, (N-1)/N, ..., 1/N is
the paper's grid. The `samples` draws run as copies of each image in one batch (`replicas`); the hook averages
them after each model call, and feeds the loop z~ through `step_begin`.
"""

from __future__ import annotations

from .base import Method, register


@register
class PnPFlow(Method):
    name = "pnp-flow"
    help = "plug-and-play flow: gradient step on ||Ax-y||^2, re-noise onto the flow path, denoise with x0_hat"
    objectives = ("rectified-flow",)
    solver = "euler"
    default_steps = 100
    # alpha 0.5: the authors' config (config/method_config/pnp_flow.yaml). Validation crops from the training part
    # of the photographs (8 crops, 100 steps): alpha 1 lost 3.3 dB on random inpainting and 5.0 dB on denoising to
    # alpha 0.5. normalize: the authors' raw step (L = 1) moves an SR x4 estimate by only 1/16 of its residual
    # per step (A^T A = I / 16 for average pooling): 19.5 dB vs bicubic's 24.4 on the same crops, 23.7 dB (and a
    # lower FID than bicubic) with the 1/L step.
    options = {"lr": 1.0, "alpha": 0.5, "samples": 5, "normalize": True}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.replicas = int(self.opts["samples"])
        self.y_rep = self.y.repeat_interleave(self.replicas, dim=0)
        self.lip = self.op.lipschitz() if self.opts["normalize"] else 1.0

    def begin(self, scheduler):
        self.times = [float(s) for s in scheduler.sigmas[:-1]]  # noise levels t of the loop's steps

    def step_begin(self, i, t, x):
        t_noise = self.times[i]
        gamma = self.opts["lr"] * t_noise ** self.opts["alpha"] / self.lip
        z = x - gamma * self.op.At(self.op.A(x) - self.y_rep)
        self.t_noise = t_noise
        return (1 - t_noise) * z + t_noise * self.noise_like(x)

    def model_output(self, i, t, x, out):
        self.nfe += self.replicas  # model calls per image
        d = x - self.t_noise * out[:, : x.shape[1]]
        d = d.reshape(-1, self.replicas, *d.shape[1:]).mean(dim=1)  # average over the draws of each image
        self.d = d.repeat_interleave(self.replicas, dim=0)
        return out

    def step_end(self, i, t, x, out, prev):
        return self.d
