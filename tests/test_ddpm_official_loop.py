"""ditk's DDPM/DDIM sampling against the official loop (openai/improved-diffusion `gaussian_diffusion.py`, which
DiT ships): schedule arrays in float64, each coefficient cast to the sample's float32 at the step, then float32
arithmetic. The reference below is that loop, written out for a respaced chain (ADM's `SpacedDiffusion`
recomputes betas from alpha_bar at the kept timesteps). ditk must equal it to float32 round-off."""

import numpy as np
import pytest
import torch

from ditk.objectives.ddpm import DDPM, DDPMConfig, respaced_timesteps
from ditk.sampling import sample


class FixedModel(torch.nn.Module):
    """A deterministic, nonlinear eps (+ variance channels) model of the time."""

    def __init__(self, channels, learn_sigma):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(2 * channels if learn_sigma else channels, channels, generator=g) / channels**0.5

    def forward(self, x, t, y=None):
        h = torch.einsum("oc,nchw->nohw", self.w, x)
        return torch.tanh(h + 1e-3 * t.view(-1, 1, 1, 1))


def adm_spaced_arrays(alphas_cumprod: np.ndarray, kept: list[int]) -> dict:
    """SpacedDiffusion: betas of the respaced chain, then GaussianDiffusion's float64 arrays."""
    ac, last, betas = alphas_cumprod, 1.0, []
    for t in sorted(kept):
        betas.append(1 - ac[t] / last)
        last = ac[t]
    betas = np.array(betas, dtype=np.float64)
    ac = np.cumprod(1.0 - betas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    return {
        "sqrt_recip_ac": np.sqrt(1.0 / ac), "sqrt_recipm1_ac": np.sqrt(1.0 / ac - 1.0), "ac_prev": ac_prev,
        "log_var_clipped": np.log(np.append(post_var[1], post_var[1:])), "log_betas": np.log(betas),
        "coef1": betas * np.sqrt(ac_prev) / (1.0 - ac), "coef2": (1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac),
    }


def adm_loop(model, noise, kept, arrays, kind, generator):
    """p_sample_loop (kind "ddpm", learned_range variance) or ddim_sample_loop (eta 0), as the official code:
    `_extract_into_tensor` casts arr[t] to float32 before any arithmetic with x."""
    x = noise.clone()
    C = x.shape[1]
    f = lambda name, k: torch.tensor(arrays[name][k]).float()  # noqa: E731
    for k in reversed(range(len(kept))):
        t_model = torch.full((x.shape[0],), float(sorted(kept)[k]))  # the model sees the original timestep
        out = model(x, t_model)
        eps = out[:, :C]
        x0 = f("sqrt_recip_ac", k) * x - f("sqrt_recipm1_ac", k) * eps
        if kind == "ddim":
            eps = (f("sqrt_recip_ac", k) * x - x0) / f("sqrt_recipm1_ac", k)
            x = x0 * torch.tensor(np.sqrt(arrays["ac_prev"][k])).float() \
                + torch.tensor(np.sqrt(1 - arrays["ac_prev"][k])).float() * eps
            continue
        min_log, max_log = f("log_var_clipped", k), f("log_betas", k)
        frac = (out[:, C:] + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        mean = f("coef1", k) * x0 + f("coef2", k) * x
        if k > 0:
            x = mean + torch.exp(0.5 * log_variance) * torch.randn(x.shape, generator=generator)
        else:
            x = mean
    return x


@pytest.mark.parametrize("kind,steps", [("ddpm", 50), ("ddpm", 250), ("ddim", 50)])
def test_ddpm_and_ddim_sampling_equal_the_official_loop(kind, steps):
    objective = DDPM(DDPMConfig())
    T = objective.num_timesteps
    kept = respaced_timesteps(T, steps, "dit" if kind == "ddpm" else "leading")
    arrays = adm_spaced_arrays(objective.alphas_cumprod.numpy(), kept)
    model = FixedModel(3, learn_sigma=True)
    noise = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    ours = sample(model, objective, noise, {}, solver=kind, steps=steps, generator=torch.Generator().manual_seed(2))
    ref = adm_loop(model, noise, kept, arrays, kind, torch.Generator().manual_seed(2))
    rel = ((ours - ref).norm() / ref.norm()).item()
    assert rel <= 1e-6, f"{kind}{steps}: relative distance {rel:.2e} from the official loop"
