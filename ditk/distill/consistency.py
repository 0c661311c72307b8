"""Consistency distillation (CD), LCM-style, for DDPM (ε) and rectified-flow (velocity) teachers.

Song et al. 2023 ("Consistency Models", Alg. 2) as Luo et al. 2023 apply it to a latent diffusion model (LCM;
diffusers `examples/consistency_distillation/train_lcm_distill_sd_wds.py`):

- A skip-step grid of N = num_ddim_timesteps points. DDPM: t_n = (n + 1) k − 1 with k = T / N (19, 39, ..., 999
  for T = 1000, N = 50) and the previous point t_n − k (clamped at 0). Flow: t = (n + 1) / N and n / N (through
  the objective's time shift).
- x at the later point is the data noised by the forward process; the teacher takes ONE solver step back to the
  earlier point with classifier-free guidance w (DDIM for DDPM, Euler or Heun for a flow).
- The consistency function meets the boundary condition f(x, 0) = x exactly:
    DDPM: f(x, t) = c_skip(t) x + c_out(t) x̂0(x, t), c_skip = σ_d² / ((s t)² + σ_d²), c_out = s t / sqrt((s t)² + σ_d²)
          (σ_d = 0.5, timestep scaling s = 10, LCM's; at t = 0: c_skip = 1, c_out = 0), x̂0 from the predicted ε;
    flow: f(x, t) = x − t v(x, t) (the x̂0 of a velocity model, = x at t = 0).
- Loss d(f_θ(x_{t_{n+k}}), f_θ⁻(x̂_{t_n})) with the target f_θ⁻ evaluated by the EMA of the student (the loop's
  EMA: presets set train.ema_decay 0.95, LCM's), L2 or pseudo-Huber sqrt(d² + c²) − c (c = 0.001, LCM's).
- Guidance, either fixed or embedded:
    `guidance_scale` w: the teacher's CFG w is baked into the student (as MusicCM's w = 2); sampled without CFG.
    `guidance_range` [w_min, w_max] (LCM's one-stage guided distillation): w ~ U[w_min, w_max] per sample from the
    step's generator; the teacher step uses it, and the student (online and EMA target) receives it as its
    embedded input `w` (`model.guidance_embed`, ditk.models.guidance: LCM's sinusoidal w-embedding, zero-output
    at init). `ditk sample runs/<student> --cfg-scale W` then feeds W to the student in one forward per step.
    Scales are ditk's CFG convention uncond + w (cond − uncond) (LCM's script writes cond + w' (cond − uncond):
    w = w' + 1; its default w' in [5, 15] for Stable Diffusion).

Sampling: multistep consistency sampling is the `lcm` solver (diffusers LCMScheduler for DDPM: the same c_skip /
c_out, the LCM timesteps 999, 759, 499, 259 at 4 steps; FlowMatchLCMScheduler for flows), so `ditk sample
runs/<student> --steps 1|2|4` samples the student.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch

from ..errors import ConfigError
from ..objectives.base import broadcast_to, mean_flat
from ..registry import DISTILL_METHODS
from .base import DistillConfig, Distiller, guided, objective_kind

LOSSES = ("l2", "huber")


@dataclass
class ConsistencyConfig(DistillConfig):
    num_ddim_timesteps: int = 50  # LCM: N = 50 skip-step grid (k = 20 of T = 1000)
    guidance_scale: float = 1.0  # teacher CFG w, fixed and baked into the student (MusicCM: 2; 1 = no guidance)
    # [w_min, w_max]: w drawn per sample and embedded in the student as LCM (replaces guidance_scale); []: fixed w
    guidance_range: List[float] = field(default_factory=list)
    teacher_solver: str = "ddim"  # ddim (DDPM teachers); euler | heun (flow teachers)
    loss: str = "huber"  # l2 | huber (pseudo-Huber), LCM's options
    huber_c: float = 0.001  # LCM's default
    sigma_data: float = 0.5  # LCM's boundary scalings
    timestep_scaling: float = 10.0


def boundary_scalings(t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """(c_skip, c_out) of LCM at DDPM timesteps t (diffusers LCMScheduler.get_scalings_for_boundary_condition_discrete)."""
    scaled = t.double() * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def distance(a: torch.Tensor, b: torch.Tensor, loss: str, huber_c: float) -> torch.Tensor:
    """Per-sample L2 (mean squared) or pseudo-Huber distance."""
    if loss == "l2":
        return mean_flat((a - b) ** 2)
    return mean_flat(torch.sqrt((a - b) ** 2 + huber_c**2) - huber_c)


@DISTILL_METHODS.register("consistency", config=ConsistencyConfig,
                          help="LCM-style consistency distillation (DDIM / flow Euler teacher, EMA target)")
class Consistency(Distiller):
    def __init__(self, options, objective, cfg):
        super().__init__(options, objective, cfg)
        self.kind = objective_kind(objective)
        self.n = int(options.num_ddim_timesteps)
        self.w = float(options.guidance_scale)
        self.loss, self.huber_c = str(options.loss), float(options.huber_c)
        if self.loss not in LOSSES:
            raise ConfigError(f"unknown distill.loss '{self.loss}': use one of {', '.join(LOSSES)}")
        solvers = ("ddim",) if self.kind == "ddpm" else ("euler", "heun")
        if options.teacher_solver not in solvers:
            raise ConfigError(f"distill.teacher_solver={options.teacher_solver} does not apply to a {self.kind} teacher: "
                              f"use {' or '.join(solvers)}")
        self.w_range = [float(w) for w in options.guidance_range]
        if self.w_range:
            if len(self.w_range) != 2 or not 0 <= self.w_range[0] <= self.w_range[1]:
                raise ConfigError(f"distill.guidance_range must be [w_min, w_max] with 0 <= w_min <= w_max, got "
                                  f"{self.w_range}")
            if self.w != 1.0:
                raise ConfigError(f"distill.guidance_range (w embedded in the student) replaces the fixed "
                                  f"distill.guidance_scale={self.w}: set distill.guidance_scale=1")
        limit = objective.num_timesteps if self.kind == "ddpm" else 1000
        if not 1 <= self.n <= limit:
            raise ConfigError(f"distill.num_ddim_timesteps must be in 1..{limit}, got {self.n}")

    @classmethod
    def check(cls, options, cfg, teacher_cfg) -> None:
        super().check(options, cfg, teacher_cfg)
        unconditional = int(teacher_cfg.model.get("num_classes", 0) or 0) == 0 and cfg.conditioner.name == "class"
        if float(options.guidance_scale) != 1.0 and unconditional:
            raise ConfigError(f"distill.guidance_scale={options.guidance_scale} needs a conditional teacher, but "
                              f"{options.teacher} is unconditional (model.num_classes=0): set distill.guidance_scale=1")
        if list(options.guidance_range) and unconditional:
            raise ConfigError(f"distill.guidance_range={list(options.guidance_range)} needs a conditional teacher, but "
                              f"{options.teacher} is unconditional (model.num_classes=0): drop distill.guidance_range")

    @staticmethod
    def student_model_keys(options) -> dict:
        """Model keys the student needs beyond the teacher's: a guidance range embeds w (ditk.models.guidance)."""
        return {"guidance_embed": True} if list(options.get("guidance_range") or []) else {}

    # -- the grid ---------------------------------------------------------------------------------------------------

    def sample_time(self, n: int, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
        """Grid indices 0..N-1: sample i distills the teacher step from grid point i + 1 to grid point i. With a
        guidance range: (n, 2) rows (index, w), w ~ U[w_min, w_max] from the step's generator (exact resumes)."""
        index = torch.randint(0, self.n, (n,), generator=generator, device=device or "cpu")
        if not self.w_range:
            return index
        lo, hi = self.w_range
        w = lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64, device=device or "cpu")
        return torch.stack([index.double(), w], dim=1)

    def times(self, index: torch.Tensor):
        """(later, earlier) times of grid interval `index` in the objective's units."""
        if self.kind == "ddpm":
            k = self.base.num_timesteps // self.n
            later = (index + 1) * k - 1
            return later, (later - k).clamp(min=0)
        from ..objectives.flow import shift_time

        return (shift_time((index + 1).double() / self.n, self.base.shift).float(),
                shift_time(index.double() / self.n, self.base.shift).float())

    # -- the consistency function -------------------------------------------------------------------------------------

    def prediction(self, model, x, t, cond, scale: float = 1.0) -> torch.Tensor:
        """The model's ε or velocity at (x, t) (first C channels), guided with `scale`."""
        uncond = self.uncond_like(cond, len(x)) if (torch.is_tensor(scale) or scale != 1.0) else None
        out = guided(model, x, self.base.model_time(t), cond, uncond, scale, x.shape[1], self.cfg_channels)
        return out[:, : x.shape[1]]

    def x0_from(self, x, t, pred) -> torch.Tensor:
        if self.kind == "ddpm":
            return self.base.predict_xstart_from_eps(x, t, pred)
        return x - broadcast_to(t, x) * pred

    def consistency_function(self, model, x, t, cond) -> torch.Tensor:
        """f(x, t) with the boundary condition f(x, 0) = x (exactly: c_skip = 1, c_out = 0 / t = 0)."""
        x0 = self.x0_from(x, t, self.prediction(model, x, t, cond))
        if self.kind != "ddpm":
            return x0
        c_skip, c_out = boundary_scalings(t, float(self.options.sigma_data), float(self.options.timestep_scaling))
        return broadcast_to(c_skip, x) * x + broadcast_to(c_out, x) * x0

    @torch.no_grad()
    def teacher_step(self, x, t, s, cond, w=None) -> torch.Tensor:
        """One guided teacher solver step from time t back to time s < t (w: a scale, or per-sample (N, 1, ...))."""
        w = self.w if w is None else w
        pred = self.prediction(self.teacher, x, t, cond, w)
        if self.kind == "ddpm":  # DDIM (η = 0): x_s = sqrt(ᾱ_s) x̂0 + sqrt(1 − ᾱ_s) ε̂
            x0 = self.base.predict_xstart_from_eps(x, t, pred)
            return self.base._extract("sqrt_alphas_cumprod", s, x) * x0 + \
                self.base._extract("sqrt_one_minus_alphas_cumprod", s, x) * pred
        dt = broadcast_to(s - t, x)
        euler = x + dt * pred
        if self.options.teacher_solver == "euler":
            return euler
        return x + dt * 0.5 * (pred + self.prediction(self.teacher, euler, s, cond, w))  # Heun

    def consistency_pair(self, model, x0, index, noise, cond):
        """(online f_θ(x_{t_{n+k}}), target f_θ⁻(x̂_{t_n})) for grid intervals `index` (and the guidance scales w,
        with a range: from sample_time): the pair the loss compares (methods that add terms, e.g. MusicCM's
        adversarial loss on `online`, reuse it)."""
        w = self.w
        student_cond = cond
        if self.w_range:  # the teacher is guided by each sample's w; the student gets w as its embedded input
            index, w_rows = index[:, 0].long(), index[:, 1].float().to(x0.device)
            w = w_rows.view(-1, *([1] * (x0.ndim - 1)))
            student_cond = {**cond, "w": w_rows}
        later, earlier = (v.to(x0.device) for v in self.times(index.to(x0.device)))
        if self.kind == "ddpm":
            x_later = self.base.q_sample(x0, later, noise)
        else:
            x_later = self.base.interpolate(x0, later, noise)
        online = self.consistency_function(model, x_later, later, student_cond)
        with torch.no_grad():
            x_earlier = self.teacher_step(x_later, later, earlier, cond, w)
            target = self.consistency_function(self.ema, x_earlier, earlier, student_cond)
        return online, target

    def training_losses(self, model, x0, t, noise, model_kwargs=None) -> dict:
        """`t` holds grid indices (and the guidance scales w, with a range: from sample_time)."""
        online, target = self.consistency_pair(model, x0, t, noise, model_kwargs or {})
        return {"loss": distance(online.float(), target.float(), self.loss, self.huber_c)}
