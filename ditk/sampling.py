"""The one sampling loop: every objective, solver and backbone goes through `sample`.

A solver is a SOLVERS entry that returns a diffusers scheduler configured for the objective; the loop only calls
the model (with classifier-free guidance) and `scheduler.step`.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from types import SimpleNamespace
from typing import Optional, Protocol, Sequence, Union

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
_register("lcm", "multistep consistency sampling (LCM) of a consistency-distilled student (ditk distill), 1-8 steps")


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
    solver="ddpm",
    steps: int = 250,
    cfg_scale: float = 1.0,  # a model with an embedded guidance scale takes it as its input w instead
    cfg_channels: Optional[int] = None,
    generator: Union[torch.Generator, list[torch.Generator], None] = None,
    progress: bool = False,
    solver_options: Optional[dict] = None,
    cache=None,
    precision: str = "fp32",
    time_shift_window: int = 0,
    time_shift_cutoff: int = 300,
    step_hooks: Sequence = (),
) -> torch.Tensor:
    """Integrate the reverse process from `noise` (N, C, H, W) to x0 of the same shape.

    cond/uncond: model keyword arguments (e.g. {"y": labels} and {"y": null labels}); uncond is needed when
    cfg_scale != 1. generator: the only source of randomness for stochastic solvers (ddpm, ddim with eta > 0);
    a list of N generators draws each sample's noise from its own generator, so a sample does not depend on
    which batch it was drawn in.

    cache: a `ditk.cache` policy (build_policy) applied to this call's model evaluations; it accumulates
    the NFE counts of its report. precision "bf16": autocast the model calls to bfloat16 (CUDA or CPU).
    time_shift_window > 0: the time-shift sampler (TS-DDIM, see `TimeShift`; solver ddim only).

    step_hooks: objects that steer the loop per step (restoration, editing); see `StepHook`.

    solver may also be a scheduler-like object instead of a SOLVERS name: it supplies `timesteps` and
    `step(out, t, x) -> .prev_sample` (steps and solver_options are then ignored). `ditk.edit.grids` uses this to
    run the same loop towards noise (inversion) over a reversed time grid."""
    from diffusers import DDPMScheduler
    from tqdm import tqdm

    cond = dict(cond or {})
    guided = float(cfg_scale) != 1.0
    if getattr(getattr(model, "t_embedder", None), "w_embedder", None) is not None:
        # A model with an embedded guidance scale (an LCM-style student, ditk.models.guidance): cfg_scale is its
        # input w, one forward pass per step, no [cond; uncond] batch.
        cond["w"] = torch.full((noise.shape[0],), float(cfg_scale), device=noise.device)
        guided = False
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
    if isinstance(solver, str):
        build = SOLVERS.get(solver).builder
        options = dict(solver_options or {})
        step_kwargs = {k: options.pop(k) for k in list(options) if k in build.step_options}
        scheduler = build(objective, steps, device=device, **options)
    else:  # a ready scheduler-like object (timesteps, step(out, t, x)); e.g. a ditk.edit.grids inversion grid
        scheduler, step_kwargs = solver, {}
        solver, steps = getattr(scheduler, "name", type(scheduler).__name__), len(scheduler.timesteps)
    if time_shift_window:
        scheduler = TimeShift(scheduler, objective, solver, int(time_shift_window), int(time_shift_cutoff))
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"unknown precision '{precision}': use fp32 or bf16")
    if precision == "bf16" and device.type not in ("cuda", "cpu"):
        raise ConfigError(f"precision bf16 is autocast on CUDA or CPU, not {device.type}: use --precision fp32")
    # bf16: the model calls autocast (CPU: oneDNN's bf16 matmuls, fast on AMX / AVX512-BF16 cores); the solver's
    # arithmetic stays fp32.
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
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
    for hook in step_hooks:
        if hasattr(hook, "begin"):
            hook.begin(scheduler)
    needs_grad = any(getattr(hook, "needs_grad", False) for hook in step_hooks)
    bar = tqdm(scheduler.timesteps, desc=f"{solver} {steps} steps", disable=not progress, file=sys.stderr, leave=False)
    # One cache session per call: fresh cache state, every evaluation of this loop keyed by its index.
    session = cache.session(model, len(scheduler.timesteps)) if cache is not None else contextlib.nullcontext()
    # bf16: one (disabled) autocast region around the loop keeps autocast's cache of the weights' bf16 casts from one
    # denoiser call to the next (torch drops it when the outermost autocast region exits) instead of re-casting every
    # weight at every step; the weights do not change while sampling. Not with a hook that differentiates through
    # the model (DPS), whose backward passes would share the cached casts.
    keep_casts = precision == "bf16" and not needs_grad
    casts = torch.autocast(device.type, dtype=torch.bfloat16, enabled=False) if keep_casts else contextlib.nullcontext()
    with session, casts:
        for i, t in enumerate(bar):
            for hook in step_hooks:
                if hasattr(hook, "step_begin"):
                    replaced = hook.step_begin(i, t, x)
                    if replaced is not None:  # e.g. PnP-Flow evaluates the model at a re-noised point
                        x = replaced
            # A hook that differentiates through the model (DPS) gets x with requires_grad and an output with a graph.
            with torch.enable_grad() if needs_grad else contextlib.nullcontext():
                if needs_grad:
                    x = x.detach().requires_grad_(True)
                x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
                t_rows = scheduler.row_timesteps(x, t) if isinstance(scheduler, TimeShift) else t
                t_model = objective.scheduler_timestep_to_model_time(t_rows).to(device=device, dtype=torch.float32).expand(n)
                with amp():
                    if guided:
                        out = model(torch.cat([x_in, x_in], dim=0), torch.cat([t_model, t_model], dim=0), **model_kwargs)
                    else:
                        out = model(x_in, t_model, **model_kwargs)
                if out.dtype in (torch.bfloat16, torch.float16):
                    out = out.float()
                if guided:
                    out = guide(out, float(cfg_scale), cfg_channels, channels)
                if out.shape[1] not in (channels, 2 * channels):
                    raise ValueError(f"model output has {out.shape[1]} channels for a {channels}-channel input")
                if full_output and out.shape[1] != 2 * channels:
                    raise ValueError(f"the objective learns the variance but the model outputs only {out.shape[1]} channels")
                for hook in step_hooks:
                    if hasattr(hook, "model_output"):
                        out = hook.model_output(i, t, x, out)
            prev = scheduler.step((out if full_output else out[:, :channels]).detach(), t, x.detach(),
                                  **step_kwargs).prev_sample
            for hook in step_hooks:
                if hasattr(hook, "step_end"):
                    prev = hook.step_end(i, t, x, out, prev)
            x = prev.detach()
    return x


class StepHook(Protocol):
    """What a step hook of `sample` may define (every method is optional; the loop calls those that exist).

    begin(scheduler): once, before the first step (the hook reads the time grid / alphas it needs).
    step_begin(i, t, x) -> None or x: before the model call of step i at scheduler timestep t (e.g. switch an
        attention injection on or off by step). A returned tensor replaces x for this step's model call and
        solver step (PnP-Flow evaluates the model at a re-noised point); None leaves x as it is.
    model_output(i, t, x, out) -> out: the guided model output, before the solver step; return it corrected
        (e.g. a prediction made consistent with a measurement). With `needs_grad = True` the loop evaluates
        the model with autograd on, x requiring grad, so the hook can differentiate through the model (DPS).
    step_end(i, t, x, out, prev) -> prev: the solver's x_{t-1}; return it corrected (a guidance step, a
        projection). The returned tensor becomes the next x.
    """

    needs_grad: bool


class TimeShift:
    """The time-shift sampler (Li et al., ICLR 2024, "Alleviating Exposure Bias in Diffusion Models through
    Sampling with Shifted Time Steps"; TS-DDIM as in their ADM code).

    A generated x_t carries a different noise level than the training x_t of the same t (exposure bias).
    Before every evaluation after the first, while the nominal timestep t is above `cutoff`, each sample
    picks, among the training timesteps t' in a window of `window` around t, the one whose noise variance
    1 - alpha_bar(t') is closest to its own pixel variance; the model is evaluated at t' and the DDIM step
    goes from t' by the nominal stride (diffusers' DDIMScheduler.step at t', per group of rows that chose the
    same t'). Below the cutoff, and for window 0, it is plain DDIM.
    """

    def __init__(self, scheduler, objective, solver: str, window: int, cutoff: int):
        from diffusers import DDIMScheduler

        if window < 0:
            raise ConfigError(f"time_shift_window must be >= 0, got {window}")
        if not isinstance(scheduler, DDIMScheduler) or not hasattr(objective, "alphas_cumprod"):
            raise ConfigError(f"the time-shift sampler is TS-DDIM: use --solver ddim with a DDPM model (not '{solver}')")
        self.scheduler = scheduler
        self.timesteps = scheduler.timesteps
        self.noise_var = 1.0 - objective.alphas_cumprod.double()  # the variance of x_t for data of variance 0
        self.window, self.cutoff = window, cutoff
        self._k = 0
        self._rows = None

    def scale_model_input(self, x, t):
        return x

    def row_timesteps(self, x: torch.Tensor, t) -> torch.Tensor:
        """The (n,) timesteps the model is evaluated at for the current sample x at nominal timestep t."""
        t = int(t)
        n = x.shape[0]
        if self._k == 0 or self.window == 0 or t <= self.cutoff:
            chosen = torch.full((n,), t, dtype=torch.long)
        else:
            half = self.window // 2
            lo = t - half if t - half > 0 else 0
            hi = min(lo + (2 * half if lo else self.window) + 1, len(self.noise_var))
            candidates = self.noise_var[lo:hi]
            var = x.detach().double().flatten(1).var(dim=1).cpu()  # unbiased, as torch.var in the authors' code
            chosen = lo + torch.argmin((var[:, None] - candidates[None]) ** 2, dim=1)
        self._rows = chosen
        return chosen.to(x.device)

    def step(self, model_output, timestep, sample, generator=None, **kwargs):
        prev = torch.empty_like(sample)
        rows_of_t = self._rows
        for value in torch.unique(rows_of_t).tolist():
            rows = rows_of_t == value
            if isinstance(generator, list):
                gen = [g for g, keep in zip(generator, rows.tolist()) if keep]
            else:
                gen = generator
            idx = rows.to(sample.device)
            prev[idx] = self.scheduler.step(model_output[idx], value, sample[idx], generator=gen, **kwargs).prev_sample
        self._k += 1
        return SimpleNamespace(prev_sample=prev)

