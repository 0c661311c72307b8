"""Restoration methods against oracles: DDNM on a Gaussian prior with the exact score (posterior mean, exact
consistency), DPS's data-term gradient against finite differences, PiGDM's guidance against its closed form on a
Gaussian prior, PnP-Flow against a plain re-implementation of the paper's loop."""

import math

import pytest
import torch

from ditk.objectives.ddpm import DDPM
from ditk.objectives.flow import RectifiedFlow
from ditk.restore.operators import build_operator
from ditk.restore.pipeline import get_method
from ditk.sampling import sample

SHAPE = (1, 4, 4)
D = 16


class GaussianEps(torch.nn.Module):
    """The exact epsilon-prediction of data x ~ N(mu, Sigma) under the DDPM schedule (a perfect prior):
    E[eps | x_t] = sqrt(1 - ab) (ab Sigma + (1 - ab) I)^-1 (x_t - sqrt(ab) mu)."""

    def __init__(self, objective, mu, cov):
        super().__init__()
        self.objective, self.mu, self.cov = objective, mu.double(), cov.double()
        self.calls = 0

    def forward(self, x, t):
        self.calls += 1
        ab = self.objective.alphas_cumprod[t.long()].double()  # (N,)
        xf = x.double().flatten(1)
        out = torch.empty_like(xf)
        for a in torch.unique(ab):  # one solve per distinct time (all rows share it in a sampling loop)
            rows = ab == a
            m = a * self.cov + (1 - a) * torch.eye(D, dtype=torch.float64)
            rhs = (xf[rows] - torch.sqrt(a) * self.mu).T
            out[rows] = (torch.sqrt(1 - a) * torch.linalg.solve(m, rhs)).T
        return out.reshape(x.shape).to(x.dtype)


def factorised_prior(op, seed=0):
    """A Gaussian prior whose covariance commutes with the projector P = A^+ A, so that the range and null-space
    parts of x are independent: the posterior given y = A x (noise-free) is exact to write down:
    mean A^+ y + (I - P) mu."""
    g = torch.Generator().manual_seed(seed)
    eye = torch.eye(D).reshape(D, *SHAPE)
    P = op.pinv(op.A(eye)).reshape(D, D).double().T  # column j = P e_j
    Q = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0]
    B = Q @ torch.diag(torch.rand(D, generator=g, dtype=torch.float64) * 0.5 + 0.05) @ Q.T  # SPD
    Np = torch.eye(D, dtype=torch.float64) - P
    cov = P @ B @ P + Np @ B @ Np + 1e-3 * torch.eye(D, dtype=torch.float64)
    mu = 0.3 * torch.randn(D, generator=g, dtype=torch.float64)
    return mu, cov, P


@pytest.mark.parametrize("task", ["sr2", "inpaint-random"])
def test_ddnm_recovers_the_gaussian_posterior_mean_and_is_consistent(task):
    torch.manual_seed(0)
    op = build_operator(task, SHAPE)
    objective = DDPM({"variance": "fixed_small"})
    mu, cov, P = factorised_prior(op)
    model = GaussianEps(objective, mu, cov)
    # one clean image, its measurement, and n posterior samples of it
    x_true = (mu + torch.linalg.cholesky(cov) @ torch.randn(D, dtype=torch.float64)).float().reshape(1, *SHAPE)
    n = 600
    y = op.A(x_true).expand(n, *op.y_shape()).contiguous()
    method = get_method("ddnm")(op, y, objective, 0.0, generators=[torch.Generator().manual_seed(i) for i in range(n)])
    noise = torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(1))
    out = sample(model, objective, noise, {}, solver="ddpm", steps=50, step_hooks=[method]).double()
    # exactly consistent with y (noise-free): the last step returns x0' = x0 - A^+(A x0 - y)
    assert (op.A(out.float()) - y).abs().max() < 1e-5
    # the posterior mean: A^+ y + (I - P) mu, within the Monte Carlo error of n samples (4 standard errors)
    post_mean = (P @ x_true.double().flatten() + (torch.eye(D, dtype=torch.float64) - P) @ mu)
    post_cov = (torch.eye(D, dtype=torch.float64) - P) @ cov @ (torch.eye(D, dtype=torch.float64) - P)
    se = torch.sqrt(torch.diagonal(post_cov) / n) + 1e-4
    err = (out.flatten(1).mean(0) - post_mean).abs()
    assert (err < 4 * se + 0.01).all(), (err, se)
    # and the posterior spread in the null space (the sampler is not a point estimate)
    emp_var = out.flatten(1).var(0)
    assert torch.allclose(emp_var, torch.diagonal(post_cov), rtol=0.35, atol=2e-3)
    assert method.nfe == 50


