"""Diffusion-LM's end-to-end objective (Li et al. 2022), as Prefix-diffusion trains its captioner.

Followed: XiangLi1999/Diffusion-LM, improved-diffusion/improved_diffusion/gaussian_diffusion.py,
`GaussianDiffusion.training_losses_e2e` with its defaults for text (`predict_xstart`, `noise_schedule sqrt`,
`diffusion_steps 2000`, fixed variance, loss type E2E_MSE):

    mu      = EMB(w)                                      the caption's embeddings (trained jointly)
    x_0     = mu + sqrt(1 - alpha_bar_0) * eps_0          q(x_0 | w) = N(EMB(w), (1 - alpha_bar_0) I)
    x_t     = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps        (q_sample)
    f       = model(x_t, t, prefix)                      the x0-parameterisation: the model predicts x_0
    mse     = |x_0 - f|^2            for t > 0,   |mu - f|^2 at t = 0    (`t0_loss`: the embedding term)
    tT_loss = |sqrt(alpha_bar_{T-1}) x_0|^2               (the prior term: q(x_T | x_0) has mean ~0)
    nll     = -log p(w | x_0) = CE(x_0 E^T, w)           (`decoder_nll`: the rounding term, tied LM head)
    loss    = mse + tT_loss + nll                         (mse and tT as mean_flat, nll as the mean over tokens)

The DDPM machinery (float64 schedule arrays, q_sample, the diffusers schedulers with the same betas) is ditk's
`ddpm` objective; this one only predicts "sample" instead of epsilon and replaces the loss. The loop's noise for a
step is (2, L, D) per caption: [0] for q(x_t | x_0), [1] for eps_0 (`noise_shape`), both from the step's seeded
generator, so resume and multi-process training stay exact.

Sampling: any DDPM solver (ancestral `ddpm` by default, as Diffusion-LM); with `clamp: true` the predicted x_0 of
every step is replaced by its nearest word embeddings (Diffusion-LM's `--clamp clamp`, `denoised_fn_round`), and
the final x_0 is rounded by the tied LM head (argmax of x_0 E^T, as in its text_sample.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..registry import OBJECTIVES
from .base import cfg_get, mean_flat
from .ddpm import DDPM


@dataclass
class DiffusionLMConfig:
    num_timesteps: int = 2000  # Diffusion-LM: 2000
    beta_schedule: str = "sqrt"  # Diffusion-LM's sqrt schedule (linear / squaredcos_cap_v2 also work)
    variance: str = "fixed_large"  # Diffusion-LM samples with the fixed (large) variance; nothing is learned
    prior_weight: float = 1.0  # weight of tT_loss (Diffusion-LM: 1)
    rounding_weight: float = 1.0  # weight of the decoder NLL (Diffusion-LM: 1)
    clamp: bool = True  # sampling: clamp each step's predicted x_0 to the nearest embeddings


class ClampToEmbeddings:
    """StepHook: the predicted x_0 (the model output of an x0-predicting model) -> its nearest word embeddings."""

    def __init__(self, model):
        self.model = model

    def model_output(self, i, t, x, out):
        return self.model.clamp(out)


@OBJECTIVES.register("diffusion-lm", config=DiffusionLMConfig,
                     help="Diffusion-LM end-to-end loss on word embeddings (x0-prediction, rounding and prior terms)")
class DiffusionLM(DDPM):
    name = "diffusion-lm"
    prediction_type = "sample"

    def __init__(self, cfg=None):
        cfg = DiffusionLMConfig() if cfg is None else cfg
        super().__init__({"num_timesteps": cfg_get(cfg, "num_timesteps", 2000),
                          "beta_schedule": cfg_get(cfg, "beta_schedule", "sqrt"),
                          "variance": cfg_get(cfg, "variance", "fixed_large")})
        self.prior_weight = float(cfg_get(cfg, "prior_weight", 1.0))
        self.rounding_weight = float(cfg_get(cfg, "rounding_weight", 1.0))
        self.clamp = bool(cfg_get(cfg, "clamp", True))

    def noise_shape(self, model) -> tuple:
        return (2, *model.latent_shape)

    def training_losses(self, model, x0, t, noise, model_kwargs=None) -> dict:
        """x0: the captions' token ids (N, L); noise (N, 2, L, D). Returns {"loss", "mse", "tT", "nll"}, each (N,)."""
        net = getattr(model, "module", model)  # the embedding table and head of a DDP-wrapped model
        ids = x0.long()
        mu = net.embed(ids)
        zero = torch.zeros_like(t)
        x_start = mu + self._extract("sqrt_one_minus_alphas_cumprod", zero, mu) * noise[:, 1]
        x_t = self.q_sample(x_start, t, noise[:, 0])
        out = model(x_t, self.model_time(t), **(model_kwargs or {}))
        mse = torch.where(t == 0, mean_flat((mu - out) ** 2), mean_flat((x_start - out) ** 2))
        last = torch.full_like(t, self.num_timesteps - 1)
        t_T = mean_flat((self._extract("sqrt_alphas_cumprod", last, x_start) * x_start) ** 2)
        logits = net.logits(x_start)
        nll = F.cross_entropy(logits.transpose(1, 2), net.targets(ids), reduction="none").mean(dim=-1)
        loss = mse + self.prior_weight * t_T + self.rounding_weight * nll
        return {"loss": loss, "mse": mse, "tT": t_T, "nll": nll}

    def sample_hooks(self, model) -> list:
        return [ClampToEmbeddings(model)] if self.clamp else []

    def decode(self, model, x: torch.Tensor) -> torch.Tensor:
        """Final rounding: the tied LM head's most likely token at every position (token ids)."""
        return model.round(x)
