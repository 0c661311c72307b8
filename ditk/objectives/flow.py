"""Rectified flow (DiT-MoE `--rf`, FluxMusic, SD3): straight paths from data to noise, velocity regression.

z_t = (1 - t) x0 + t eps with t in [0, 1] (t = 0 data, t = 1 noise), the model predicts v = eps - x0, and
sampling integrates dz/dt = v from t = 1 to t = 0. In diffusers' flow-matching schedulers sigma plays the role
of t and their timesteps are sigma * 1000.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..errors import ConfigError
from ..registry import OBJECTIVES
from .base import Objective, broadcast_to, build_scheduler, cfg_get, mean_flat

TIME_SAMPLINGS = ("logit-normal", "uniform")
# diffusers flow schedulers express sigma in [0, 1] as timesteps sigma * NUM_TRAIN_TIMESTEPS.
NUM_TRAIN_TIMESTEPS = 1000


@dataclass
class FlowConfig:
    # "logit-normal": t = sigmoid(N(logit_mean, logit_std^2)) (SD3; DiT-MoE and FluxMusic use N(0, 1)), which
    # spends more training on the middle times; "uniform": t ~ U(0, 1).
    time_sampling: str = "logit-normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # SD3 time shift t' = s t / (1 + (s - 1) t) applied to the training times (s > 1 means noisier); also the
    # default shift of the sampling schedule.
    shift: float = 1.0
    # Model time = t * time_scale. FluxMusic/SD3/Flux feed t * 1000; DiT-MoE feeds the raw t (use 1.0).
    time_scale: float = 1000.0


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's resolution shift: t' = s t / (1 + (s - 1) t); keeps 0 and 1 fixed."""
    return shift * t / (1 + (shift - 1) * t)


@OBJECTIVES.register("rectified-flow", config=FlowConfig, help="rectified flow: z_t=(1-t)x0+t*eps, predict eps-x0")
class RectifiedFlow(Objective):
    name = "rectified-flow"
    solvers = ("euler", "heun", "dpm-solver++", "unipc", "lcm")

    def __init__(self, cfg=None):
        cfg = FlowConfig() if cfg is None else cfg
        self.time_sampling = str(cfg_get(cfg, "time_sampling", "logit-normal"))
        self.logit_mean = float(cfg_get(cfg, "logit_mean", 0.0))
        self.logit_std = float(cfg_get(cfg, "logit_std", 1.0))
        self.shift = float(cfg_get(cfg, "shift", 1.0))
        self.time_scale = float(cfg_get(cfg, "time_scale", 1000.0))
        if self.time_sampling not in TIME_SAMPLINGS:
            choices = ", ".join(TIME_SAMPLINGS)
            raise ConfigError(f"unknown objective.time_sampling '{self.time_sampling}': use one of {choices}")
        if self.shift <= 0 or self.logit_std <= 0 or self.time_scale <= 0:
            raise ConfigError("objective.shift, logit_std and time_scale must be > 0")

    @property
    def learn_sigma(self) -> bool:
        return False

    def sample_time(self, n: int, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
        device = device if device is not None else (generator.device if generator is not None else "cpu")
        if self.time_sampling == "logit-normal":
            u = torch.randn(n, generator=generator, device=device) * self.logit_std + self.logit_mean
            t = torch.sigmoid(u)
        else:
            t = torch.rand(n, generator=generator, device=device)
        return shift_time(t, self.shift)

    def interpolate(self, x0, t, noise):
        """z_t = (1 - t) x0 + t noise."""
        t = broadcast_to(t, x0)
        return (1 - t) * x0 + t * noise

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        return t.float() * self.time_scale

    def scheduler_timestep_to_model_time(self, timestep) -> torch.Tensor:
        return torch.as_tensor(timestep).float() / NUM_TRAIN_TIMESTEPS * self.time_scale

    def training_losses(self, model, x0, t, noise, model_kwargs=None) -> dict:
        """{"loss"}: mean squared error between the model output and the velocity eps - x0, per sample."""
        z_t = self.interpolate(x0, t, noise)
        out = model(z_t, self.model_time(t), **(model_kwargs or {}))
        C = x0.shape[1]
        if out.shape[1] == 2 * C:
            # A backbone built with learn_sigma (DiT-MoE trains RF this way): the loss reads the first C channels.
            out = out[:, :C]
        elif out.shape[1] != C:
            raise ValueError(f"rectified flow needs {C} model output channels, got {out.shape[1]}")
        return {"loss": mean_flat((noise - x0 - out) ** 2)}

    def _make_scheduler(self, solver: str, steps: int, device, options: dict):
        from diffusers import (
            DPMSolverMultistepScheduler,
            FlowMatchEulerDiscreteScheduler,
            FlowMatchHeunDiscreteScheduler,
            UniPCMultistepScheduler,
        )

        shift = float(options.pop("shift", self.shift))
        if shift <= 0:
            raise ConfigError(f"sampling shift must be > 0, got {shift}")
        if solver == "euler":
            scheduler = build_scheduler(
                FlowMatchEulerDiscreteScheduler, options, num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift
            )
            # The uniform grid t = 1, (N-1)/N, ..., 1/N (then 0) that DiT-MoE/FluxMusic's Euler loop uses; the
            # scheduler applies the shift to it. (Its default grid ends at 1/1000 instead.)
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1].tolist(), device=device)
            return scheduler
        if solver == "lcm":
            # Multistep consistency sampling of a consistency-distilled flow student: x̂0 = x - t v, re-noised to the
            # next t of the same uniform grid as euler.
            from diffusers import FlowMatchLCMScheduler

            scheduler = build_scheduler(FlowMatchLCMScheduler, options, num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift)
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1].tolist(), device=device)
            return scheduler
        if solver == "heun":
            scheduler = build_scheduler(
                FlowMatchHeunDiscreteScheduler, options, num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift
            )
            scheduler.set_timesteps(steps, device=device)
            return scheduler
        cls = DPMSolverMultistepScheduler if solver == "dpm-solver++" else UniPCMultistepScheduler
        extra = dict(algorithm_type="dpmsolver++", solver_order=2) if solver == "dpm-solver++" else {}
        scheduler = build_scheduler(
            cls, options, num_train_timesteps=NUM_TRAIN_TIMESTEPS, use_flow_sigmas=True, flow_shift=shift,
            prediction_type="flow_prediction", **extra,
        )
        scheduler.set_timesteps(steps, device=device)
        # These schedulers store timesteps as int64 (sigma * 1000 truncated), so the model would see a time up to
        # 1/1000 off the sigma the solver integrates with. Replace them by the exact float sigma * 1000; step()
        # only looks them up by equality, so the solver is unchanged.
        exact = scheduler.sigmas[:-1] * NUM_TRAIN_TIMESTEPS
        scheduler.timesteps = exact.to(device=device or "cpu", dtype=torch.float32)
        return scheduler