def test_ddnm_time_travel_schedule_and_consistency():
    from ditk.restore.ddnm import travel_schedule

    seq, prev = travel_schedule([40, 30, 20, 10, 0], 2, 1)
    assert seq == [40, 30, 40, 30, 20, 10, 20, 10, 0]
    assert prev == [30, 20, 30, 20, 10, 0, 10, 0, -1]
    op = build_operator("inpaint-box", SHAPE)
    objective = DDPM({"variance": "fixed_small"})
    mu, cov, _ = factorised_prior(op, seed=2)
    model = GaussianEps(objective, mu, cov)
    y = op.A(torch.randn(3, *SHAPE))
    method = get_method("ddnm")(op, y, objective, 0.0, {"travel_length": 3, "travel_repeat": 1})
    out = sample(model, objective, torch.randn(3, *SHAPE), {}, solver="ddpm", steps=12, step_hooks=[method])
    assert model.calls == method.nfe == 12 + 9  # three jumps back of three steps
    assert (op.A(out) - y).abs().max() < 1e-5


def test_ddnm_plus_simplified_noise_scaling():
    """lambda_t, gamma_t keep the total noise of x_{t-1} at the posterior's sigma_t (pixel-wise)."""
    op = build_operator("sr2", SHAPE)
    m = get_method("ddnm")(op, torch.zeros(1, *op.y_shape()), DDPM(), 0.2)
    for a, sigma_t in [(0.5, 0.3), (0.9, 0.01), (0.1, 0.05)]:
        lam, gamma = m.scales(a, sigma_t)
        assert 0 <= lam <= 1
        assert math.isclose(gamma ** 2 + (a * lam * 0.2) ** 2, sigma_t ** 2, rel_tol=1e-9)


@pytest.mark.parametrize("task", ["sr2", "blur", "inpaint-random"])
def test_ddnm_plus_keeps_every_component_at_the_posterior_noise(task):
    """DDNM+ (SVD form): the measurement noise that x0' inherits (a A^dagger_lambda sigma_y n) plus the noise the
    step adds has covariance sigma_t^2 I: a^2 sigma_y^2 A_l A_l^T + sigma_t^2 (I - P) + M M^T = sigma_t^2 I."""
    op = build_operator(task, SHAPE, {"sigma": 0.6, "size": 3} if task == "blur" else {})
    sigma_y = 0.2
    m = get_method("ddnm")(op, torch.zeros(1, *op.y_shape()), DDPM(), sigma_y, {"svd": True})
    eye_x = torch.eye(D).reshape(D, *SHAPE)
    ydim = op.A(eye_x[:1]).numel()
    eye_y = torch.eye(ydim).reshape(ydim, *op.y_shape())
    for a, sigma_t in [(0.5, 0.3), (0.9, 0.01), (0.1, 0.05)]:
        lam, noise_over_s = m.spectral(a, sigma_t)
        A_l = op.At(op.gram_apply(eye_y, lambda eig: lam(eig) * op._inv_eig(eig))).reshape(ydim, D).T.double()
        M = op.At(op.gram_apply(eye_y, noise_over_s)).reshape(ydim, D).T.double()
        P = op.pinv(op.A(eye_x)).reshape(D, D).T.double()
        total = a ** 2 * sigma_y ** 2 * A_l @ A_l.T + sigma_t ** 2 * (torch.eye(D, dtype=torch.float64) - P) + M @ M.T
        assert torch.allclose(total, sigma_t ** 2 * torch.eye(D, dtype=torch.float64), atol=1e-5), (task, a, sigma_t)


