"""The sampler against closed forms: Gaussian data has an analytic denoiser, and every solver then reduces to an
affine map of the noise whose moments we can compute in float64."""

import math

import pytest
import torch

from ditk.errors import ConfigError
from ditk.objectives.ddpm import DDPM, DDPMConfig, respaced_timesteps
from ditk.objectives.flow import FlowConfig, RectifiedFlow, shift_time
from ditk.registry import SOLVERS
from ditk.sampling import guide, sample

MU, SIGMA = 0.5, 0.3  # data ~ N(MU, SIGMA^2) per dimension
N = 20_000  # scalars per run: (N, 1, 1, 1)


class GaussianEps(torch.nn.Module):
    """E[eps | x_t] for Gaussian data: sqrt(1-ab)(x_t - sqrt(ab) mu) / (ab sigma^2 + 1 - ab). Ignores labels.
    With learned variance it appends a constant variance channel `v` (-1: posterior variance, +1: beta_t)."""

    def __init__(self, objective, v=None):
        super().__init__()
        self.alphas_cumprod = objective.alphas_cumprod  # model time = integer step -> alpha_bar
        self.v = v

    def forward(self, x, t, y=None):
        a = self.alphas_cumprod[t.round().long()].to(x.dtype).view(-1, 1, 1, 1)
        eps = (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * SIGMA**2 + 1 - a)
        return eps if self.v is None else torch.cat([eps, torch.full_like(eps, self.v)], 1)


class GaussianVelocity(torch.nn.Module):
    """E[eps - x0 | z_t] for z_t = (1-t) x0 + t eps and Gaussian x0; t is recovered from the model time."""

    def __init__(self, time_scale):
        super().__init__()
        self.time_scale = time_scale

    def forward(self, x, t, y=None):
        t = (t / self.time_scale).to(x.dtype).view(-1, 1, 1, 1)
        k = (t - (1 - t) * SIGMA**2) / ((1 - t) ** 2 * SIGMA**2 + t**2)
        return -MU + k * (x - (1 - t) * MU)


