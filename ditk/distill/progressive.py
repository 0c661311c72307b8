"""Progressive distillation (Salimans & Ho, ICLR 2022, "Progressive Distillation for Fast Sampling of Diffusion
Models", Algorithm 2), for DDPM teachers.

Each round the student learns to take ONE deterministic DDIM step where its teacher takes TWO; the next round the
student becomes the teacher and the step count halves again (teacher_steps 64 → 32 → 16 → 8 → 4 = student_steps).

Grid: an N-step sampler visits the points p_j = j T / N (j = N ... 0) of the DDPM's T timesteps: point p is
timestep round(p) − 1, and p = 0 is the data (α = 1, σ = 0). The N/2 grid is every other point of the N grid,
and at N = 1, 2, 4, 8 (divisors of T = 1000) it is diffusers DDIM's "trailing" spacing, so the student samples
with `--solver ddim` and `solver_options.timestep_spacing=trailing` (the presets set it).

Target (the paper's Eq. 8): from z_a at point a, the teacher's two DDIM steps reach z_c at c (through b); the
x-target that makes one DDIM step from a land on z_c is
    x̃ = (z_c − (σ_c / σ_a) z_a) / (α_c − (σ_c / σ_a) α_a),
and the loss is w(λ_a) ‖x̃ − x̂_θ(z_a)‖², x̂_θ = (z_a − σ_a ε̂_θ) / α_a (DiT predicts ε), with the paper's
"truncated SNR" weight max(SNR, 1) (`weighting: truncated-snr`) or "SNR+1" (`snr+1`, = the v-prediction loss).
The teacher's guidance w (fixed) is distilled in, as Meng et al. 2023 do for guided models (w = 1: the paper).

Choices where the paper's setting does not map onto ditk's loop: the optimizer is not restarted between rounds
(the loop owns it); the student's EMA is reset to the student at each round start; the next round's teacher is the
student's own (not EMA) weights at the end of the round. The round teacher is saved in the checkpoint's state.pt.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import ConfigError
from ..objectives.base import broadcast_to, mean_flat
from ..registry import DISTILL_METHODS
from .base import DistillConfig, Distiller, guided

WEIGHTINGS = ("truncated-snr", "snr+1")


@dataclass
class ProgressiveConfig(DistillConfig):
    teacher_steps: int = 64  # DDIM steps of the original teacher (the paper starts from 1024 / 8192 steps)
    student_steps: int = 4  # the last round's student (the paper: down to 1-8 steps)
    steps_per_round: int = 500  # training steps per halving (the paper: 50k on CIFAR-10)
    weighting: str = "truncated-snr"  # max(SNR, 1) (the paper's x-target weight) | snr+1 (= the v loss)
    guidance_scale: float = 1.0  # teacher CFG w, distilled in (1 = none, as the paper)


def ddim_step(z_a, x_hat, alpha_a, sigma_a, alpha_c, sigma_c):
    """Deterministic DDIM from point a to c with the prediction x̂: z_c = α_c x̂ + σ_c ε̂, ε̂ = (z_a − α_a x̂) / σ_a."""
    return alpha_c * x_hat + sigma_c * (z_a - alpha_a * x_hat) / sigma_a


def two_step_target(z_a, z_c, alpha_a, sigma_a, alpha_c, sigma_c):
    """x̃ such that ddim_step(z_a, x̃, a → c) = z_c (Salimans & Ho Eq. 8)."""
    ratio = sigma_c / sigma_a
    return (z_c - ratio * z_a) / (alpha_c - ratio * alpha_a)


@DISTILL_METHODS.register("progressive", config=ProgressiveConfig,
                          help="progressive distillation: one student DDIM step = two teacher steps, halving rounds")
class Progressive(Distiller):
    objectives = ("ddpm",)

    def __init__(self, options, objective, cfg):
        super().__init__(options, objective, cfg)
        first, last = int(options.teacher_steps), int(options.student_steps)
        if last < 1 or first <= last or first % last or (first // last) & (first // last - 1):
            raise ConfigError(f"distill.teacher_steps={first} must be student_steps={last} times a power of 2 (>= 2)")
        if first > objective.num_timesteps:
            raise ConfigError(f"distill.teacher_steps={first} exceeds the teacher's {objective.num_timesteps} timesteps")
        if options.weighting not in WEIGHTINGS:
            raise ConfigError(f"unknown distill.weighting '{options.weighting}': use one of {', '.join(WEIGHTINGS)}")
        if int(options.steps_per_round) < 1:
            raise ConfigError("distill.steps_per_round must be >= 1")
        self.rounds = int(math.log2(first // last))
        self.round = 0
        self.round_teacher = None  # rounds >= 1: the previous round's student, frozen

    # -- rounds ---------------------------------------------------------------------------------------------------

    def steps_of_round(self, r: int) -> int:
        """Teacher steps of round r (its student takes half)."""
        return int(self.options.teacher_steps) >> r

    def _set_round(self, r: int, student) -> None:
        self.round = r
        if r == 0:
            self.round_teacher = None
            return
        if self.round_teacher is None:
            self.round_teacher = copy.deepcopy(student).requires_grad_(False).eval()
        self.round_teacher.load_state_dict(student.state_dict())

    def begin_step(self, model, step: int, max_steps: int) -> None:
        """At a round boundary the student becomes the teacher (and its EMA restarts from it)."""
        r = min(step // int(self.options.steps_per_round), self.rounds - 1)
        if r != self.round:
            self._set_round(r, model)
            if self.ema is not None and self.ema is not model:
                self.ema.load_state_dict(model.state_dict())

    def state_dict(self) -> dict:
        state = {"round": self.round}
        if self.round_teacher is not None:
            state["teacher"] = {k: v.detach().cpu() for k, v in self.round_teacher.state_dict().items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        r = int(state["round"])
        if r > 0:
            if self.round_teacher is None:
                self.round_teacher = copy.deepcopy(self.ema).requires_grad_(False).eval()
            self.round_teacher.load_state_dict(state["teacher"])
        self.round = r

    # -- the grid -----------------------------------------------------------------------------------------------------

    def sample_time(self, n: int, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
        """Student step indices i in 1..N/2 (the step from grid point 2i to 2i − 2 of the round's N-point grid)."""
        half = self.steps_of_round(self.round) // 2
        return torch.randint(1, half + 1, (n,), generator=generator, device=device or "cpu")

    def point(self, j: torch.Tensor, steps: int):
        """(timestep, α, σ) of grid point j of a `steps`-step sampler; j = 0 is the data (α = 1, σ = 0)."""
        T = self.base.num_timesteps
        t = (j.double() * T / steps).round().long() - 1
        ab = self.base.alphas_cumprod.to(j.device)[t.clamp(min=0)]
        ab = torch.where(j == 0, torch.ones_like(ab), ab)
        return t.clamp(min=0), ab.sqrt(), (1 - ab).sqrt()

    def predict_x0(self, model, z, t, alpha, sigma, cond, scale: float):
        """x̂ = (z − σ ε̂) / α from the model's ε (guided with `scale`)."""
        uncond = self.uncond_like(cond, len(z)) if scale != 1.0 else None
        eps = guided(model, z, self.base.model_time(t), cond, uncond, scale, z.shape[1], self.cfg_channels)[:, : z.shape[1]]
        return (z - broadcast_to(sigma, z) * eps) / broadcast_to(alpha, z)

    def training_losses(self, model, x0, t, noise, model_kwargs=None) -> dict:
        cond = model_kwargs or {}
        n_steps = self.steps_of_round(self.round)
        i = t.to(x0.device)
        (t_a, a_a, s_a), (t_b, a_b, s_b), (t_c, a_c, s_c) = (self.point(2 * i - k, n_steps) for k in (0, 1, 2))
        b = lambda v: broadcast_to(v, x0)  # noqa: E731
        z_a = b(a_a) * x0 + b(s_a) * noise
        teacher = self.round_teacher if self.round_teacher is not None else self.teacher
        w = float(self.options.guidance_scale) if self.round_teacher is None else 1.0  # later rounds: w is in the net
        with torch.no_grad():
            x_a = self.predict_x0(teacher, z_a, t_a, a_a, s_a, cond, w)
            z_b = ddim_step(z_a, x_a, b(a_a), b(s_a), b(a_b), b(s_b))
            x_b = self.predict_x0(teacher, z_b, t_b, a_b, s_b, cond, w)
            z_c = ddim_step(z_b, x_b, b(a_b), b(s_b), b(a_c), b(s_c))
            target = two_step_target(z_a, z_c, b(a_a), b(s_a), b(a_c), b(s_c))
        x_hat = self.predict_x0(model, z_a, t_a, a_a, s_a, cond, 1.0)
        snr = (a_a / s_a) ** 2
        weight = snr.clamp(min=1.0) if self.options.weighting == "truncated-snr" else snr + 1.0
        return {"loss": weight.to(x0.dtype) * mean_flat((target - x_hat) ** 2)}