def _tiny_dit(seed=0):
    from ditk.models.dit import DiT

    torch.manual_seed(seed)
    model = DiT(input_size=4, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=0,
                learn_sigma=True).double()
    with torch.no_grad():  # adaLN-Zero starts at zero output: give it a non-trivial function
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval().requires_grad_(False)


def _decoder(z):
    """A stand-in for a VAE decoder: 4x4 latents -> 8x8 images, smooth and nonlinear."""
    return torch.tanh(torch.nn.functional.interpolate(z, scale_factor=2, mode="bilinear", align_corners=False))


@pytest.mark.parametrize("task, latent", [("sr2", False), ("blur", False), ("inpaint-box", False), ("sr2", True)])
def test_dps_gradient_equals_finite_differences(task, latent):
    """The gradient of ||y - A(x0_hat(x_t))|| through the model (and, for latent priors, the decoder)."""
    objective = DDPM()
    pixels = (1, 8, 8) if latent else SHAPE
    op = build_operator(task, pixels, {"sigma": 0.7, "size": 3} if task == "blur" else {})
    model = _tiny_dit()
    g = torch.Generator().manual_seed(3)
    y = op.A(torch.randn(2, *pixels, generator=g, dtype=torch.float64) * 0.3)
    decode = _decoder if latent else None
    method = get_method("dps")(op, y, objective, 0.05, decode=decode)
    scheduler = objective.make_scheduler("ddpm", 20)
    method.begin(scheduler)
    i = 8
    t = scheduler.timesteps[i]
    ab = float(objective.alphas_cumprod[int(t)])

    def f(x):  # the DPS data term, written out independently of the method
        eps = model(x, torch.full((x.shape[0],), float(t), dtype=torch.float64))[:, :1]
        x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
        x0 = _decoder(x0) if latent else x0.clamp(-1, 1)  # no [-1, 1] clip in latent space
        return (y - op.A(x0)).flatten(1).norm(dim=1).sum()

    x = (0.3 * torch.randn(2, *SHAPE, generator=g, dtype=torch.float64)).requires_grad_(True)
    with torch.enable_grad():
        out = model(x, torch.full((2,), float(t), dtype=torch.float64))
        method.model_output(i, t, x, out)
    h = 1e-6
    fd = torch.zeros_like(x)
    for k in range(x.numel()):
        e = torch.zeros(x.numel(), dtype=torch.float64)
        e[k] = h
        e = e.reshape(x.shape)
        fd.view(-1)[k] = (f(x.detach() + e) - f(x.detach() - e)) / (2 * h)
    assert torch.allclose(method.grad, fd, rtol=1e-5, atol=1e-7)
    prev = torch.zeros_like(x)
    zeta = {"sr2": 1.0, "blur": 0.3, "inpaint-box": 0.5}[task]  # the per-task defaults (dps.py docstring)
    assert method.opts["zeta"] == zeta
    assert torch.allclose(method.step_end(i, t, x, out, prev), -zeta * fd, atol=1e-7)


