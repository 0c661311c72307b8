"""What every training objective offers the train loop and the sampler (see notes on the objective API).

An objective owns the forward (noising) process, the training loss, the mapping from its own time units to the
time the model is fed, and the diffusers schedulers that integrate its reverse process. The sampler in
`ditk.sampling` knows nothing else about it.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any, Optional

import torch

from ..errors import ConfigError


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions: one number per sample."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def broadcast_to(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N,) per-sample values -> (N, 1, 1, ...) so they broadcast against x, in x's dtype."""
    return values.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def cfg_get(cfg: Any, key: str, default: Any) -> Any:
    """Read a field from a dataclass instance, an OmegaConf DictConfig or a dict (builders accept all three)."""
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


# Scheduler arguments that must come from the objective (the noise schedule and what the model predicts).
PROTECTED = frozenset(
    {"num_train_timesteps", "trained_betas", "beta_schedule", "beta_start", "beta_end", "prediction_type",
     "use_flow_sigmas", "rescale_betas_zero_snr"}
)


def build_scheduler(cls: type, options: dict, **defaults):
    """Instantiate a diffusers scheduler from our defaults overridden by the user's options.

    diffusers raises a bare TypeError for an unknown keyword; name the valid ones instead."""
    fixed = sorted(PROTECTED & set(options))
    if fixed:
        raise ConfigError(f"solver option(s) {', '.join(fixed)} are set by the objective: remove them from the options")
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self"} - PROTECTED
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(unknown)} for {cls.__name__}: use one of {', '.join(sorted(allowed))}"
        )
    return cls(**{**defaults, **options})


class Objective(ABC):
    """Interface shared by `ddpm` and `rectified-flow`."""

    name: str = ""
    # Solvers (SOLVERS registry names) whose scheduler this objective knows how to configure.
    solvers: tuple[str, ...] = ()

    @property
    @abstractmethod
    def learn_sigma(self) -> bool:
        """True when the model must output 2C channels (prediction first, variance interpolation second)."""

    @abstractmethod
    def sample_time(self, n: int, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
        """Training times in the objective's own units, drawn only from `generator`."""

    @abstractmethod
    def training_losses(self, model, x0, t, noise, model_kwargs=None) -> dict[str, torch.Tensor]:
        """Per-sample losses; always has key "loss" of shape (N,)."""

    @abstractmethod
    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """Training time -> the float time tensor fed to the model."""

    @abstractmethod
    def scheduler_timestep_to_model_time(self, timestep: torch.Tensor) -> torch.Tensor:
        """A diffusers scheduler timestep (from `make_scheduler`) -> the float time fed to the model."""

    @abstractmethod
    def _make_scheduler(self, solver: str, steps: int, device, options: dict):
        """Build the scheduler for a solver in `self.solvers` and call its set_timesteps."""

    def make_scheduler(self, solver: str, steps: int, device=None, **options):
        """A diffusers scheduler for `solver`, with `steps` timesteps already set (on `device`)."""
        if solver not in self.solvers:
            raise ConfigError(
                f"solver '{solver}' does not apply to objective '{self.name}': use one of {', '.join(self.solvers)}"
            )
        if int(steps) < 1:
            raise ConfigError(f"sampling steps must be >= 1, got {steps}: set sample.steps to a positive integer")
        return self._make_scheduler(solver, int(steps), device, dict(options))