def standard_noise(seed=0):
    """Noise with exactly zero mean and unit std, so deterministic solvers' output moments are exact."""
    z = torch.randn(N, 1, 1, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return ((z - z.mean()) / z.std()).float()


def ddpm_chain_moments(alphas_cumprod, timesteps, kind):
    """Mean and std of the respaced ADM chain started from N(0, 1), in float64. kind: "small" / "large" (ancestral
    with posterior variance / beta_t) or "ddim" (eta = 0). The eps model is affine, so every step is affine."""
    ac = alphas_cumprod.double().tolist()
    m, var = 0.0, 1.0
    for i, t in enumerate(timesteps):
        a, a_prev = ac[t], (ac[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0)
        beta = 1 - a / a_prev
        c = math.sqrt(1 - a) / (a * SIGMA**2 + 1 - a)  # eps = c (x - sqrt(a) mu)
        p, q = (1 - math.sqrt(1 - a) * c) / math.sqrt(a), math.sqrt(1 - a) * c * MU  # x0_hat = p x + q
        if kind == "ddim":
            L = math.sqrt(a_prev) * p + math.sqrt(1 - a_prev) * c
            K = math.sqrt(a_prev) * q - math.sqrt(1 - a_prev) * c * math.sqrt(a) * MU
            noise_var = 0.0
        else:
            c1, c2 = math.sqrt(a_prev) * beta / (1 - a), math.sqrt(1 - beta) * (1 - a_prev) / (1 - a)
            L, K = c1 * p + c2, c1 * q
            last = i == len(timesteps) - 1
            noise_var = 0.0 if last else ((1 - a_prev) / (1 - a) * beta if kind == "small" else beta)
        m, var = L * m + K, L * L * var + noise_var
    return m, math.sqrt(var)


@pytest.fixture(scope="module")
def ddpm():
    return DDPM(DDPMConfig())


def test_registered_solvers():
    assert set(SOLVERS.names()) == {"ddpm", "ddim", "dpm-solver++", "unipc", "euler", "heun", "lcm"}


@pytest.mark.parametrize("v,kind", [(-1.0, "small"), (1.0, "large")])
def test_ddpm_learned_range_matches_the_exact_chain(ddpm, v, kind):
    steps = 100
    x = sample(GaussianEps(ddpm, v=v), ddpm, standard_noise(), {}, solver="ddpm", steps=steps,
               generator=torch.Generator().manual_seed(1))
    m, s = ddpm_chain_moments(ddpm.alphas_cumprod, respaced_timesteps(1000, steps), kind)
    # Sampling error with N=20000: std(mean) ~ 0.002, std(std) ~ 0.0015.
    assert x.mean().item() == pytest.approx(m, abs=0.008)
    assert x.std().item() == pytest.approx(s, abs=0.006)


def test_learned_variance_channel_changes_the_spread(ddpm):
    steps = 50
    spread = {}
    for v in (-1.0, 1.0):
        x = sample(GaussianEps(ddpm, v=v), ddpm, standard_noise(), {}, solver="ddpm", steps=steps,
                   generator=torch.Generator().manual_seed(2))
        spread[v] = x.std().item()
    small = ddpm_chain_moments(ddpm.alphas_cumprod, respaced_timesteps(1000, steps), "small")[1]
    large = ddpm_chain_moments(ddpm.alphas_cumprod, respaced_timesteps(1000, steps), "large")[1]
    assert large - small > 0.05  # the two variances are far apart at 50 steps ...
    assert spread[-1.0] == pytest.approx(small, abs=0.006)  # ... and the sampler follows the channel
    assert spread[1.0] == pytest.approx(large, abs=0.006)


def test_learned_minus_one_equals_fixed_small(ddpm):
    # The same generator draws the same noise, so variance channel -1 must reproduce a fixed_small model.
    fixed = DDPM(DDPMConfig(variance="fixed_small"))
    noise = standard_noise()[:2000]
    a = sample(GaussianEps(ddpm, v=-1.0), ddpm, noise, {}, solver="ddpm", steps=30, generator=torch.Generator().manual_seed(3))
    b = sample(GaussianEps(fixed), fixed, noise, {}, solver="ddpm", steps=30, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_learned_model_sampled_with_a_fixed_variance(ddpm):
    # variance_type fixed_small makes DDPMScheduler ignore the variance channels, which the sampler then drops.
    noise = standard_noise()[:2000]
    a = sample(GaussianEps(ddpm, v=1.0), ddpm, noise, {}, solver="ddpm", steps=30,
               generator=torch.Generator().manual_seed(3), solver_options={"variance_type": "fixed_small"})
    b = sample(GaussianEps(ddpm, v=-1.0), ddpm, noise, {}, solver="ddpm", steps=30,
               generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_ddim_matches_the_exact_chain(ddpm):
    for steps in (20, 100):
        x = sample(GaussianEps(ddpm, v=0.0), ddpm, standard_noise(), {}, solver="ddim", steps=steps)
        m, s = ddpm_chain_moments(ddpm.alphas_cumprod, respaced_timesteps(1000, steps, "leading"), "ddim")
        assert x.mean().item() == pytest.approx(m, abs=1e-4)
        assert x.std().item() == pytest.approx(s, abs=1e-4)


def test_the_discrete_chains_converge_to_the_data():
    # The oracle itself: with all 1000 steps the chains reproduce N(mu, sigma^2).
    obj = DDPM(DDPMConfig())
    for kind in ("small", "large", "ddim"):
        m, s = ddpm_chain_moments(obj.alphas_cumprod, list(range(999, -1, -1)), kind)
        assert m == pytest.approx(MU, abs=2e-3) and s == pytest.approx(SIGMA, abs=6e-3)


@pytest.mark.parametrize("solver", ["dpm-solver++", "unipc"])
def test_multistep_solvers_converge_on_ddpm(ddpm, solver):
    x = sample(GaussianEps(ddpm, v=0.0), ddpm, standard_noise(), {}, solver=solver, steps=100)
    assert x.mean().item() == pytest.approx(MU, abs=0.002)
    assert x.std().item() == pytest.approx(SIGMA, abs=0.005)
    coarse = sample(GaussianEps(ddpm, v=0.0), ddpm, standard_noise(), {}, solver=solver, steps=10)
    assert abs(coarse.std().item() - SIGMA) > abs(x.std().item() - SIGMA)  # error shrinks with steps


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_euler_matches_the_exact_chain(shift):
    flow = RectifiedFlow(FlowConfig(time_scale=1.0, shift=shift))
    steps = 25
    x = sample(GaussianVelocity(1.0), flow, standard_noise(), {}, solver="euler", steps=steps)
    sigmas = shift_time(torch.linspace(1, 0, steps + 1, dtype=torch.float64), shift).tolist()
    m, var = 0.0, 1.0
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):  # z <- z + (s_next - s) v(z, s), v affine in z
        k = (s - (1 - s) * SIGMA**2) / ((1 - s) ** 2 * SIGMA**2 + s**2)
        L, K = 1 + (s_next - s) * k, (s_next - s) * (-MU - k * (1 - s) * MU)
        m, var = L * m + K, L * L * var
    assert x.mean().item() == pytest.approx(m, abs=1e-4)
    assert x.std().item() == pytest.approx(math.sqrt(var), abs=1e-4)


@pytest.mark.parametrize("solver,steps", [("euler", 200), ("heun", 25), ("dpm-solver++", 50), ("unipc", 50)])
@pytest.mark.parametrize("time_scale", [1000.0, 1.0])
def test_flow_solvers_converge(solver, steps, time_scale):
    flow = RectifiedFlow(FlowConfig(time_scale=time_scale))
    x = sample(GaussianVelocity(time_scale), flow, standard_noise(), {}, solver=solver, steps=steps)
    assert x.mean().item() == pytest.approx(MU, abs=0.002)
    assert x.std().item() == pytest.approx(SIGMA, abs=0.004)


# ---------------------------------------------------------------------------------------------------------------
# Classifier-free guidance


class LabelModel(torch.nn.Module):
    """Velocity 1 for real labels and 0 for the null label (num_classes), in every channel; records batch sizes."""

    def __init__(self, num_classes=10, out_channels=4):
        super().__init__()
        self.num_classes, self.out_channels, self.calls = num_classes, out_channels, []

    def forward(self, x, t, y):
        self.calls.append((x.shape[0], t.shape[0], y.tolist()))
        value = (y != self.num_classes).to(x.dtype).view(-1, 1, 1, 1)
        return value.expand(x.shape[0], self.out_channels, *x.shape[2:]).clone()


@pytest.mark.parametrize("cfg_channels,guided", [(3, 3), (None, 4)])
def test_cfg_guides_the_requested_channels(cfg_channels, guided):
    # One Euler step from sigma 1 to 0 returns noise - v, so the result shows the guided velocity exactly.
    flow = RectifiedFlow(FlowConfig())
    noise = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(4))
    model = LabelModel()
    s = 4.0
    x = sample(model, flow, noise, {"y": torch.tensor([1, 2])}, {"y": torch.tensor([10, 10])},
               solver="euler", steps=1, cfg_scale=s, cfg_channels=cfg_channels)
    v = torch.ones(2, 4, 3, 3)
    v[:, :guided] = 0 + s * (1 - 0)  # uncond + s (cond - uncond)
    torch.testing.assert_close(x, noise - v)
    assert model.calls == [(4, 4, [1, 2, 10, 10])]  # one forward on the [cond; uncond] batch


def test_cfg_scale_one_runs_the_plain_batch():
    flow = RectifiedFlow(FlowConfig())
    noise = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(5))
    model = LabelModel()
    x = sample(model, flow, noise, {"y": torch.tensor([0, 1, 2])}, {"y": torch.full((3,), 10)}, solver="euler", steps=2)
    assert model.calls == [(3, 3, [0, 1, 2])] * 2
    torch.testing.assert_close(x, noise - 1)


def test_guide_keeps_variance_channels_from_the_cond_half():
    cond = torch.arange(8.0).view(1, 8, 1, 1)  # 4 eps + 4 variance channels
    uncond = -cond
    out = guide(torch.cat([cond, uncond]), 1.5, None, channels=4)
    torch.testing.assert_close(out[:, :4], uncond[:, :4] + 1.5 * (cond[:, :4] - uncond[:, :4]))
    torch.testing.assert_close(out[:, 4:], cond[:, 4:])
    with pytest.raises(ConfigError):
        guide(torch.cat([cond, uncond]), 1.5, 5, channels=4)


def test_ddpm_with_cfg_runs_learned_sigma_model(ddpm):
    class Model(torch.nn.Module):
        def forward(self, x, t, y):
            eps = GaussianEps(ddpm, v=-1.0)(x, t)
            return eps + (y == 10).to(x.dtype).view(-1, 1, 1, 1) * torch.cat([torch.ones_like(x), torch.zeros_like(x)], 1)

    noise = standard_noise()[:1000]
    y, null = torch.zeros(1000, dtype=torch.long), torch.full((1000,), 10)
    guided = sample(Model(), ddpm, noise, {"y": y}, {"y": null}, solver="ddpm", steps=20, cfg_scale=1.0,
                    generator=torch.Generator().manual_seed(6))
    plain = sample(GaussianEps(ddpm, v=-1.0), ddpm, noise, {}, solver="ddpm", steps=20, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(guided, plain)  # cfg 1 = the cond model
    pushed = sample(Model(), ddpm, noise, {"y": y}, {"y": null}, solver="ddpm", steps=20, cfg_scale=2.0,
                    generator=torch.Generator().manual_seed(6))
    # Guidance moves eps by -(s-1) * 1 each step, i.e. pushes x0 up: the mean rises.
    assert pushed.mean().item() > plain.mean().item() + 0.1


# ---------------------------------------------------------------------------------------------------------------
# Determinism, options, errors, progress


def test_same_generator_same_samples(ddpm):
    noise = standard_noise()[:500]
    run = lambda seed: sample(GaussianEps(ddpm, v=0.0), ddpm, noise, {}, solver="ddpm", steps=20,  # noqa: E731
                              generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_per_sample_generators_make_samples_batch_independent(ddpm):
    noise = standard_noise()[:3]
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(3)]  # noqa: E731
    three = sample(GaussianEps(ddpm, v=0.0), ddpm, noise, {}, solver="ddpm", steps=10, generator=gens())
    two = sample(GaussianEps(ddpm, v=0.0), ddpm, noise[:2], {}, solver="ddpm", steps=10, generator=gens()[:2])
    torch.testing.assert_close(two, three[:2])


def test_ddim_eta_is_a_step_option(ddpm):
    noise = standard_noise()[:500]
    run = lambda seed, **o: sample(GaussianEps(ddpm, v=0.0), ddpm, noise, {}, solver="ddim", steps=10,  # noqa: E731
                                   generator=torch.Generator().manual_seed(seed), solver_options=o)
    assert torch.equal(run(1), run(2))  # eta 0: deterministic
    assert not torch.equal(run(1, eta=1.0), run(2, eta=1.0))
    assert torch.equal(run(1, eta=1.0), run(1, eta=1.0))


def test_errors(ddpm):
    noise = torch.randn(2, 1, 1, 1)
    model = GaussianEps(ddpm, v=0.0)
    with pytest.raises(ConfigError, match="euler"):
        sample(model, ddpm, noise, {}, solver="euler", steps=2)
    with pytest.raises(ConfigError):
        sample(model, ddpm, noise, {}, solver="rk45", steps=2)
    with pytest.raises(ConfigError, match="uncond"):
        sample(model, ddpm, noise, {"y": torch.zeros(2)}, None, solver="ddim", steps=2, cfg_scale=2.0)
    with pytest.raises(ConfigError):
        sample(model, ddpm, noise, {}, solver="ddim", steps=2, solver_options={"bogus": 1})
    with pytest.raises(ValueError):  # learned variance needs the 2C output
        sample(GaussianEps(ddpm), ddpm, noise, {}, solver="ddpm", steps=2)


def test_progress_bar_on_stderr(ddpm, capsys):
    sample(GaussianEps(ddpm, v=0.0), ddpm, torch.randn(4, 1, 1, 1), {}, solver="ddim", steps=5, progress=True)
    captured = capsys.readouterr()
    assert "ddim" in captured.err and captured.out == ""
    sample(GaussianEps(ddpm, v=0.0), ddpm, torch.randn(4, 1, 1, 1), {}, solver="ddim", steps=5)
    assert capsys.readouterr().err == ""