@pytest.mark.parametrize("sigma_y", [0.0, 0.1])
def test_pigdm_guidance_matches_the_closed_form_on_a_gaussian_prior(sigma_y):
    """For a Gaussian prior x0_hat is affine in x_t: x0 = (x_t - sqrt(1-ab) K (x_t - sqrt(ab) mu)) / sqrt(ab), so
    the VJP is J^T v with J = (I - sqrt(1-ab) K) / sqrt(ab), K the linear map of the exact eps."""
    op = build_operator("sr2", SHAPE)
    objective = DDPM({"variance": "fixed_small"})
    mu, cov, _ = factorised_prior(op, seed=4)
    model = GaussianEps(objective, mu, cov).double()
    y = op.A(torch.randn(1, *SHAPE, dtype=torch.float64))
    method = get_method("pigdm")(op, y, objective, sigma_y, {"clip": False})  # the closed form is unclipped
    scheduler = objective.make_scheduler("ddpm", 10)
    method.begin(scheduler)
    i, t = 4, scheduler.timesteps[4]
    ab = float(objective.alphas_cumprod[int(t)])
    x = torch.randn(1, *SHAPE, dtype=torch.float64).requires_grad_(True)
    with torch.enable_grad():
        out = model(x, t.expand(1))
        method.model_output(i, t, x, out)
    K = math.sqrt(1 - ab) * torch.linalg.inv(ab * cov + (1 - ab) * torch.eye(D, dtype=torch.float64))
    J = (torch.eye(D, dtype=torch.float64) - math.sqrt(1 - ab) * K) / math.sqrt(ab)
    x0 = method.x0
    # A as a matrix, and v = r^2 A^T (r^2 A A^T + s^2 I)^-1 (y - A x0)
    eye = torch.eye(D, dtype=torch.float64).reshape(D, *SHAPE)
    Am = op.A(eye).reshape(D, -1).T  # (m, D)
    r2 = 1 - ab
    m = Am.shape[0]
    v = r2 * Am.T @ torch.linalg.pinv(r2 * Am @ Am.T + sigma_y ** 2 * torch.eye(m, dtype=torch.float64)) @ (
        y.flatten() - Am @ x0.flatten())
    assert torch.allclose(method.g.flatten(), J.T @ v, atol=1e-8)
    if sigma_y == 0:  # the noiseless form of the paper: v = A^+ y - A^+ A x0
        Ap = torch.linalg.pinv(Am)
        assert torch.allclose(v, Ap @ y.flatten() - Ap @ Am @ x0.flatten(), atol=1e-8)


class ZeroEps(torch.nn.Module):
    """A prior that predicts eps = 0: x0_hat = x_t / sqrt(abar_t), so d x0_hat / d x_t = I / sqrt(abar_t)."""

    def forward(self, x, t):
        return torch.zeros_like(x)


@pytest.mark.parametrize("task", ["sr4", "colorize", "inpaint-random"])
def test_pigdm_step_moves_x0_by_the_pseudo_inverse_correction(task):
    """The authors' update (NVlabs/RED-diff pgdm.py, awd): x_s = sqrt(ab_s) (x0 + sqrt(ab_t) g) + c2 eps. With
    J = I / sqrt(ab_t) the guidance sqrt(ab_t) g is A^+(y - A x0), so noise-free the DDIM(eta=0) step lands on
    sqrt(ab_s) times an x0 that fits y exactly, at every step (the old weight sqrt(ab_t) without sqrt(ab_s)
    overshot by 1 / sqrt(ab_s))."""
    op = build_operator(task, (3, 8, 8))
    objective = DDPM({"variance": "fixed_small"})
    y = op.A(torch.rand(2, 3, 8, 8, dtype=torch.float64) * 2 - 1)
    method = get_method("pigdm")(op, y, objective, 0.0, {"clip": False, "eta": 0.0})
    scheduler = objective.make_scheduler("ddpm", 10)
    method.begin(scheduler)
    model = ZeroEps()
    for i in (0, 4, 8):
        t = scheduler.timesteps[i]
        x = torch.randn(2, 3, 8, 8, dtype=torch.float64).requires_grad_(True)
        with torch.enable_grad():
            out = method.model_output(i, t, x, model(x, t))
        new = method.step_end(i, t, x, out, None)
        ab_prev = method.grid.ab_prev[i]
        before = (op.A(method.x0) - y).abs().max()  # x0 = x_t / sqrt(ab_t) misses y by O(1 / sqrt(ab_t))
        assert before > 0.5
        assert (op.A(new / math.sqrt(ab_prev)) - y).abs().max() < 1e-6 * before  # the operators run in float32


