"""Gaussian diffusion (DDPM) as trained by ADM and DiT: epsilon prediction, learned variance, hybrid loss.

The math follows openai/improved-diffusion `gaussian_diffusion.py` (the `diffusion/` package that DiT, DiT-MoE,
DiS and Diffusion-RWKV ship): linear betas 1e-4 -> 0.02 at T=1000, schedule arrays in float64, loss = MSE on
epsilon + the variational bound term of the learned variance (with the mean detached, so the VB only trains the
variance: "L_hybrid" of Nichol & Dhariwal 2021). Sampling is delegated to diffusers schedulers built from the
same betas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..errors import ConfigError
from ..registry import OBJECTIVES
from .base import Objective, broadcast_to, build_scheduler, cfg_get, mean_flat

BETA_SCHEDULES = ("linear", "squaredcos_cap_v2", "sqrt")
VARIANCES = ("learned_range", "fixed_small", "fixed_large")


@dataclass
class DDPMConfig:
    num_timesteps: int = 1000
    # "linear": betas from beta_start to beta_end, both scaled by 1000/num_timesteps (DiT/ADM), so that any T
    # has the same total noise as T=1000. "squaredcos_cap_v2": the iDDPM cosine schedule (beta_start/end unused).
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    # learned_range: the model outputs 2C channels, the last C interpolate log-variance between the posterior
    # variance (-1) and beta_t (+1). fixed_small = posterior variance, fixed_large = beta_t (C channels).
    variance: str = "learned_range"
    # ADM/DiT add the per-timestep VB term unweighted to the per-timestep MSE. Since L_vlb = T * E_t[vb_t], this
    # equals lambda = 1/T = 0.001 on the summed L_vlb at T=1000, the iDDPM weighting.
    vlb_weight: float = 1.0


# ---------------------------------------------------------------------------------------------------------------
# Closed forms shared by training and the tests.


def get_beta_schedule(name: str, num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """float64 betas of length num_timesteps."""
    if name == "linear":
        scale = 1000 / num_timesteps
        return np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)
    if name == "squaredcos_cap_v2":
        # alpha_bar(t) = cos^2((t + s) / (1 + s) * pi / 2), s = 0.008; beta capped at 0.999 near t = 1.
        return _betas_from_alpha_bar(lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2, num_timesteps)
    if name == "sqrt":
        # Diffusion-LM's schedule for word embeddings: alpha_bar(t) = 1 - sqrt(t + 0.0001) (its betas_for_alpha_bar);
        # the noise rises fast at first, so that recovering a token is not trivially easy at small t.
        return _betas_from_alpha_bar(lambda t: 1 - math.sqrt(t + 0.0001), num_timesteps)
    raise ConfigError(f"unknown beta_schedule '{name}': use one of {', '.join(BETA_SCHEDULES)}")


def _betas_from_alpha_bar(alpha_bar, num_timesteps: int) -> np.ndarray:
    """beta_i = 1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), capped at 0.999 (iDDPM's betas_for_alpha_bar)."""
    steps = range(num_timesteps)
    betas = [min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), 0.999) for i in steps]
    return np.array(betas, dtype=np.float64)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """The tanh approximation of the standard normal CDF used by ADM (kept for bit-compatible losses)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log-probability of x (uint8 images rescaled to [-1, 1]) under a Gaussian discretized into 256 bins of
    width 2/255; the two edge bins take the tails, so the 256 probabilities sum to 1."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def respaced_timesteps(num_timesteps: int, steps: int, spacing: str = "dit") -> list[int]:
    """The `steps` timesteps (descending) a sampler visits.

    "dit" is ADM's `space_timesteps(T, "N")`: round(k * (T-1)/(N-1)), which keeps both t=0 and t=T-1 (what DiT's
    `--num-sampling-steps 250` does). "leading" (k * T//N: ADM's "ddimN" when N divides T), "linspace" and
    "trailing" follow the diffusers definitions."""
    if not 1 <= steps <= num_timesteps:
        raise ConfigError(f"steps={steps} is outside 1..{num_timesteps}: choose a step count the schedule has")
    if spacing == "dit":
        stride = (num_timesteps - 1) / (steps - 1) if steps > 1 else 1
        taken, cur = [], 0.0
        for _ in range(steps):  # accumulate like ADM so the rounding matches it exactly
            taken.append(round(cur))
            cur += stride
    elif spacing == "leading":
        taken = list(np.arange(steps) * (num_timesteps // steps))
    elif spacing == "linspace":
        taken = list(np.linspace(0, num_timesteps - 1, steps).round())
    elif spacing == "trailing":
        taken = list(np.round(np.arange(num_timesteps, 0, -num_timesteps / steps)) - 1)
    else:
        raise ConfigError(f"unknown timestep_spacing '{spacing}': use dit, leading, linspace or trailing")
    return sorted({int(t) for t in taken}, reverse=True)


# ---------------------------------------------------------------------------------------------------------------


@OBJECTIVES.register("ddpm", config=DDPMConfig, help="Gaussian diffusion, epsilon prediction, ADM/DiT hybrid loss")
class DDPM(Objective):
    """ADM/DiT Gaussian diffusion. Times are integer steps 0..T-1 (0 = least noise)."""

    name = "ddpm"
    solvers = ("ddpm", "ddim", "dpm-solver++", "unipc", "lcm")
    prediction_type = "epsilon"  # what the model outputs, in diffusers' words (a subclass may predict "sample")

    def __init__(self, cfg=None):
        cfg = DDPMConfig() if cfg is None else cfg
        self.num_timesteps = int(cfg_get(cfg, "num_timesteps", 1000))
        self.beta_schedule = str(cfg_get(cfg, "beta_schedule", "linear"))
        self.variance = str(cfg_get(cfg, "variance", "learned_range"))
        self.vlb_weight = float(cfg_get(cfg, "vlb_weight", 1.0))
        if self.num_timesteps < 2:
            raise ConfigError(f"objective.num_timesteps must be >= 2, got {self.num_timesteps}")
        if self.variance not in VARIANCES:
            raise ConfigError(f"unknown objective.variance '{self.variance}': use one of {', '.join(VARIANCES)}")
        beta_start, beta_end = float(cfg_get(cfg, "beta_start", 1e-4)), float(cfg_get(cfg, "beta_end", 0.02))
        betas = get_beta_schedule(self.beta_schedule, self.num_timesteps, beta_start, beta_end)
        if not ((betas > 0).all() and (betas < 1).all()):
            raise ConfigError("objective betas must lie in (0, 1): check beta_start/beta_end")
        self.betas_np = betas

        # float64 like ADM: 1 - alpha_bar near t=0 and sqrt(1/alpha_bar - 1) near t=T lose digits in float32.
        alphas = 1.0 - betas
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        arrays = {
            "betas": betas,
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": np.sqrt(ac),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
            "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1.0),
            "posterior_variance": post_var,
            # The posterior variance is 0 at t=0; the log is clipped to its t=1 value (ADM).
            "posterior_log_variance_clipped": np.log(np.append(post_var[1], post_var[1:])),
            "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
            "log_betas": np.log(betas),
        }
        for key, value in arrays.items():
            setattr(self, key, torch.from_numpy(value))

    # -- properties of the objective -----------------------------------------------------------------------------

    @property
    def learn_sigma(self) -> bool:
        return self.variance == "learned_range"

    def sample_time(self, n: int, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
        device = device if device is not None else (generator.device if generator is not None else "cpu")
        return torch.randint(0, self.num_timesteps, (n,), generator=generator, device=device)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        return t.float()

    def scheduler_timestep_to_model_time(self, timestep) -> torch.Tensor:
        # Our schedulers use the training timesteps 0..T-1 directly (no ADM `rescale_timesteps`, as in DiT).
        return torch.as_tensor(timestep).float()

    # -- forward process --------------------------------------------------------------------------------------------

    def _extract(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Schedule array `name` at integer times t, shaped to broadcast against x, in x's dtype."""
        arr = getattr(self, name).to(t.device)[t.long()]
        return broadcast_to(arr, x)

    def q_mean_variance(self, x0, t):
        """Mean, variance and log-variance of q(x_t | x_0)."""
        mean = self._extract("sqrt_alphas_cumprod", t, x0) * x0
        variance = self._extract("sqrt_one_minus_alphas_cumprod", t, x0) ** 2
        return mean, variance, self._extract("log_one_minus_alphas_cumprod", t, x0)

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise."""
        sqrt_ab = self._extract("sqrt_alphas_cumprod", t, x0)
        return sqrt_ab * x0 + self._extract("sqrt_one_minus_alphas_cumprod", t, x0) * noise

    def q_posterior_mean_variance(self, x0, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._extract("posterior_mean_coef1", t, x_t) * x0 + self._extract("posterior_mean_coef2", t, x_t) * x_t
        variance = self._extract("posterior_variance", t, x_t)
        return mean, variance, self._extract("posterior_log_variance_clipped", t, x_t)

    def predict_xstart_from_eps(self, x_t, t, eps):
        recip = self._extract("sqrt_recip_alphas_cumprod", t, x_t)
        return recip * x_t - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps

    # -- reverse process ----------------------------------------------------------------------------------------------

    def p_mean_variance(self, model_output, x_t, t, clip_denoised: bool = False) -> dict:
        """p(x_{t-1} | x_t) from a model output (eps, plus the variance channels when learn_sigma)."""
        C = x_t.shape[1]
        if self.learn_sigma:
            if model_output.shape[1] != 2 * C:
                raise ValueError(f"learned variance needs {2 * C} output channels, got {model_output.shape[1]}")
            eps, var_values = model_output[:, :C], model_output[:, C:]
            min_log = self._extract("posterior_log_variance_clipped", t, x_t)
            max_log = self._extract("log_betas", t, x_t)
            frac = (var_values + 1) / 2  # the model's [-1, 1] output -> interpolation weight in [0, 1]
            log_variance = frac * max_log + (1 - frac) * min_log
        else:
            eps = model_output[:, :C]
            if self.variance == "fixed_small":
                log_variance = self._extract("posterior_log_variance_clipped", t, x_t)
            else:
                # fixed_large: beta_t, except the posterior variance at t=0 so the decoder stays sharp (ADM).
                large = torch.cat([self.posterior_variance[1:2], self.betas[1:]]).log()
                log_variance = broadcast_to(large.to(t.device)[t.long()], x_t)
        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        variance = torch.exp(log_variance)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def vb_terms_bpd(self, model_output, x0, x_t, t) -> torch.Tensor:
        """Per-sample VB term in bits per dimension: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0 and the
        discretized-Gaussian decoder NLL of x_0 at t = 0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, means=out["mean"], log_scales=0.5 * out["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t.to(kl.device) == 0, nll, kl)

    def training_losses(self, model, x0, t, noise, model_kwargs=None) -> dict:
        """{"loss", "mse", "vb"}, each (N,). loss = mse + vlb_weight * vb when the variance is learned; with a fixed
        variance the VB has no gradient, so it is reported but not added (ADM's plain MSE loss)."""
        model_kwargs = model_kwargs or {}
        x_t = self.q_sample(x0, t, noise)
        out = model(x_t, self.model_time(t), **model_kwargs)
        C = x0.shape[1]
        expected = 2 * C if self.learn_sigma else C
        if out.shape[1] != expected:
            raise ValueError(
                f"objective variance '{self.variance}' needs {expected} model output channels, got {out.shape[1]}: "
                f"set model.learn_sigma to {self.learn_sigma}"
            )
        eps = out[:, :C]
        mse = mean_flat((noise - eps) ** 2)
        # The VB trains only the variance: the mean is detached ("frozen_out" in ADM), so the MSE alone trains eps.
        frozen = torch.cat([eps.detach(), out[:, C:]], dim=1)
        if self.learn_sigma:
            vb = self.vb_terms_bpd(frozen, x0, x_t, t)
            loss = mse + self.vlb_weight * vb
        else:
            with torch.no_grad():
                vb = self.vb_terms_bpd(frozen, x0, x_t, t)
            loss = mse
        return {"loss": loss, "mse": mse, "vb": vb}

    # -- sampling -----------------------------------------------------------------------------------------------------

    def _make_scheduler(self, solver: str, steps: int, device, options: dict):
        from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

        # The same float64 betas as training (diffusers keeps them in float32).
        common = dict(
            num_train_timesteps=self.num_timesteps, trained_betas=self.betas_np.tolist(),
            prediction_type=self.prediction_type,
        )
        if solver == "ddpm":
            # DiT's respacing keeps round(k (T-1)/(N-1)), strides of 4 and 5 for N=250 (diffusers "linspace" gives
            # the same set). Older diffusers releases stepped DDPMScheduler back by the constant T//N, which is
            # wrong for such uneven strides, so we pass the list as custom timesteps: the previous timestep is then
            # the next in the list and beta_t = 1 - alpha_bar_t / alpha_bar_prev, exactly ADM's respaced process.
            spacing = options.pop("timestep_spacing", "dit")
            # Our variance names are DDPMScheduler's variance_type names. A learned-variance model may also be
            # sampled with a fixed variance; a fixed-variance model has no variance channels to learn from.
            variance_type = options.pop("variance_type", self.variance)
            allowed = VARIANCES if self.learn_sigma else ("fixed_small", "fixed_large")
            if variance_type not in allowed:
                raise ConfigError(f"variance_type '{variance_type}' is not available here: use one of {', '.join(allowed)}")
            scheduler = build_scheduler(
                DDPMScheduler, options, **common, variance_type=variance_type, clip_sample=False
            )
            scheduler.set_timesteps(timesteps=respaced_timesteps(self.num_timesteps, steps, spacing), device=device)
            return self._float64_schedule(scheduler)
        if solver == "ddim":
            # DiT's "ddimN" respacing is range(0, T, T//N): diffusers "leading" with steps_offset 0, and the final
            # step goes to alpha_bar = 1 (set_alpha_to_one). DDIMScheduler steps back by the constant T//N, so only
            # the constant-stride spacings are correct with it.
            spacing = options.get("timestep_spacing", "leading")
            if spacing not in ("leading", "trailing"):
                raise ConfigError(f"ddim needs timestep_spacing leading or trailing, got '{spacing}': use one of them")
            scheduler = build_scheduler(
                DDIMScheduler, options, **common,
                clip_sample=False, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading",
            )
        elif solver == "lcm":
            # Multistep consistency sampling of a consistency-distilled student (ditk.distill.consistency): x̂0 with
            # LCM's c_skip / c_out, re-noised to the next of the LCM timesteps (999, 759, 499, 259 at 4 steps of the
            # original_inference_steps = 50 grid the student was distilled on).
            from diffusers import LCMScheduler

            custom = options.pop("timesteps", None)  # a generator's own stages (DMD2's 1-step t = 399, ...)
            scheduler = build_scheduler(LCMScheduler, options, **common, clip_sample=False)
            if custom:
                custom = [int(t) for t in custom]
                if len(custom) != steps:
                    raise ConfigError(f"solver_options.timesteps {custom} has {len(custom)} entries but steps={steps}: "
                                      f"sample with --steps {len(custom)}")
                if custom != sorted(set(custom), reverse=True) or not 0 <= custom[-1] <= custom[0] < self.num_timesteps:
                    raise ConfigError(f"solver_options.timesteps must decrease within 0..{self.num_timesteps - 1}, "
                                      f"got {custom}")
                from diffusers.utils import logging as diffusers_logging

                level = diffusers_logging.get_verbosity()  # its warning that 399 is not LCM's 999 is the point here
                diffusers_logging.set_verbosity_error()
                try:
                    scheduler.set_timesteps(timesteps=custom, device=device)
                finally:
                    diffusers_logging.set_verbosity(level)
                return scheduler
        elif solver == "dpm-solver++":
            # DPM-Solver++(2M); it reads the previous sigma from its own table, so any spacing is exact.
            scheduler = build_scheduler(
                DPMSolverMultistepScheduler, options, **common, algorithm_type="dpmsolver++", solver_order=2
            )
        else:  # unipc
            scheduler = build_scheduler(UniPCMultistepScheduler, options, **common)
        scheduler.set_timesteps(steps, device=device)
        return self._float64_schedule(scheduler) if solver == "ddim" else scheduler

    def _float64_schedule(self, scheduler):
        """Give a DDPM/DDIM scheduler our float64 alpha_bar (diffusers keeps float32). Its per-step coefficients
        (beta_t = 1 - alpha_bar_t / alpha_bar_prev, the posterior mean coefficients and variance) are then computed
        in float64 and meet the float32 sample as scalars, exactly as the official loop's `_extract_into_tensor`
        does: in float32, 1 - a/b loses ~1e-7/beta_t relative, a 5e-6 drift over a 50-step chain."""
        scheduler.alphas_cumprod = self.alphas_cumprod.clone()
        scheduler.betas = self.betas.clone()
        scheduler.alphas = 1.0 - scheduler.betas
        scheduler.one = torch.tensor(1.0, dtype=torch.float64)
        if hasattr(scheduler, "final_alpha_cumprod"):  # DDIM's alpha_bar after the last step (set_alpha_to_one)
            scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
        return scheduler
