"""What every restoration method shares: the METHODS table, option checking, the DDPM time grid, per-image noise.

A method is a step hook of `ditk.sampling.sample` (see `StepHook`): the loop calls the prior, the method turns
its output into a data-consistent update of x_t. A method object is built for one batch: the operator `op`, the
measurements `y`, the objective, the measurement noise sigma_y and one generator per image (its own noise, so an
image does not depend on the batch it is restored in).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ..errors import ConfigError

METHODS: dict[str, type] = {}


def register(cls):
    METHODS[cls.name] = cls
    return cls


class Method:
    name = ""
    help = ""
    objectives: tuple[str, ...] = ("ddpm",)  # objective names the method's update is derived for
    needs_pinv = False  # uses A^dagger (or the Gram decomposition)
    latent_ok = False  # can differentiate through an autoencoder's decoder (A after the decoder)
    solver = "ddpm"  # the loop's scheduler, whose time grid the method follows
    default_steps = 100
    needs_grad = False
    options: dict = {}  # name -> default (None: a per-task default, see default_option)
    replicas = 1  # the loop runs `replicas` copies of each image (PnP-Flow averages over them)

    def __init__(self, op, y: torch.Tensor, objective, sigma_y: float, options: Optional[dict] = None,
                 generators: Sequence[torch.Generator] = (), decode: Optional[Callable] = None):
        self.op, self.y, self.objective, self.sigma_y = op, y, objective, float(sigma_y)
        self.generators = list(generators)
        self.decode = decode  # latent models: latents -> pixels, differentiable; None in pixel space
        self.opts = self.resolve_options(options or {}, op)
        self.nfe = 0

    @classmethod
    def resolve_options(cls, given: dict, op) -> dict:
        unknown = sorted(set(given) - set(cls.options))
        if unknown:
            allowed = ", ".join(cls.options) or "none"
            raise ConfigError(f"method {cls.name} has no option '{unknown[0]}': its options are {allowed}")
        out = {}
        for key, default in cls.options.items():
            value = given.get(key, default)
            if value is None:
                out[key] = cls.default_option(key, op)
            elif isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ConfigError(f"method {cls.name}: option {key} is true or false, got {value!r}")
                out[key] = value
            else:
                out[key] = type(default if default is not None else 0.0)(value)
        return out

    @classmethod
    def default_option(cls, key: str, op):
        raise KeyError(key)

    @classmethod
    def check(cls, op, objective_name: str, latent: bool) -> None:
        """Refuse what the method cannot do, in one line naming what works instead."""
        if objective_name not in cls.objectives:
            fits = sorted(n for n, m in METHODS.items() if objective_name in m.objectives)
            raise ConfigError(f"method {cls.name} needs a {' or '.join(cls.objectives)} prior, this one is "
                              f"{objective_name}: use --method {' or '.join(fits)}")
        if cls.needs_pinv and not hasattr(op, "pinv"):
            fits = sorted(n for n, m in METHODS.items() if not m.needs_pinv)
            raise ConfigError(f"method {cls.name} needs the pseudo-inverse of A, which task {op.name} lacks: "
                              f"use --method {' or '.join(fits)}")
        if latent and not cls.latent_ok:
            fits = sorted(n for n, m in METHODS.items() if m.latent_ok and objective_name in m.objectives)
            raise ConfigError(f"method {cls.name} works in pixel space and this model is a latent one: use "
                              f"--method {' or '.join(fits) or 'dps (with a ddpm prior)'}")

    # -- helpers ---------------------------------------------------------------------------------------------
    def noise_like(self, x: torch.Tensor) -> torch.Tensor:
        """Standard normal noise, image i from generator i (copies of one image from one generator in turn)."""
        if not self.generators:
            return torch.randn_like(x)
        per = x.shape[0] // len(self.generators)
        rows = [torch.randn(x.shape[1:], generator=g) for g in self.generators for _ in range(per)]
        return torch.stack(rows).to(x)

    def pixels(self, x0: torch.Tensor) -> torch.Tensor:
        return self.decode(x0) if self.decode is not None else x0


class DDPMGrid:
    """alpha_bar at the loop's timesteps and at the step each goes to (1 after the last: x_0 itself)."""

    def __init__(self, objective, timesteps: Sequence[int], prev: Optional[Sequence[int]] = None):
        ac = objective.alphas_cumprod.double()
        ts = [int(t) for t in timesteps]
        prev = list(prev) if prev is not None else ts[1:] + [-1]
        self.t = ts
        self.prev = [int(p) for p in prev]
        self.ab = [float(ac[t]) for t in ts]
        self.ab_prev = [1.0 if p < 0 else float(ac[p]) for p in self.prev]


def split_eps(out: torch.Tensor, channels: int) -> torch.Tensor:
    """The epsilon half of a DDPM output (the variance channels, when learned, follow it)."""
    return out[:, :channels]