@pytest.mark.parametrize("normalize", [True, False])
def test_pnp_flow_equals_the_papers_loop(normalize):
    """PnP-Flow inside the sampling loop = a plain loop over the paper's Algorithm (same noise draws); the step
    is lr (1 - s)^alpha / L with L = ||A^T A|| (normalize) or L = 1 (the authors' code)."""
    objective = RectifiedFlow()
    op = build_operator("sr2", SHAPE)
    model = _tiny_dit(seed=1).float()
    model.learn_sigma = False
    y = op.A(torch.randn(2, *SHAPE))
    gens = [torch.Generator().manual_seed(10 + i) for i in range(2)]
    method = get_method("pnp-flow")(op, y, objective, 0.0, {"samples": 3, "lr": 0.7, "alpha": 1.0, "normalize": normalize},
                                    generators=gens)
    noise = torch.randn(6, *SHAPE)
    steps = 6
    out = sample(model, objective, noise, {}, solver="euler", steps=steps, step_hooks=[method])[::3]

    def v(z, t):
        return model(z, torch.full((z.shape[0],), t * 1000.0))[:, :1]

    gens = [torch.Generator().manual_seed(10 + i) for i in range(2)]
    x = noise.clone()
    lip = 0.25 if normalize else 1.0  # sr2 average pooling: A^T A has eigenvalue 1/4
    for k in range(steps):
        s = k / steps  # the paper's time: 0 noise, 1 data
        gamma = 0.7 * (1 - s) / lip
        z = x - gamma * op.At(op.A(x) - y.repeat_interleave(3, 0))
        n = torch.stack([torch.randn(SHAPE, generator=g) for g in gens for _ in range(3)])
        zt = s * z + (1 - s) * n
        d = zt + (1 - s) * (-v(zt, 1 - s))  # the paper's velocity points to the data: -u in ditk's convention
        x = d.reshape(2, 3, *SHAPE).mean(1).repeat_interleave(3, 0)
    assert torch.allclose(out, x[::3], atol=1e-5)
    assert method.nfe == 3 * steps


def test_methods_refuse_what_they_cannot_do():
    from ditk.errors import ConfigError

    op = build_operator("sr4", (3, 16, 16))
    with pytest.raises(ConfigError, match="use --method pnp-flow"):
        get_method("ddnm").check(op, "rectified-flow", False)
    with pytest.raises(ConfigError, match="use --method ddnm or ddrm or dps or pigdm"):
        get_method("pnp-flow").check(op, "ddpm", False)
    with pytest.raises(ConfigError, match="latent one: use --method dps"):
        get_method("ddnm").check(op, "ddpm", True)
    with pytest.raises(ConfigError, match="did you mean 'pigdm'"):
        get_method("pgdm")
    with pytest.raises(ConfigError, match="no option 'zta'"):
        get_method("dps").resolve_options({"zta": 1}, op)


@pytest.mark.parametrize("task", ["sr2", "inpaint-random"])
def test_ddrm_noise_free_recovers_the_gaussian_posterior_mean_and_is_consistent(task):
    """DDRM (eta 0.85, eta_b 1) with the exact score of a factorised Gaussian prior and y = A x: every range
    coordinate ends at ybar (A x = y to 1e-5) and the null space follows DDIM(eta) on the prior, whose mean is the
    closed-form posterior mean A^+ y + (I - P) mu (the update is affine in x_t with E[x_t] = sqrt(abar_t) mu)."""
    op = build_operator(task, SHAPE)
    objective = DDPM({"variance": "fixed_small"})
    mu, cov, P = factorised_prior(op, seed=5)
    model = GaussianEps(objective, mu, cov)
    g = torch.Generator().manual_seed(6)
    x_true = (mu + torch.linalg.cholesky(cov) @ torch.randn(D, generator=g, dtype=torch.float64)).float().reshape(1, *SHAPE)
    n = 600
    y = op.A(x_true).expand(n, *op.y_shape()).contiguous()
    method = get_method("ddrm")(op, y, objective, 0.0, generators=[torch.Generator().manual_seed(i) for i in range(n)])
    out = sample(model, objective, torch.randn(n, *SHAPE, generator=g), {}, solver="ddpm", steps=20,
                 step_hooks=[method]).double()
    assert method.nfe == model.calls == 20
    assert (op.A(out.float()) - y).abs().max() < 1e-5
    eye = torch.eye(D, dtype=torch.float64)
    post_mean = P @ x_true.double().flatten() + (eye - P) @ mu
    post_cov = (eye - P) @ cov @ (eye - P)
    se = torch.sqrt(torch.diagonal(post_cov) / n) + 1e-4
    err = (out.flatten(1).mean(0) - post_mean).abs()
    assert (err < 4 * se + 0.01).all(), (err, se)
    # a sampler, not a point estimate; but not an exact posterior sampler either: DDRM's eta draws fresh noise
    # around x0 (eta = 1 would be x0 + sigma' n), which forgets part of x_t, so the null-space spread falls short
    # of the posterior's (about 0.6 of its variance here, with 20 steps)
    ratio = out.flatten(1).var(0) / torch.diagonal(post_cov).clamp_min(1e-6)
    spread = torch.diagonal(post_cov) > 1e-3
    assert ((ratio[spread] > 0.3) & (ratio[spread] < 1.1)).all(), ratio


