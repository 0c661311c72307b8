"""DMD2: the DM gradient (zero when fake = real, its normalisation), backward simulation, TTUR state, the CLI."""

import copy
from types import SimpleNamespace

import torch

from ditk_testing import TINY, invoke_ditk
from test_distill import FAST, digest, losses, small_student


def tiny(seed=0):
    from ditk.models.dit import DiT

    torch.manual_seed(seed)
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10,
                learn_sigma=True)
    for p in model.final_layer.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model


def method(**options):
    from ditk.distill.dmd2 import DMD2, DMD2Config
    from ditk.objectives.ddpm import DDPM

    m = DMD2(DMD2Config(teacher="unused", **options), DDPM(), cfg=None)
    m.conditioner = SimpleNamespace(unconditional=False, uncond=lambda n, device=None: {"y": torch.full((n,), 10)})
    return m


def test_dm_gradient_is_zero_when_the_fake_score_is_the_real_score():
    from ditk.distill.dmd2 import dm_gradient, dm_loss

    m = method(real_guidance=1.0)
    m.teacher, generator = tiny(0), tiny(1)
    m.fake = copy.deepcopy(m.teacher)
    z, cond = torch.randn(4, 1, 8, 8), {"y": torch.tensor([1, 2, 3, 4])}
    x = m.generate(generator, z, torch.zeros(4, dtype=torch.long), cond, torch.Generator().manual_seed(0))
    x_t = m.noised(x.detach(), torch.tensor([100, 300, 500, 900]), torch.randn_like(x))
    t = torch.tensor([100, 300, 500, 900])
    grad = dm_gradient(x.detach(), m.x0_pred(m.teacher, x_t, t, cond), m.x0_pred(m.fake, x_t, t, cond))
    assert grad.abs().max() == 0
    dm_loss(x, grad).sum().backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in generator.parameters())
    # ... and not zero once the fake score differs (here: the real score guided)
    m.options.real_guidance = 3.0
    grad = dm_gradient(x.detach(), m.x0_pred(m.teacher, x_t, t, cond, 3.0), m.x0_pred(m.fake, x_t, t, cond))
    assert grad.abs().max() > 0


def test_dm_gradient_normalisation_and_the_loss_gradient():
    from ditk.distill.dmd2 import dm_gradient, dm_loss

    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]], requires_grad=True)
    p_real, p_fake = torch.tensor([[0.0, 2.0, 2.0, 4.0]]), torch.tensor([[1.0, 1.0, 2.0, 6.0]])
    grad = dm_gradient(x.detach(), p_real, p_fake)
    torch.testing.assert_close(grad, (p_fake - p_real) / 0.5)  # mean |x - p_real| = (1 + 0 + 1 + 0) / 4
    dm_loss(x, grad).sum().backward()
    torch.testing.assert_close(x.grad, grad / 4)  # descent moves x along -(p_fake - p_real): toward the real score
    assert dm_gradient(p_real, p_real, p_fake).isfinite().all()  # 0 / 0 -> 0


def test_backward_simulation_feeds_each_stage_the_generator_s_own_renoised_output():
    m = method(generator_timesteps=[999, 749, 499, 249])
    generator, cond = tiny(2), {"y": torch.tensor([5, 6])}
    z = torch.randn(2, 1, 8, 8)
    got = m.generate(generator, z, torch.tensor([2, 0]), cond, torch.Generator().manual_seed(7), grad=False)
    g = torch.Generator().manual_seed(7)
    x = z
    with torch.no_grad():
        for k in range(2):
            x0 = m.x0_pred(generator, x, torch.full((2,), [999, 749][k]), cond)
            x = m.noised(x0, torch.full((2,), [749, 499][k]), torch.randn(x.shape, generator=g))
        want = m.x0_pred(generator, x, torch.tensor([499, 499]), cond)[0]
        want0 = m.x0_pred(generator, z, torch.tensor([999, 999]), cond)[1]
    torch.testing.assert_close(got[0], want)
    torch.testing.assert_close(got[1], want0)  # stage 0: straight from the noise


