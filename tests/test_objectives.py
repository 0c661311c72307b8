"""Objectives against closed forms: the ADM/DiT Gaussian diffusion and rectified flow."""

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ditk.errors import ConfigError
from ditk.objectives.ddpm import (
    DDPM,
    DDPMConfig,
    discretized_gaussian_log_likelihood,
    normal_kl,
    respaced_timesteps,
)
from ditk.objectives.flow import FlowConfig, RectifiedFlow, shift_time
from ditk.registry import OBJECTIVES

T = 1000


def alpha_bar_reference(num_timesteps=T):
    """float64 alpha_bar of DiT's linear schedule, built independently of ditk."""
    scale = 1000 / num_timesteps
    betas = np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    return betas, np.cumprod(1.0 - betas)


@pytest.fixture(scope="module")
def ddpm():
    return OBJECTIVES.build("ddpm", DDPMConfig())


# ---------------------------------------------------------------------------------------------------------------
# DDPM


def test_build_from_dataclass_and_structured_omegaconf():
    a = OBJECTIVES.build("ddpm", DDPMConfig(num_timesteps=250))
    b = OBJECTIVES.build("ddpm", OmegaConf.structured(DDPMConfig(num_timesteps=250)))
    assert torch.equal(a.betas, b.betas)
    betas, _ = alpha_bar_reference(250)  # 1000/T scaling: same total noise as T=1000
    np.testing.assert_allclose(a.betas.numpy(), betas, rtol=0, atol=0)
    assert a.learn_sigma and a.model_time(torch.tensor([3])).dtype == torch.float32
    with pytest.raises(ConfigError):
        DDPM(DDPMConfig(variance="learned"))
    with pytest.raises(ConfigError):
        DDPM(DDPMConfig(beta_schedule="quadratic"))


def test_cosine_schedule_matches_iddpm_formula():
    obj = DDPM(DDPMConfig(beta_schedule="squaredcos_cap_v2"))
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    ac = obj.alphas_cumprod.numpy()
    # Away from the 0.999 cap, the cumulative product telescopes to f(t)/f(0).
    for t in (0, 100, 500, 900):
        assert ac[t] == pytest.approx(f((t + 1) / T) / f(0), rel=1e-9)
    assert obj.betas.max().item() == pytest.approx(0.999)


def test_q_sample_and_q_mean_variance_closed_form(ddpm):
    _, ac = alpha_bar_reference()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    a = torch.from_numpy(ac[t.numpy()]).view(-1, 1, 1, 1)
    torch.testing.assert_close(ddpm.q_sample(x0, t, noise), a.sqrt() * x0 + (1 - a).sqrt() * noise, rtol=1e-12, atol=1e-12)
    mean, var, logvar = ddpm.q_mean_variance(x0, t)
    torch.testing.assert_close(mean, a.sqrt() * x0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var.expand_as(x0), (1 - a).expand_as(x0), rtol=1e-12, atol=0)
    torch.testing.assert_close(logvar.exp().expand_as(x0), (1 - a).expand_as(x0), rtol=1e-12, atol=0)
    # Statistically too: many draws at t=300 have the closed-form moments.
    n = 200_000
    x = ddpm.q_sample(torch.full((n, 1, 1, 1), 0.7), torch.full((n,), 300), torch.randn(n, 1, 1, 1, generator=g))
    assert x.mean().item() == pytest.approx(math.sqrt(ac[300]) * 0.7, abs=0.01)
    assert x.var().item() == pytest.approx(1 - ac[300], rel=0.02)


