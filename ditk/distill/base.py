"""What every distillation method shares: its config fields, the frozen teacher, and the objective wrapper.

A method is an objective for the training loop (`training_losses`, `sample_time`, optional `begin_step` /
`end_step` / `state_dict`) that also holds a teacher. The loop calls `attach(ema=..., conditioner=...,
device=..., run_dir=...)` once before training: the teacher is built from its run's config, loaded from its EMA weights, put
in eval mode with requires_grad False and never written (the loop's optimizer never sees it, and it is not in
any checkpoint). Everything the loop or the sampler asks that a method does not define (solvers, schedulers,
`learn_sigma`, `model_time`, ...) is the wrapped objective's, so a student is an ordinary run of the teacher's
objective (ddpm or rectified-flow) and `ditk sample` needs nothing new.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..errors import ConfigError


@dataclass
class DistillConfig:
    teacher: str = "???"  # the teacher: a ditk run directory or one of its checkpoints/step-N folders (EMA weights)
    # A smaller student architecture: a preset name or a ditk run (a pruned run: the student also starts from its
    # weights). Empty: the student is the teacher's architecture, initialised from the teacher's weights.
    student: str = ""


def load_teacher(source: str, device=None):
    """(model, config) of a teacher run or checkpoint: EMA weights, eval mode, frozen."""
    from ..build import build_model
    from ..config import load_run_config
    from ..runs import load_weights, resolve_checkpoint

    path = Path(source)
    if not path.exists():
        raise ConfigError(f"distill.teacher '{source}' does not exist: pass a ditk run directory (runs/<name>) "
                          "or one of its checkpoints")
    run_dir, ckpt = resolve_checkpoint(path)
    cfg = load_run_config(run_dir)
    model = build_model(cfg)
    model.load_state_dict(load_weights(ckpt, "ema"))
    model.eval().requires_grad_(False)
    return (model.to(device) if device is not None else model), cfg


def objective_kind(objective) -> str:
    """'ddpm' or 'rectified-flow' (the two objectives distillation knows), else ConfigError."""
    name = getattr(objective, "name", "")
    if name not in ("ddpm", "rectified-flow"):
        raise ConfigError(f"distillation needs a ddpm or rectified-flow teacher, not objective '{name}'")
    return name


def forward_process(objective, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor):
    """(x_t, the diffusion target the model regresses: eps for DDPM, the velocity eps - x0 for a flow)."""
    if objective_kind(objective) == "ddpm":
        return objective.q_sample(x0, t, noise), noise
    return objective.interpolate(x0, t, noise), noise - x0


def guided(model, x: torch.Tensor, t_model: torch.Tensor, cond: dict, uncond: Optional[dict], scale: float,
           channels: int, cfg_channels: Optional[int] = None) -> torch.Tensor:
    """A model output with classifier-free guidance `scale` (1 = the conditional output alone), as the sampler
    computes it (`ditk.sampling.guide`: one forward on the [cond; uncond] batch)."""
    from ..sampling import guide

    if uncond is None or (not torch.is_tensor(scale) and scale == 1.0):  # a tensor: per-sample scales (N, 1, 1, 1)
        return model(x, t_model, **cond)
    kwargs = {k: torch.cat([cond[k], uncond[k].to(cond[k].device)], dim=0) for k in cond}
    out = model(torch.cat([x, x], dim=0), torch.cat([t_model, t_model], dim=0), **kwargs)
    return guide(out, scale, cfg_channels, channels)


class Distiller:
    """Base of the methods: holds the wrapped objective, the method's options and (after `attach`) the teacher."""

    # Objectives (by name) the method supports; the command refuses the others before writing anything.
    objectives: tuple = ("ddpm", "rectified-flow")
    # What the method reads from the run's data section (named in the error when the data is missing).
    data_need: str = "real training images and their labels"


    def __init__(self, options, objective, cfg):
        self.base = objective
        self.options = options
        self.run_cfg = cfg
        self.teacher = None
        self.teacher_cfg = None
        self.ema = None
        self.conditioner = None

    def __getattr__(self, name):
        # Only reached for attributes the method does not define: the objective's (solvers, schedulers, ...).
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    @classmethod
    def check(cls, options, cfg, teacher_cfg) -> None:
        """Refuse a configuration the method cannot run (called by the command before the run dir is written)."""
        from ..build import build_objective

        if teacher_cfg.objective.name not in cls.objectives:
            raise ConfigError(f"distill.method={cfg.distill.method} does not apply to a {teacher_cfg.objective.name} "
                              f"teacher: it supports {', '.join(cls.objectives)}")
        cls(options, build_objective(cfg), cfg)  # the constructor validates the method's options

    def attach(self, ema=None, conditioner=None, device=None, run_dir=None) -> None:
        """Called once by the training loop: load the frozen teacher; keep the student's EMA and the conditioner
        (run_dir: the student's run directory, for methods that keep files there)."""
        self.teacher, self.teacher_cfg = load_teacher(self.options.teacher, device)
        self.ema, self.conditioner = ema, conditioner

    @property
    def cfg_channels(self) -> Optional[int]:
        """The channels the teacher's guidance applies to (its run's sample.cfg_channels: DiT's 3 of 4 latents)."""
        return self.teacher_cfg.sample.cfg_channels if self.teacher_cfg is not None else None

    def uncond_like(self, cond: dict, n: int) -> Optional[dict]:
        """The null conditioning of a batch of n (None for an unconditional model)."""
        if self.conditioner is None or getattr(self.conditioner, "unconditional", False):
            return None
        ref = next(iter(cond.values()), None)
        uncond = self.conditioner.uncond(n)
        return {k: v.to(ref.device) if ref is not None else v for k, v in uncond.items()}