def test_dmd2_runs_resumes_exactly_and_leaves_the_teacher_untouched(trained_run, tmp_path):
    before = digest(trained_run)
    student = small_student(tmp_path, depth=1, hidden_size=32, num_heads=2)
    args = ["digits-dit-dmd2", *TINY, f"distill.teacher={trained_run}", f"distill.student={student}", "distill.ratio=2",
            "distill.gan_weight=0", "sample.steps=1",
            "optim.lr=1e-3", "train.global_batch_size=8", f"run.dir={tmp_path}", *FAST]
    invoke_ditk("distill", *args, "run.name=full", "train.max_steps=6", check=True)
    invoke_ditk("distill", *args, "run.name=cut", "train.max_steps=3", check=True)
    invoke_ditk("distill", *args, "run.name=cut", "train.max_steps=6", check=True)
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    state = torch.load(tmp_path / "full" / "checkpoints" / "step-000006" / "state.pt", weights_only=True)
    assert "fake" in state["objective"] and "fake_opt" in state["objective"]
    assert digest(trained_run) == before
    out = invoke_ditk("sample", tmp_path / "full", "--num", "2", "--no-progress", check=True)
    assert "lcm1" in out.stdout


def test_a_generator_grid_the_lcm_sampler_does_not_visit_is_refused(trained_run, tmp_path):
    proc = invoke_ditk("distill", "digits-dit-dmd2", *TINY, f"distill.teacher={trained_run}", "sample.steps=4",
                       "distill.generator_timesteps=[999,749,499,249]", "sample.solver_options.timesteps=null",
                       f"run.dir={tmp_path / 'runs'}", *FAST)
    assert proc.returncode == 2 and "[999, 759, 499, 259]" in proc.stderr and not (tmp_path / "runs").exists()