def test_posterior_mean_variance_by_gaussian_conditioning(ddpm):
    # q(x_{t-1}|x_t,x0) ∝ N(x_t; sqrt(a_t) x_{t-1}, b_t) N(x_{t-1}; sqrt(ab_{t-1}) x0, 1-ab_{t-1}): precision-weighted.
    betas, ac = alpha_bar_reference()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    x_t = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 2, 50, 700, 999])
    b = torch.from_numpy(betas[t.numpy()]).view(-1, 1, 1, 1)
    abp = torch.from_numpy(ac[t.numpy() - 1]).view(-1, 1, 1, 1)
    precision = 1 / (1 - abp) + (1 - b) / b
    var = 1 / precision
    mean = var * (abp.sqrt() * x0 / (1 - abp) + (1 - b).sqrt() * x_t / b)
    m, v, logv = ddpm.q_posterior_mean_variance(x0, x_t, t)
    torch.testing.assert_close(m, mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(v.expand_as(x0), var.expand_as(x0), rtol=1e-10, atol=0)
    torch.testing.assert_close(logv.expand_as(x0), var.log().expand_as(x0), rtol=1e-10, atol=0)
    # At t=0 the posterior is a point mass at x0; the log-variance is clipped to the t=1 value.
    m0, v0, logv0 = ddpm.q_posterior_mean_variance(x0, x_t, torch.zeros(5, dtype=torch.long))
    torch.testing.assert_close(m0, x0, rtol=0, atol=1e-12)
    assert v0.abs().max() == 0
    assert logv0.flatten()[0].item() == pytest.approx(math.log(betas[1] * (1 - ac[0]) / (1 - ac[1])), rel=1e-12)


def test_normal_kl_matches_closed_form_and_torch_distributions():
    m1, s1, m2, s2 = 0.3, 0.5, -0.2, 1.7
    closed = math.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    kl = normal_kl(t(m1), t(2 * math.log(s1)), t(m2), t(2 * math.log(s2)))
    assert kl.item() == pytest.approx(closed, rel=1e-12)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(t(m1), t(s1)), torch.distributions.Normal(t(m2), t(s2)))
    assert kl.item() == pytest.approx(ref.item(), rel=1e-12)
    assert normal_kl(t(m1), t(0.1), t(m1), t(0.1)).item() == 0.0


@pytest.mark.parametrize("mean,log_scale", [(0.0, math.log(0.1)), (0.9, math.log(0.02)), (-0.4, math.log(1.5)), (0.123, math.log(0.004))])
def test_discretized_gaussian_sums_to_one_over_256_bins(mean, log_scale):
    bins = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0  # uint8 levels mapped to [-1, 1]
    logp = discretized_gaussian_log_likelihood(bins, torch.full_like(bins, mean), torch.full_like(bins, log_scale))
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-6)
    # An interior bin is the CDF difference over its width (ADM's tanh CDF is accurate to ~1e-3).
    k = 128
    normal = torch.distributions.Normal(torch.tensor(mean, dtype=torch.float64), math.exp(log_scale))
    exact = normal.cdf(bins[k] + 1 / 255) - normal.cdf(bins[k] - 1 / 255)
    assert logp[k].exp().item() == pytest.approx(exact.item(), abs=2e-3)


