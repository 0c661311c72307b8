"""The one sampling loop: every objective, solver and backbone goes through `sample`.

A solver is a SOLVERS entry that returns a diffusers scheduler configured for the objective; the loop only calls
the model (with classifier-free guidance) and `scheduler.step`.
"""

from __future__ import annotations

import inspect
import sys
from typing import Optional, Union

import torch

from .errors import ConfigError
from .registry import SOLVERS


def _register(name: str, help: str, step_options: tuple[str, ...] = ()):
    """A solver builds its scheduler through the objective, which knows its betas / sigmas and which solvers
    apply to it (an incompatible pair raises ConfigError there). `step_options` are solver_options that belong
    to scheduler.step() rather than to the scheduler's constructor."""

    def build(objective, steps: int, **options):
        return objective.make_scheduler(name, steps, **options)

    build.__name__ = build.__qualname__ = "build_" + name.replace("-", "_").replace("+", "p")
    build.step_options = step_options
    SOLVERS.register(name, help=help)(build)


_CHURN = ("s_churn", "s_tmin", "s_tmax", "s_noise")
_register("ddpm", "ancestral DDPM sampling, uses a learned variance (DiT: 250 steps)")
_register("ddim", "DDIM, deterministic unless solver_options.eta > 0 (DiT: ddim50)", ("eta",))
_register("dpm-solver++", "DPM-Solver++(2M), deterministic multistep")
_register("unipc", "UniPC multistep predictor-corrector")
_register("euler", "Euler steps of the flow ODE (DiT-MoE/FluxMusic: 50 steps)", _CHURN)
_register("heun", "Heun (2nd order) steps of the flow ODE, 2 model calls per step", _CHURN)


def guide(out: torch.Tensor, cfg_scale: float, cfg_channels: Optional[int], channels: int) -> torch.Tensor:
    """Combine a [cond; uncond] model output: the first `cfg_channels` channels (None = all `channels` prediction
    channels) become uncond + s * (cond - uncond); the other channels (DiT: the 4th latent channel and the
    variance) are the cond half's."""
    k = channels if cfg_channels is None else int(cfg_channels)
    if not 1 <= k <= channels:
        raise ConfigError(f"cfg_channels={cfg_channels} must be between 1 and {channels} (or null for all)")
    cond, uncond = out.chunk(2, dim=0)
    guided = cond.clone()
    guided[:, :k] = uncond[:, :k] + cfg_scale * (cond[:, :k] - uncond[:, :k])
    return guided


@torch.no_grad()
def sample(
    model,
    objective,
    noise: torch.Tensor,
    cond: dict,
    uncond: Optional[dict] = None,
    *,
    solver: str = "ddpm",
    steps: int = 250,
    cfg_scale: float = 1.0,
    cfg_channels: Optional[int] = None,
    generator: Union[torch.Generator, list[torch.Generator], None] = None,
    progress: bool = False,
    solver_options: Optional[dict] = None,
) -> torch.Tensor:
    """Integrate the reverse process from `noise` (N, C, H, W) to x0 of the same shape.

    cond/uncond: model keyword arguments (e.g. {"y": labels} and {"y": null labels}); uncond is needed when
    cfg_scale != 1. generator: the only source of randomness for stochastic solvers (ddpm, ddim with eta > 0);
    a list of N generators draws each sample's noise from its own generator, so a sample does not depend on
    which batch it was drawn in."""
    from diffusers import DDPMScheduler
    from tqdm import tqdm

    cond = dict(cond or {})
    guided = float(cfg_scale) != 1.0
    if guided:
        if uncond is None:
            raise ConfigError(f"cfg_scale={cfg_scale} needs unconditional inputs: pass uncond (or set cfg_scale 1)")
        if set(uncond) != set(cond):
            raise ConfigError(f"cond keys {sorted(cond)} and uncond keys {sorted(uncond)} differ: give both the same")
        # One forward on the doubled batch, as in DiT's forward_with_cfg.
        model_kwargs = {k: torch.cat([cond[k], uncond[k]], dim=0) for k in cond}
    else:
        model_kwargs = cond

    device = noise.device
    build = SOLVERS.get(solver).builder
    options = dict(solver_options or {})
    step_kwargs = {k: options.pop(k) for k in list(options) if k in build.step_options}
    scheduler = build(objective, steps, device=device, **options)
    if "generator" in inspect.signature(scheduler.step).parameters:
        step_kwargs["generator"] = generator

    n, channels = noise.shape[0], noise.shape[1]
    # Only DDPMScheduler with a learned variance consumes the variance channels; the others take eps/velocity.
    full_output = (
        objective.learn_sigma
        and isinstance(scheduler, DDPMScheduler)
        and scheduler.config.variance_type in ("learned", "learned_range")
    )
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    bar = tqdm(scheduler.timesteps, desc=f"{solver} {steps} steps", disable=not progress, file=sys.stderr, leave=False)
    for t in bar:
        x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        t_model = objective.scheduler_timestep_to_model_time(t).to(device=device, dtype=torch.float32).expand(n)
        if guided:
            out = model(torch.cat([x_in, x_in], dim=0), torch.cat([t_model, t_model], dim=0), **model_kwargs)
            out = guide(out, float(cfg_scale), cfg_channels, channels)
        else:
            out = model(x_in, t_model, **model_kwargs)
        if out.shape[1] not in (channels, 2 * channels):
            raise ValueError(f"model output has {out.shape[1]} channels for a {channels}-channel input")
        if full_output and out.shape[1] != 2 * channels:
            raise ValueError(f"the objective learns the variance but the model outputs only {out.shape[1]} channels")
        x = scheduler.step(out if full_output else out[:, :channels], t, x, **step_kwargs).prev_sample
    return x