class AffineGenerator(torch.nn.Module):
    """A one-step flow generator x̂0 = z - v(z, 1) = a z + b (v = z - (a z + b))."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Parameter(torch.tensor(1.0)), torch.nn.Parameter(torch.tensor(0.0))

    def forward(self, z, t_model):
        return z - (self.a * z + self.b)


def test_dmd2_matches_a_gaussian_teacher_s_distribution():
    """Oracle: the real score is the exact velocity of N(mu, s^2) data (per coordinate, 16 coordinates), the fake
    score an MLP-affine velocity trained by the method (TTUR 5:1, from scratch), the generator x = a z + b from
    N(0, 1) noise. Distribution matching drives (a, b) from (1, 0) to (s, mu)."""
    from ditk.distill.dmd2 import DMD2, DMD2Config
    from ditk.objectives.flow import RectifiedFlow
    from test_distill_consistency import AffineVelocity, GaussianFlow

    torch.manual_seed(0)
    mu, s = 2.0, 0.5
    m = DMD2(DMD2Config(teacher="unused", generator_timesteps=[1.0], real_guidance=1.0, ratio=5),
             RectifiedFlow({"time_sampling": "uniform"}), cfg=None)
    m.teacher, m.fake = GaussianFlow(mu, s), AffineVelocity()
    m.fake_opt = torch.optim.Adam(m.fake.parameters(), lr=1e-2)
    generator = AffineGenerator()
    opt = torch.optim.Adam(generator.parameters(), lr=2e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        loss = m.training_losses(generator, None, m.sample_time(64, g), torch.randn(64, 16, 1, 1, generator=g), {})
        opt.zero_grad()
        loss["loss"].mean().backward()
        opt.step()
    assert abs(generator.a.item() - s) < 0.03 and abs(generator.b.item() - mu) < 0.05, (generator.a, generator.b)


# -- the optional GAN head -------------------------------------------------------------------------------------------


def test_gan_losses_are_dmd2_s_softplus_and_the_hinge_loss():
    from ditk.distill.dmd2 import discriminator_loss, generator_gan_loss

    r, f = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    sp = lambda v: torch.log1p(torch.exp(v))  # noqa: E731
    torch.testing.assert_close(discriminator_loss(r, f, "nonsaturating"), sp(f) + sp(-r))
    torch.testing.assert_close(generator_gan_loss(f, "nonsaturating"), sp(-f))
    torch.testing.assert_close(discriminator_loss(r, f, "hinge"), torch.tensor([0.0 + 1.5, 2.0 + 0.0]))
    torch.testing.assert_close(generator_gan_loss(f, "hinge"), -f)


def gan_method(**options):
    m = method(real_guidance=1.0, ratio=1, gan_weight=1.0, gan_max_t=0.1, **options)
    m.run_cfg = SimpleNamespace(optim=SimpleNamespace(lr=3e-3, betas=[0.0, 0.999], weight_decay=0.0),
                                run=SimpleNamespace(seed=0))
    import ditk.distill.dmd2 as dmd2

    teacher = tiny(0)
    orig = dmd2.Distiller.attach
    dmd2.Distiller.attach = lambda self, **kw: setattr(self, "teacher", teacher)
    try:
        m.attach(device="cpu")
    finally:
        dmd2.Distiller.attach = orig
    return m


def test_the_gan_head_learns_to_tell_real_images_from_the_generator_s():
    m = gan_method()
    generator, cond = tiny(3), {"y": torch.arange(8) % 10}
    real = torch.ones(8, 1, 8, 8)  # the "data": flat bright images; the generator makes something else
    g = torch.Generator().manual_seed(0)

    def margin():
        with torch.no_grad():
            x = m.generate(generator, torch.randn(8, 1, 8, 8, generator=g), torch.zeros(8, dtype=torch.long), cond, g,
                           grad=False)
            return float(m.realism(real, cond, g).mean() - m.realism(x, cond, g).mean())

    before = margin()
    for _ in range(25):
        m.fake_update(generator, 8, (1, 8, 8), cond, g, "cpu", real=real)
    assert margin() > before + 1.0, (before, margin())


def test_the_generator_s_gan_loss_reaches_only_the_generator():
    m = gan_method()
    generator, cond = tiny(3), {"y": torch.arange(4) % 10}
    t = m.sample_time(4, torch.Generator().manual_seed(0))
    out = m.training_losses(generator, torch.ones(4, 1, 8, 8), t, torch.randn(4, 1, 8, 8), cond)
    assert {"gan_loss", "head_loss", "fake_loss"} <= set(out)
    m.fake_opt.zero_grad(set_to_none=True)
    out["loss"].mean().backward()
    assert all(p.grad is None for p in [*m.fake.parameters(), *m.head.parameters()])
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in generator.parameters())
    assert all(p.requires_grad for p in [*m.fake.parameters(), *m.head.parameters()])  # restored for the fake update


def test_dmd2_with_the_gan_head_runs_and_resumes_exactly(trained_run, tmp_path):
    student = small_student(tmp_path, depth=1, hidden_size=32, num_heads=2)
    args = ["digits-dit-dmd2", *TINY, f"distill.teacher={trained_run}", f"distill.student={student}", "distill.ratio=2",
            "distill.gan_weight=3e-3", "distill.gan_loss=hinge", "sample.steps=1", "optim.lr=1e-3",
            "train.global_batch_size=8", f"run.dir={tmp_path}", *FAST]
    invoke_ditk("distill", *args, "run.name=full", "train.max_steps=4", check=True)
    invoke_ditk("distill", *args, "run.name=cut", "train.max_steps=3", check=True)
    invoke_ditk("distill", *args, "run.name=cut", "train.max_steps=4", check=True)
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    state = torch.load(tmp_path / "full" / "checkpoints" / "step-000004" / "state.pt", weights_only=True)
    assert "gan_head" in state["objective"]


def test_missing_real_data_is_one_line_naming_the_data_source(trained_run, tmp_path):
    proc = invoke_ditk("distill", "digits-dit-dmd2", *TINY, f"distill.teacher={trained_run}", "distill.gan_weight=3e-3",
                       "data.name=image-folder", "data.path=???", f"run.dir={tmp_path / 'runs'}", *FAST)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "GAN head" in proc.stderr and "data.path" in proc.stderr and "image-folder" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_a_one_step_generator_at_t_399_samples_on_its_own_timestep(trained_run, tmp_path):
    """DMD2's 1-step SD recipe conditions the generator on t = 399: the lcm sampler takes that grid as
    solver_options.timesteps, and the check compares it with the generator's."""
    args = ["digits-dit-dmd2", *TINY, f"distill.teacher={trained_run}", "distill.generator_timesteps=[399]",
            "sample.steps=1", "distill.gan_weight=0", f"run.dir={tmp_path}", *FAST]
    proc = invoke_ditk("distill", *args, "train.max_steps=1", "sample.solver_options.timesteps=null")
    assert proc.returncode == 2 and "[999]" in proc.stderr
    invoke_ditk("distill", *args, "train.max_steps=1", check=True)  # the preset's solver_options.timesteps=[399]
    from ditk.generate import load_pipeline
    from ditk.sampling import SOLVERS

    pipe = load_pipeline(str(tmp_path / "digits-dit-dmd2"), device="cpu")
    scheduler = SOLVERS.get("lcm").builder(pipe.objective, 1, **dict(pipe.cfg.sample.solver_options))
    assert scheduler.timesteps.tolist() == [399]