def _ddrm_dense_reference(Am, x0, eps, y, sigma_next, sigma_y, eta, eta_b, tol):
    """Eq. 7-8 written out with a dense float64 SVD of A: (mean, covariance) of x'^VE."""
    U, S, Vh = torch.linalg.svd(Am, full_matrices=True)  # Vh: (D, D)
    s = torch.zeros(D, dtype=torch.float64)
    s[: S.numel()] = torch.where(S > tol * S.max(), S, torch.zeros_like(S))
    ybar = torch.zeros(D, dtype=torch.float64)
    k = S.numel()
    ybar[:k] = torch.where(s[:k] > 0, (U.T @ y) / s[:k].clamp_min(1e-30), torch.zeros(k, dtype=torch.float64))
    c0, e = Vh @ x0, Vh @ eps
    mean, var = torch.empty(D, dtype=torch.float64), torch.empty(D, dtype=torch.float64)
    for i in range(D):
        if s[i] == 0:
            mean[i] = c0[i] + math.sqrt(1 - eta ** 2) * sigma_next * e[i]
            var[i] = (eta * sigma_next) ** 2
        elif s[i] * sigma_next < sigma_y:
            mean[i] = c0[i] + math.sqrt(1 - eta ** 2) * sigma_next * (ybar[i] - c0[i]) * s[i] / sigma_y
            var[i] = (eta * sigma_next) ** 2
        else:
            mean[i] = (1 - eta_b) * c0[i] + eta_b * ybar[i]
            var[i] = max(sigma_next ** 2 - (eta_b * sigma_y / s[i]) ** 2, 0.0)
    return Vh.T @ mean, Vh.T @ torch.diag(var) @ Vh


