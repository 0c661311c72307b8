"""A-JEPA's self-supervised objective: predict the EMA target encoder's representations of masked spectrogram
blocks (ditk.audio.ajepa). It is not a diffusion objective; it fits the training loop's objective API as follows.

- The loop's per-sample random draw (`sample_time`, the "time" of diffusion objectives) is the set of masks:
  drawn for the whole global batch from the step's generator, so runs resume exactly and N processes train as
  one (each process takes its rows). `uses_noise = False`: the loop draws no diffusion noise for it.
- Two hooks the loop calls on objectives that have them: `begin_step(model, step, max_steps)` before the
  step's draws (the masking curriculum needs the step), and `end_step(model, step, max_steps)` after the
  optimizer step: the momentum update of the target encoder, m going linearly from 0.996 to 1.0 over
  train.max_steps (I-JEPA's schedule). The target encoder lives inside the model (its weights are in the
  checkpoint's model.safetensors). `uses_ema = False`: the loop keeps no EMA copy of the whole model (its
  constant decay is not the paper's, and the copy would double the memory and the work of every step);
  ema.safetensors then holds the model's own weights.
- It has no solvers: there is nothing to sample, and `ditk sample` says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import List, Optional

import torch

from ..audio.ajepa import LOSSES, MaskConfig, jepa_loss, momentum_at, sample_masks
from ..errors import ConfigError
from ..registry import OBJECTIVES
from .base import Objective, cfg_get

NOT_GENERATIVE = ("A-JEPA is a self-supervised audio encoder, not a generative model: there is nothing to sample. "
                  "Use the run as a feature network: ditk evaluate-fid --modality audio GEN REF --features RUN")


@dataclass
class AJEPAObjectiveConfig(MaskConfig):
    momentum: List[float] = field(default_factory=lambda: [0.996, 1.0])  # target-encoder EMA, start -> end
    loss: str = "l2"  # l2 (the paper: averaged L2 distance) | smooth_l1 (I-JEPA's code)


@OBJECTIVES.register("a-jepa", config=AJEPAObjectiveConfig,
                     help="A-JEPA: predict EMA-target representations of masked spectrogram blocks (not generative)")
class AJEPAObjective(Objective):
    name = "a-jepa"
    solvers = ()
    why_no_solvers = NOT_GENERATIVE  # what `ditk sample` says about a run of this objective
    uses_noise = False  # the train loop draws no noise for it (the masks are its whole random draw)
    uses_ema = False  # ... and keeps no EMA copy: the target encoder is the model's own average

    def __init__(self, cfg=None):
        cfg = AJEPAObjectiveConfig() if cfg is None else cfg
        values = {f.name: cfg_get(cfg, f.name, getattr(AJEPAObjectiveConfig(), f.name)) for f in fields(MaskConfig)}
        self.masks = MaskConfig(**{k: list(v) if not isinstance(v, (str, int, float)) else v
                                   for k, v in values.items()}).check()
        self.momentum = [float(m) for m in cfg_get(cfg, "momentum", [0.996, 1.0])]
        self.loss = str(cfg_get(cfg, "loss", "l2"))
        if len(self.momentum) != 2 or not 0.0 <= self.momentum[0] <= self.momentum[1] <= 1.0:
            raise ConfigError(f"objective.momentum must be [start, end] with 0 <= start <= end <= 1, "
                              f"got {self.momentum}")
        if self.loss not in LOSSES:
            raise ConfigError(f"unknown objective.loss '{self.loss}': use one of {', '.join(LOSSES)}")
        self.grid: Optional[tuple] = None
        self.step, self.total = 0, 1
        self.last_kind: Optional[str] = None  # the mask type of the last draw ("random-block" | "time-frequency")

    @property
    def learn_sigma(self) -> bool:
        return False

    def begin_step(self, model, step: int, max_steps: int) -> None:
        """Called by the loop before step `step` draws anything."""
        if not hasattr(model, "grid"):
            raise ConfigError(f"objective 'a-jepa' trains the 'a-jepa' model, not {type(model).__name__}: "
                              f"set model.name=a-jepa")
        self.grid, self.step, self.total = tuple(model.grid), int(step), int(max_steps)

    def end_step(self, model, step: int, max_steps: int) -> None:
        """Called by the loop after the optimizer update of step `step` (0-based): the target encoder's EMA."""
        model.update_target(momentum_at(step, max_steps, self.momentum))

    def momentum_at(self, step: int, max_steps: int) -> float:
        return momentum_at(step, max_steps, self.momentum)

    def sample_time(self, n: int, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
        """The step's masks, (n, 1 + M, T) bool: row 0 the context, rows 1..M the target blocks."""
        if self.grid is None:
            raise RuntimeError("AJEPAObjective.begin_step(model, step, max_steps) must run before sample_time")
        masks, self.last_kind = sample_masks(n, self.grid, self.masks, self.step, self.total, generator)
        return masks if device is None else masks.to(device)

    def training_losses(self, model, x0, t, noise=None, model_kwargs=None) -> dict:
        """{"loss"} per sample; `t` holds the masks from sample_time, noise and conditioning are unused."""
        predictions, targets = model(x0, t)
        return {"loss": jepa_loss(predictions, targets, self.loss)}

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def scheduler_timestep_to_model_time(self, timestep) -> torch.Tensor:
        raise ConfigError(NOT_GENERATIVE)

    def make_scheduler(self, solver: str, steps: int, device=None, **options):
        raise ConfigError(NOT_GENERATIVE)

    def _make_scheduler(self, solver: str, steps: int, device, options: dict):
        raise ConfigError(NOT_GENERATIVE)
