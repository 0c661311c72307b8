"""Inversion grids: oracles (diffusers samplers, closed-form flows) and round trips."""

import pytest
import torch

from ditk.edit.grids import BDIAGrid, DDIMGrid, EDICTGrid, FlowGrid
from ditk.edit.inversion import invert, reconstruct
from ditk.models.dit import DiT
from ditk.objectives.ddpm import DDPM
from ditk.objectives.flow import RectifiedFlow
from ditk.sampling import sample


def tiny_dit(learn_sigma: bool, dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    m = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10,
            learn_sigma=learn_sigma).eval()
    for p in m.parameters():  # a random model with non-zero adaLN gates (a fresh DiT predicts exactly 0)
        torch.nn.init.normal_(p, std=0.05)
    return m.to(dtype)


COND = {"y": torch.tensor([1, 7])}


class GaussianEps:
    """The exact eps-prediction for data ~ N(mu, s^2 I): eps* = sqrt(1-a) (x - sqrt(a) mu) / (a s^2 + 1 - a)."""

    def __init__(self, objective, mu=0.3, s=0.5):
        self.ac, self.mu, self.s = objective.alphas_cumprod.double(), mu, s

    def __call__(self, x, t, **kw):
        a = self.ac[t.long()].to(x).view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * self.mu) / (a * self.s**2 + 1 - a)


class GaussianFlow:
    """The exact velocity for data ~ N(mu, s^2 I) under z = (1 - sigma) x0 + sigma eps (model time = 1000 sigma).
    Its ODE solution is known: z(sigma) = (1 - sigma) mu + sqrt(var(sigma)) / s (x0 - mu)."""

    def __init__(self, mu=0.3, s=0.5):
        self.mu, self.s = mu, s

    def var(self, sig):
        return (1 - sig) ** 2 * self.s**2 + sig**2

    def __call__(self, z, t, **kw):
        sig = (t.to(z) / 1000).view(-1, 1, 1, 1)
        zt = z - (1 - sig) * self.mu
        return -self.mu + (sig - (1 - sig) * self.s**2) * zt / self.var(sig)

    def solution(self, x0, sig):
        return (1 - sig) * self.mu + self.var(torch.tensor(sig, dtype=x0.dtype)).sqrt() / self.s * (x0 - self.mu)


def test_ddim_grid_is_the_ddim_sampler():
    model, ddpm = tiny_dit(True), DDPM()
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = sample(model, ddpm, z, COND, solver=DDIMGrid(ddpm, 10))
    theirs = sample(model, ddpm, z, COND, solver="ddim", steps=10)  # diffusers DDIMScheduler
    # both use the float64 alpha_bar schedule; the tensors are float32: equal to float32 rounding
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6 * theirs.abs().max())