@pytest.mark.parametrize("task", ["sr2", "sr2-bicubic", "blur", "inpaint-random"])
def test_ddrm_step_equals_a_dense_svd_reference(task):
    """One DDRM step (mean and noise covariance, both branches sigma' s_i <> sigma_y and the null space) against
    the paper's per-singular-value update with torch.linalg.svd of A as a matrix."""
    op = build_operator(task, SHAPE, {"sigma": 0.6, "size": 3} if task == "blur" else {})
    g = torch.Generator().manual_seed(7)
    sigma_y, eta, eta_b = 0.1, 0.85, 0.7
    y = op.A(torch.randn(1, *SHAPE, generator=g))
    m = get_method("ddrm")(op, y, DDPM(), sigma_y, {"eta": eta, "eta_b": eta_b})
    eye_x = torch.eye(D).reshape(D, *SHAPE)
    Am = op.A(eye_x).reshape(D, -1).T.double()
    ydim = Am.shape[0]
    eye_y = torch.eye(ydim).reshape(ydim, *op.y_shape())
    x0, eps = torch.randn(1, *SHAPE, generator=g), torch.randn(1, *SHAPE, generator=g)
    for sigma_next in (0.05, 0.3, 2.0):
        zx, zy = torch.zeros(1, *SHAPE), torch.zeros(1, *op.y_shape())
        mean = m.update(x0, eps, sigma_next, zx, zy)
        Mx = (m.update(x0.expand(D, *SHAPE), eps.expand(D, *SHAPE), sigma_next, eye_x, zy.expand(D, *op.y_shape()))
              - mean).reshape(D, D).T.double()
        m.y = y.expand(ydim, *op.y_shape())
        My = (m.update(x0.expand(ydim, *SHAPE), eps.expand(ydim, *SHAPE), sigma_next, zx.expand(ydim, *SHAPE), eye_y)
              - mean).reshape(ydim, D).T.double()
        m.y = y
        ref_mean, ref_cov = _ddrm_dense_reference(Am, x0.double().flatten(), eps.double().flatten(),
                                                  y.double().flatten(), sigma_next, sigma_y, eta, eta_b, op.pinv_tol)
        assert torch.allclose(mean.double().flatten(), ref_mean, atol=1e-4), (task, sigma_next)
        assert torch.allclose(Mx @ Mx.T + My @ My.T, ref_cov, atol=1e-4), (task, sigma_next)


def test_ddrm_refuses_an_operator_without_an_svd_form():
    from ditk.errors import ConfigError
    from ditk.restore.operators import Operator

    class Opaque(Operator):  # A and A^T only, and a pinv, but no decomposition of A A^T
        name = "opaque"

        def A(self, x):
            return x

        At = A
        pinv = A

    with pytest.raises(ConfigError, match="needs an SVD form of A, which task opaque lacks: use --method dps$"):
        get_method("ddrm").check(Opaque(SHAPE), "ddpm", False)
    with pytest.raises(ConfigError, match="option eta must be in"):
        get_method("ddrm")(build_operator("sr2", SHAPE), torch.zeros(1, 1, 2, 2), DDPM(), 0.0, {"eta": 1.5})


def _ddnm_plus_dense_reference(Am, x0, eps, y, a, sigma_t, sigma_y, eta, tol):
    """The paper code's DDNM+ step (svd_ddnm.ddnm_plus_diffusion with Lambda / Lambda_noise) written out per
    singular value with a dense float64 SVD of A: (mean, covariance) of x_{t-1}."""
    U, S, Vh = torch.linalg.svd(Am, full_matrices=True)
    s = torch.zeros(D, dtype=torch.float64)
    s[: S.numel()] = torch.where(S > tol * S.max(), S, torch.zeros_like(S))
    k = S.numel()
    ybar = torch.zeros(D, dtype=torch.float64)
    ybar[:k] = torch.where(s[:k] > 0, (U.T @ y) / s[:k].clamp_min(1e-30), torch.zeros(k, dtype=torch.float64))
    c0, e = Vh @ x0, Vh @ eps
    mean, var = torch.empty(D, dtype=torch.float64), torch.empty(D, dtype=torch.float64)
    for i in range(D):
        if s[i] == 0:  # null space: DDIM
            mean[i], var[i] = a * c0[i] + sigma_t * math.sqrt(1 - eta ** 2) * e[i], (eta * sigma_t) ** 2
        elif sigma_t >= a * sigma_y / s[i]:  # lambda = 1
            mean[i], var[i] = a * ybar[i], sigma_t ** 2 - (a * sigma_y / s[i]) ** 2
        else:
            lam = s[i] * sigma_t * math.sqrt(1 - eta ** 2) / (a * sigma_y)
            mean[i], var[i] = a * (c0[i] - lam * (c0[i] - ybar[i])), (eta * sigma_t) ** 2
    return Vh.T @ mean, Vh.T @ torch.diag(var) @ Vh