def test_vb_is_zero_for_the_true_posterior(ddpm):
    g = torch.Generator().manual_seed(2)
    n = 64
    x0 = torch.rand(n, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.randint(1, T, (n,), generator=g)
    x_t = ddpm.q_sample(x0, t, noise)
    # eps = the true noise recovers x0 exactly; variance channel -1 selects the posterior variance (frac = 0).
    true_out = torch.cat([noise, -torch.ones_like(noise)], dim=1)
    vb = ddpm.vb_terms_bpd(true_out, x0, x_t, t)
    assert vb.shape == (n,)
    assert vb.abs().max().item() < 1e-9
    # Float32 too (the training dtype), with float32 round-off.
    vb32 = ddpm.vb_terms_bpd(true_out.float(), x0.float(), x_t.float(), t)
    assert vb32.abs().max().item() < 1e-3
    # A wrong variance (beta_t, frac = 1) costs exactly the Gaussian KL of the variance mismatch, in bits.
    post, beta = ddpm.posterior_variance[t], ddpm.betas[t]
    expected = 0.5 * (-1 + torch.log(beta / post) + post / beta) / math.log(2)
    torch.testing.assert_close(ddpm.vb_terms_bpd(torch.cat([noise, torch.ones_like(noise)], 1), x0, x_t, t), expected)
    assert expected.min() > 0
    # And a wrong mean costs bits too.
    assert (ddpm.vb_terms_bpd(torch.cat([noise + 0.1, -torch.ones_like(noise)], 1), x0, x_t, t) > 1e-6).all()


def test_vb_at_t0_is_the_decoder_nll(ddpm):
    g = torch.Generator().manual_seed(3)
    x0 = (torch.randint(0, 256, (4, 3, 2, 2), generator=g).double() / 127.5) - 1
    noise = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    t = torch.zeros(4, dtype=torch.long)
    x_t = ddpm.q_sample(x0, t, noise)
    out = torch.cat([noise, torch.zeros_like(noise)], 1)
    p = ddpm.p_mean_variance(out, x_t, t)
    expected = -discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"]).mean(dim=(1, 2, 3)) / math.log(2)
    torch.testing.assert_close(ddpm.vb_terms_bpd(out, x0, x_t, t), expected)
    assert (expected > 0).all()


def test_learned_range_interpolation_endpoints(ddpm):
    betas, ac = alpha_bar_reference()
    t = torch.tensor([1, 10, 400, 999])
    x_t = torch.zeros(4, 2, 1, 1, dtype=torch.float64)
    post = betas * (1 - np.append(1.0, ac[:-1])) / (1 - ac)
    for v, expected in [(-1.0, np.log(post)), (1.0, np.log(betas)), (0.0, 0.5 * (np.log(post) + np.log(betas)))]:
        out = torch.cat([torch.zeros_like(x_t), torch.full_like(x_t, v)], 1)
        logvar = ddpm.p_mean_variance(out, x_t, t)["log_variance"]
        np.testing.assert_allclose(logvar[:, 0, 0, 0].numpy(), expected[t.numpy()], rtol=1e-12)


def test_fixed_variances():
    betas, ac = alpha_bar_reference()
    post = betas * (1 - np.append(1.0, ac[:-1])) / (1 - ac)
    t = torch.tensor([1, 300, 999])
    x_t = torch.zeros(3, 1, 1, 1, dtype=torch.float64)
    small = DDPM(DDPMConfig(variance="fixed_small"))
    large = DDPM(DDPMConfig(variance="fixed_large"))
    assert not small.learn_sigma and not large.learn_sigma
    np.testing.assert_allclose(small.p_mean_variance(x_t, x_t, t)["variance"].flatten().numpy(), post[t.numpy()], rtol=1e-12)
    np.testing.assert_allclose(large.p_mean_variance(x_t, x_t, t)["variance"].flatten().numpy(), betas[t.numpy()], rtol=1e-12)


class ChannelModel(torch.nn.Module):
    """A tiny conv net with the model API, to check shapes and gradients."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = torch.nn.Conv2d(c_in, c_out, 3, padding=1)

    def forward(self, x, t, y=None):
        return self.conv(x) + t.view(-1, 1, 1, 1) * 1e-3


def test_training_loss_shapes_and_hybrid_sum(ddpm):
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(8, 4, 6, 6, generator=g)
    noise = torch.randn(8, 4, 6, 6, generator=g)
    t = ddpm.sample_time(8, g)
    assert t.dtype == torch.long and 0 <= t.min() and t.max() < T
    losses = ddpm.training_losses(ChannelModel(4, 8), x0, t, noise, {"y": torch.zeros(8, dtype=torch.long)})
    assert set(losses) == {"loss", "mse", "vb"}
    assert all(v.shape == (8,) for v in losses.values())
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])
    weighted = DDPM(DDPMConfig(vlb_weight=0.25)).training_losses(ChannelModel(4, 8), x0, t, noise)
    torch.testing.assert_close(weighted["loss"], weighted["mse"] + 0.25 * weighted["vb"])
    # Fixed variance: plain MSE, and the model must output C channels.
    fixed = DDPM(DDPMConfig(variance="fixed_small"))
    out = fixed.training_losses(ChannelModel(4, 4), x0, t, noise)
    torch.testing.assert_close(out["loss"], out["mse"])
    with pytest.raises(ValueError):
        fixed.training_losses(ChannelModel(4, 8), x0, t, noise)


def test_vb_mean_is_detached(ddpm):
    g = torch.Generator().manual_seed(5)
    x0 = torch.rand(4, 3, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(4, 3, 4, 4, generator=g)
    t = torch.tensor([0, 5, 300, 900])
    out = torch.randn(4, 6, 4, 4, generator=g).requires_grad_(True)
    losses = ddpm.training_losses(lambda x, tm: out, x0, t, noise)
    (grad_vb,) = torch.autograd.grad(losses["vb"].sum(), out, retain_graph=True)
    assert grad_vb[:, :3].abs().max() == 0  # the VB never trains eps
    assert grad_vb[:, 3:].abs().min() > 0  # it trains the variance
    (grad_mse,) = torch.autograd.grad(losses["mse"].sum(), out)
    assert grad_mse[:, 3:].abs().max() == 0 and grad_mse[:, :3].abs().min() > 0


def test_oracle_eps_model_has_zero_mse_for_point_data(ddpm):
    # Data is one point c, so eps = (x_t - sqrt(ab_t) c) / sqrt(1 - ab_t) is computable from (x_t, model time).
    _, ac = alpha_bar_reference()
    c = torch.tensor(0.37, dtype=torch.float64)
    acs = torch.from_numpy(ac)

    def oracle(x, tm):
        a = acs[tm.round().long()].view(-1, 1, 1, 1)
        return torch.cat([(x - a.sqrt() * c) / (1 - a).sqrt(), torch.zeros_like(x)], 1)

    g = torch.Generator().manual_seed(6)
    t = ddpm.sample_time(256, g)
    noise = torch.randn(256, 2, 3, 3, generator=g, dtype=torch.float64)
    x0 = torch.full_like(noise, 0.37)
    assert ddpm.training_losses(oracle, x0, t, noise)["mse"].max().item() < 1e-16
    # Off by one step in the model time the oracle is wrong: the check is sensitive to the time mapping.
    shifted = ddpm.training_losses(lambda x, tm: oracle(x, (tm + 1).clamp(max=T - 1)), x0, t, noise)
    assert shifted["mse"][t < T - 1].min().item() > 1e-12


def test_respacing_matches_adm(ddpm):
    ts = respaced_timesteps(T, 250)
    assert len(ts) == 250 and ts[0] == 999 and ts[-1] == 0 and ts == sorted(ts, reverse=True)
    assert ts == sorted({int(v) for v in np.linspace(0, 999, 250).round()}, reverse=True)
    assert set(np.diff(ts[::-1])) == {4, 5}
    assert respaced_timesteps(T, 50, "leading") == list(range(980, -1, -20))  # DiT "ddim50"
    assert respaced_timesteps(T, 1) == [0]


def test_ddpm_schedulers_use_the_same_betas_and_timesteps(ddpm):
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

    s = ddpm.make_scheduler("ddpm", 250)
    assert isinstance(s, DDPMScheduler)
    assert s.config.variance_type == "learned_range" and not s.config.clip_sample
    # The objective's float64 schedule itself (diffusers would keep float32): see test_ddpm_official_loop.py.
    assert torch.equal(s.betas, ddpm.betas) and torch.equal(s.alphas_cumprod, ddpm.alphas_cumprod)
    assert s.timesteps.tolist() == respaced_timesteps(T, 250)
    # The previous timestep follows the respaced list, strides 4 and 5 (not a constant t - 1000 // 250).
    assert [int(s.previous_timestep(t)) for t in s.timesteps] == s.timesteps.tolist()[1:] + [-1]
    assert ddpm.make_scheduler("ddpm", 250, clip_sample=True).config.clip_sample
    ddim = ddpm.make_scheduler("ddim", 50)
    assert isinstance(ddim, DDIMScheduler) and ddim.timesteps.tolist() == list(range(980, -1, -20))
    assert isinstance(ddpm.make_scheduler("dpm-solver++", 20), DPMSolverMultistepScheduler)
    dpm = ddpm.make_scheduler("dpm-solver++", 20)
    assert dpm.config.algorithm_type == "dpmsolver++" and dpm.config.solver_order == 2
    assert isinstance(ddpm.make_scheduler("unipc", 20), UniPCMultistepScheduler)
    assert DDPM(DDPMConfig(variance="fixed_large")).make_scheduler("ddpm", 10).config.variance_type == "fixed_large"
    assert ddpm.scheduler_timestep_to_model_time(torch.tensor(999)).item() == 999.0
    fixed = DDPM(DDPMConfig(variance="fixed_small"))
    bad_calls = [
        lambda: ddpm.make_scheduler("euler", 10),  # a flow solver
        lambda: ddpm.make_scheduler("ddpm", 10, not_an_option=1),
        lambda: ddpm.make_scheduler("ddpm", 10, trained_betas=[0.1] * 1000),  # the schedule belongs to the objective
        lambda: ddpm.make_scheduler("ddim", 10, timestep_spacing="linspace"),  # DDIM steps back by T//N
        lambda: ddpm.make_scheduler("ddpm", 0),
        lambda: fixed.make_scheduler("ddpm", 10, variance_type="learned_range"),  # no variance channels
    ]
    for bad in bad_calls:
        with pytest.raises(ConfigError):
            bad()
    assert ddpm.make_scheduler("ddpm", 10, variance_type="fixed_small").config.variance_type == "fixed_small"


# ---------------------------------------------------------------------------------------------------------------
# Rectified flow


def test_flow_interpolation_endpoints_and_target():
    flow = RectifiedFlow(FlowConfig())
    g = torch.Generator().manual_seed(7)
    x0, noise = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    torch.testing.assert_close(flow.interpolate(x0, torch.zeros(2), noise), x0)
    torch.testing.assert_close(flow.interpolate(x0, torch.ones(2), noise), noise)
    torch.testing.assert_close(flow.interpolate(x0, torch.tensor([0.25, 0.5]), noise)[1], 0.5 * (x0[1] + noise[1]))
    assert not flow.learn_sigma


def test_logit_normal_and_uniform_time_sampling():
    flow = OBJECTIVES.build("rectified-flow", FlowConfig(logit_mean=0.4, logit_std=0.8))
    t = flow.sample_time(200_000, torch.Generator().manual_seed(8)).double()
    logit = torch.log(t / (1 - t))
    assert logit.mean().item() == pytest.approx(0.4, abs=0.01)
    assert logit.std().item() == pytest.approx(0.8, abs=0.01)
    same = flow.sample_time(200_000, torch.Generator().manual_seed(8))
    assert torch.equal(same.double(), t)  # only the generator decides
    u = RectifiedFlow(FlowConfig(time_sampling="uniform")).sample_time(200_000, torch.Generator().manual_seed(9))
    assert 0 <= u.min() and u.max() <= 1
    assert u.mean().item() == pytest.approx(0.5, abs=0.005)
    assert (u < 0.1).float().mean().item() == pytest.approx(0.1, abs=0.005)
    with pytest.raises(ConfigError):
        RectifiedFlow(FlowConfig(time_sampling="cosine"))


def test_time_shift():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(shift_time(t, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0], dtype=torch.float64))
    torch.testing.assert_close(shift_time(t, 1.0), t)
    plain = RectifiedFlow(FlowConfig()).sample_time(1000, torch.Generator().manual_seed(10))
    shifted = RectifiedFlow(FlowConfig(shift=3.0)).sample_time(1000, torch.Generator().manual_seed(10))
    torch.testing.assert_close(shifted, 3 * plain / (1 + 2 * plain))
    assert (shifted >= plain).all()


@pytest.mark.parametrize("time_scale", [1000.0, 1.0])
def test_oracle_velocity_has_zero_loss_for_point_data(time_scale):
    # Data is one point c: z_t = (1-t) c + t eps, so v = eps - c = (z_t - c) / t, computable from (z_t, model time).
    flow = RectifiedFlow(FlowConfig(time_scale=time_scale))
    c = 0.37

    def oracle(z, tm, scale=time_scale):
        return (z - c) / (tm / scale).view(-1, 1, 1, 1)

    g = torch.Generator().manual_seed(11)
    t = flow.sample_time(256, g).double()
    noise = torch.randn(256, 2, 3, 3, generator=g, dtype=torch.float64)
    x0 = torch.full_like(noise, c)
    losses = flow.training_losses(oracle, x0, t, noise)
    assert set(losses) == {"loss"} and losses["loss"].shape == (256,)
    assert losses["loss"].max().item() < 1e-10  # model time is float32
    # An oracle that assumes the other time scale is wrong, so this test notices a wrong model_time.
    wrong = flow.training_losses(lambda z, tm: oracle(z, tm, scale=1001.0 - time_scale), x0, t, noise)
    assert wrong["loss"].min().item() > 1e-6


def test_flow_loss_reads_first_c_channels_of_a_2c_model():
    flow = RectifiedFlow(FlowConfig())
    g = torch.Generator().manual_seed(12)
    x0, noise = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    t = flow.sample_time(4, g)
    v = noise - x0
    assert flow.training_losses(lambda z, tm: torch.cat([v, torch.randn_like(v)], 1), x0, t, noise)["loss"].max() < 1e-12
    with pytest.raises(ValueError):
        flow.training_losses(lambda z, tm: v[:, :1], x0, t, noise)


def test_flow_schedulers():
    from diffusers import (
        DPMSolverMultistepScheduler,
        FlowMatchEulerDiscreteScheduler,
        FlowMatchHeunDiscreteScheduler,
        UniPCMultistepScheduler,
    )

    flow = RectifiedFlow(FlowConfig(time_scale=1.0, shift=3.0))
    euler = flow.make_scheduler("euler", 4)
    assert isinstance(euler, FlowMatchEulerDiscreteScheduler)
    grid = shift_time(torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64), 3.0).float()
    torch.testing.assert_close(euler.sigmas, grid)
    torch.testing.assert_close(flow.scheduler_timestep_to_model_time(euler.timesteps), grid[:-1])
    unshifted = flow.make_scheduler("euler", 4, shift=1.0)
    torch.testing.assert_close(unshifted.sigmas, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    heun = flow.make_scheduler("heun", 5)
    assert isinstance(heun, FlowMatchHeunDiscreteScheduler) and len(heun.timesteps) == 9
    for solver, cls in (("dpm-solver++", DPMSolverMultistepScheduler), ("unipc", UniPCMultistepScheduler)):
        s = flow.make_scheduler(solver, 10)
        assert isinstance(s, cls) and s.config.use_flow_sigmas and s.config.prediction_type == "flow_prediction"
        # Float timesteps carry the exact sigma (diffusers would truncate sigma * 1000 to an integer).
        assert s.timesteps.dtype == torch.float32
        torch.testing.assert_close(s.timesteps / 1000, s.sigmas[:-1])
    assert RectifiedFlow(FlowConfig()).scheduler_timestep_to_model_time(torch.tensor(250.0)).item() == 250.0
    for solver in ("ddpm", "ddim"):
        with pytest.raises(ConfigError):
            flow.make_scheduler(solver, 10)