def test_flow_euler_grid_is_the_euler_sampler_with_shift():
    model, flow = tiny_dit(False), RectifiedFlow({"shift": 3.0})
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = sample(model, flow, z, COND, solver=FlowGrid(flow, 12))
    theirs = sample(model, flow, z, COND, solver="euler", steps=12)  # diffusers FlowMatchEulerDiscreteScheduler
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_edict_round_trip_is_exact():
    model, ddpm = tiny_dit(True, torch.float64), DDPM()
    x0 = torch.rand(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    inv = invert(model, ddpm, x0, COND, "edict", 10)
    rec, nfe = reconstruct(model, ddpm, inv, COND, "edict", 10)
    assert inv.nfe == nfe == 20
    assert (rec - x0).abs().max() < 1e-9
    # with an eps that does not depend on x, both chains are the DDIM chain (mixing equal chains changes nothing)
    def eps_of_t(x, t, **kw):
        return torch.cos(t.double() / 100).view(-1, 1, 1, 1).expand_as(x) * torch.linspace(-1, 1, 64).view(1, 1, 8, 8)

    z = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    edict = sample(eps_of_t, ddpm, z, {}, solver=EDICTGrid(ddpm, 10))
    assert torch.allclose(edict, sample(eps_of_t, ddpm, z, {}, solver=DDIMGrid(ddpm, 10)), atol=1e-10)


def test_bdia_round_trip_is_exact():
    model, ddpm = tiny_dit(True, torch.float64), DDPM()
    x0 = torch.rand(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    inv = invert(model, ddpm, x0, COND, "bdia", 20)
    rec, nfe = reconstruct(model, ddpm, inv, COND, "bdia", 20)
    assert inv.nfe == 20 and nfe == 19
    assert (rec - x0).abs().max() < 1e-9
    # DDIM on the same model and steps is not exact: the test can tell them apart
    inv_d = invert(model, ddpm, x0, COND, "ddim", 20)
    assert (reconstruct(model, ddpm, inv_d, COND, "ddim", 20)[0] - x0).abs().max() > 1e-4


@pytest.mark.parametrize("method", ["ddim", "euler"])
def test_round_trip_error_shrinks_with_steps(method):
    x0 = 0.3 + 0.5 * torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    if method == "ddim":
        objective = DDPM()
        model = GaussianEps(objective)
    else:
        objective, model = RectifiedFlow({}), GaussianFlow()
    errors = []
    for steps in (5, 20, 80):
        inv = invert(model, objective, x0, {}, method, steps)
        rec, _ = reconstruct(model, objective, inv, {}, method, steps)
        errors.append(float((rec - x0).abs().max()))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.25 * errors[0]


def test_rf_solver_and_fireflow_beat_euler_at_equal_nfe_on_a_planted_flow():
    flow, model = RectifiedFlow({}), GaussianFlow()
    x0 = 0.3 + 0.5 * torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    exact = model.solution(x0, 1.0)
    err = {}
    for method, steps in (("euler", 16), ("rf-solver", 8), ("fireflow", 15)):  # 16 NFE each
        inv = invert(model, flow, x0, {}, method, steps)
        assert inv.nfe == 16
        err[method] = float((inv.noise - exact).abs().max())
    assert err["rf-solver"] < 0.5 * err["euler"], err
    assert err["fireflow"] < 0.5 * err["euler"], err
    # the midpoint solution also lands on the exact noise to second order
    inv = invert(model, flow, x0, {}, "rf-solver", 64)
    assert float((inv.noise - exact).abs().max()) < 1e-3


def test_rf_inversion_control_pulls_towards_the_noise_target():
    flow, model = RectifiedFlow({}), GaussianFlow()
    x0 = 0.3 + 0.5 * torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    free = invert(model, flow, x0, {}, "rf-inversion", 20, {"gamma": 0.0})
    plain = invert(model, flow, x0, {}, "euler", 20)
    assert torch.equal(free.noise, plain.noise)  # gamma 0 is Euler
    controlled = invert(model, flow, x0, {}, "rf-inversion", 20, {"gamma": 1.0}, seed=5)
    y1 = torch.stack([torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(5 * 1_000_003 + i)) for i in range(2)])
    # gamma 1 follows the straight line to y1 exactly: z(1) = y1
    assert torch.allclose(controlled.noise, y1.double(), atol=1e-9)


def test_grid_keys_pair_inversion_and_sampling_evaluations():
    ddpm, flow = DDPM(), RectifiedFlow({})
    for make in (lambda d: DDIMGrid(ddpm, 6, d), lambda d: FlowGrid(flow, 6, "rf-solver", d),
                 lambda d: FlowGrid(flow, 6, "fireflow", d), lambda d: EDICTGrid(ddpm, 6, d),
                 lambda d: BDIAGrid(ddpm, 6, d, pair=torch.zeros(1) if d == "sample" else None)):
        inv, smp = make("invert"), make("sample")
        inv_keys = {inv.eval_key(i) for i in range(inv.num_evaluations)}
        smp_keys = [smp.eval_key(i) for i in range(smp.num_evaluations)]
        assert all(k in inv_keys for k in smp_keys if k[0] != "initial")


def test_rf_inversion_edit_control_with_eta_one_lands_on_the_source():
    """eta = 1 on every step follows the straight line from z to y0: v_hat = (z - y0) / sigma makes the Euler step
    z - y0 <- (z - y0) sigma_to / sigma_from, which reaches y0 exactly at sigma = 0, whatever the model says."""
    model, flow = tiny_dit(False, torch.float64), RectifiedFlow({})
    y0 = torch.rand(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    z = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    grid = FlowGrid(flow, 10, "rf-inversion", "sample", eta=1.0, start=0.0, stop=1.0, y0=y0)
    assert torch.allclose(sample(model, flow, z, COND, solver=grid), y0, atol=1e-12)
    free = FlowGrid(flow, 10, "rf-inversion", "sample", eta=0.0, y0=y0)  # eta 0 is plain Euler
    assert torch.equal(sample(model, flow, z, COND, solver=free), sample(model, flow, z, COND, solver=FlowGrid(flow, 10)))