@pytest.mark.parametrize("task", ["sr2", "sr2-bicubic", "blur", "inpaint-random", "denoise"])
def test_ddnm_plus_step_equals_the_paper_codes_svd_form(task):
    """One DDNM+ step (mean and noise covariance, both lambda branches and the null space) against a dense float64
    SVD of A with the formulas of the paper's code."""
    shape = SHAPE
    op = build_operator(task, shape, {"sigma": 0.6, "size": 3} if task == "blur" else {})
    g = torch.Generator().manual_seed(3)
    sigma_y, eta = 0.1, 0.85
    y = op.A(torch.randn(1, *shape, generator=g))
    m = get_method("ddnm")(op, y, DDPM(), sigma_y)
    assert m.opts["svd"] and m.opts["eta"] == 0.85  # the defaults: the paper's noisy setting
    eye_x = torch.eye(D).reshape(D, *shape)
    Am = op.A(eye_x).reshape(D, -1).T.double()
    ydim = Am.shape[0]
    eye_y = torch.eye(ydim).reshape(ydim, *op.y_shape())
    x0, eps = torch.randn(1, *shape, generator=g), torch.randn(1, *shape, generator=g)
    for abar_next in (0.02, 0.5, 0.995):
        a, sigma_t = math.sqrt(abar_next), math.sqrt(1 - abar_next)
        zx, zy = torch.zeros(1, *shape), torch.zeros(1, *op.y_shape())
        mean = m.plus_update(x0, eps, a, sigma_t, zx, zy)
        Mx = (m.plus_update(x0.expand(D, *shape), eps.expand(D, *shape), a, sigma_t, eye_x,
                            zy.expand(D, *op.y_shape())) - mean).reshape(D, D).T.double()
        m.y = y.expand(ydim, *op.y_shape())
        My = (m.plus_update(x0.expand(ydim, *shape), eps.expand(ydim, *shape), a, sigma_t,
                            zx.expand(ydim, *shape), eye_y) - mean).reshape(ydim, D).T.double()
        m.y = y
        ref_mean, ref_cov = _ddnm_plus_dense_reference(Am, x0.double().flatten(), eps.double().flatten(),
                                                       y.double().flatten(), a, sigma_t, sigma_y, eta, op.pinv_tol)
        assert torch.allclose(mean.double().flatten(), ref_mean, atol=1e-4), (task, abar_next)
        assert torch.allclose(Mx @ Mx.T + My @ My.T, ref_cov, atol=1e-4), (task, abar_next)


def test_ddnm_plus_does_not_amplify_the_noise_of_an_ill_conditioned_blur():
    """Noisy deblurring with the exact score of a Gaussian prior: A^dagger y's noise is amplified by up to 1/s_min
    (~1e3 here); the SVD form keeps the output at the prior's scale and closer to the truth than A^dagger y, where
    the simplified scalar form (DDPM posterior) lets that noise through."""
    op = build_operator("blur", SHAPE, {"sigma": 1.0, "size": 3})
    objective = DDPM({"variance": "fixed_small"})
    mu, cov = torch.zeros(D, dtype=torch.float64), 0.25 * torch.eye(D, dtype=torch.float64)
    model = GaussianEps(objective, mu, cov)
    g = torch.Generator().manual_seed(0)
    n, sigma_y = 32, 0.05
    x_true = 0.5 * torch.randn(n, *SHAPE, generator=g)
    y = op.A(x_true) + sigma_y * torch.randn(n, *SHAPE, generator=g)
    assert op.eig().min() < 1e-4  # ill-conditioned
    errs = {}
    for svd in (True, False):
        method = get_method("ddnm")(op, y, objective, sigma_y, {"svd": svd},
                                    generators=[torch.Generator().manual_seed(i) for i in range(n)])
        out = sample(model, objective, torch.randn(n, *SHAPE, generator=g), {}, solver="ddpm", steps=20,
                     step_hooks=[method])
        errs[svd] = float(((out - x_true) ** 2).mean())
    pinv_err = float(((op.pinv(y) - x_true) ** 2).mean())
    assert errs[True] < 0.25 < pinv_err, (errs, pinv_err)  # better than the prior mean (variance 0.25)
    assert errs[False] > 10 * errs[True], errs
