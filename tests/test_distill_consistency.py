"""Consistency distillation: the boundary condition, LCM's scalings, the exact 1-D flow map, and the CLI."""

import json
from types import SimpleNamespace

import pytest
import torch

from ditk_testing import TINY, invoke_ditk
from test_distill import FAST, digest, losses, small_student


def method(objective, **options):
    from ditk.distill.consistency import Consistency, ConsistencyConfig

    opts = ConsistencyConfig(teacher="unused", **options)
    if objective.name == "rectified-flow" and "teacher_solver" not in options:
        opts.teacher_solver = "euler"
    return Consistency(opts, objective, cfg=None)


def test_boundary_condition_is_exact_for_ddpm_and_flow():
    from ditk.models.dit import DiT
    from ditk.objectives.ddpm import DDPM
    from ditk.objectives.flow import RectifiedFlow

    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10,
                learn_sigma=True)
    for p in model.parameters():  # a model whose output is far from 0, so the boundary is not trivially met
        torch.nn.init.normal_(p, std=0.2)
    x, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])
    for objective in (DDPM(), RectifiedFlow()):
        cm = method(objective)
        t_min = torch.zeros(3, dtype=torch.long if objective.name == "ddpm" else torch.float32)
        assert torch.equal(cm.consistency_function(model, x, t_min, {"y": y}), x)
        later = cm.consistency_function(model, x, t_min + (999 if objective.name == "ddpm" else 1), {"y": y})
        assert not torch.allclose(later, x)


def test_boundary_scalings_are_diffusers_lcm_scheduler_s():
    from diffusers import LCMScheduler

    from ditk.distill.consistency import boundary_scalings

    scheduler = LCMScheduler()
    for t in (0, 19, 259, 999):
        c_skip, c_out = boundary_scalings(torch.tensor(t))
        ref_skip, ref_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
        assert abs(float(c_skip) - ref_skip) < 1e-12 and abs(float(c_out) - ref_out) < 1e-12


def test_grid_is_lcm_s_skip_step_ddim_grid():
    from ditk.objectives.ddpm import DDPM

    later, earlier = method(DDPM()).times(torch.arange(50))
    assert later[:3].tolist() == [19, 39, 59] and later[-1] == 999
    assert earlier[:3].tolist() == [0, 19, 39]


class GaussianFlow(torch.nn.Module):
    """The exact velocity of the rectified flow from x0 ~ N(mu, s^2) (1-D): z_t = (1 - t) x0 + t eps,
    v(z, t) = E[eps - x0 | z_t = z] = (t - (1 - t) s^2) / V(t) (z - (1 - t) mu) - mu, V = (1 - t)^2 s^2 + t^2."""

    def __init__(self, mu, s):
        super().__init__()
        self.mu, self.s = mu, s

    def forward(self, z, t_model):
        t = (t_model / 1000.0).view(-1, 1, 1, 1)
        var = (1 - t) ** 2 * self.s**2 + t**2
        return (t - (1 - t) * self.s**2) / var * (z - (1 - t) * self.mu) - self.mu


class AffineVelocity(torch.nn.Module):
    """Student v(z, t) = a(t) z + b(t), a and b an MLP of t (the exact v is affine in z)."""

    def __init__(self, hidden=64):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(1, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, hidden),
                                       torch.nn.SiLU(), torch.nn.Linear(hidden, 2))

    def forward(self, z, t_model):
        ab = self.net((t_model / 1000.0).view(-1, 1))
        return ab[:, 0].view(-1, 1, 1, 1) * z + ab[:, 1].view(-1, 1, 1, 1)


def test_one_step_map_approaches_the_exact_flow_map_of_a_gaussian_teacher():
    """CD of the exact Gaussian flow: the student's one-step map f(eps, 1) = eps - v(eps, 1) converges to the exact
    ODE map eps -> mu + s eps (the probability-flow map of a Gaussian is this monotone affine transport)."""
    import copy

    from ditk.objectives.flow import RectifiedFlow

    torch.manual_seed(0)
    mu, s = 2.0, 0.5
    cm = method(RectifiedFlow({"time_sampling": "uniform"}), num_ddim_timesteps=10, teacher_solver="heun", loss="l2")
    student = AffineVelocity()
    cm.teacher, cm.ema = GaussianFlow(mu, s), copy.deepcopy(student).requires_grad_(False)
    eps = torch.linspace(-2, 2, 41).view(-1, 1, 1, 1)

    def map_error():
        with torch.no_grad():
            one_step = cm.consistency_function(student, eps, torch.ones(len(eps)), {})
        return (one_step - (mu + s * eps)).abs().max().item()

    before = map_error()
    steps = 600
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        x0 = mu + s * torch.randn(256, 1, 1, 1, generator=g)
        noise = torch.randn(256, 1, 1, 1, generator=g)
        loss = cm.training_losses(student, x0, cm.sample_time(256, g), noise, {})["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        # The target network is the student without gradient (EMA decay 0: LCM-LoRA's and iCT's choice); with
        # LCM's 0.95 the bootstrap from t = 0 to t = 1 takes several times more steps than a unit test affords.
        cm.ema.load_state_dict(student.state_dict())
    after = map_error()
    assert before > 1.0 and after < 0.05, (before, after)  # the Heun teacher's own error at N = 10 is 0.004


@pytest.fixture(scope="module")
def flow_teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    invoke_ditk("train", "digits-dit-flow", *TINY, "train.max_steps=3", f"run.dir={root}", "--no-progress", check=True)
    return root / "digits-dit-flow"


def test_cd_student_runs_resumes_exactly_learns_and_samples_with_lcm(trained_run, tmp_path):
    before = digest(trained_run)
    student = small_student(tmp_path, depth=1, hidden_size=32, num_heads=2)
    args = ["digits-dit-cd", *TINY, f"distill.teacher={trained_run}", f"distill.student={student}", "optim.lr=3e-3",
            "distill.loss=l2", f"run.dir={tmp_path}", *FAST]
    invoke_ditk("distill", *args, "run.name=full", "train.max_steps=8", check=True)
    invoke_ditk("distill", *args, "run.name=cut", "train.max_steps=3", check=True)
    invoke_ditk("distill", *args, "run.name=cut", "train.max_steps=8", check=True)
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    curve = losses(tmp_path / "full")
    assert sum(curve[-3:]) < sum(curve[:3])
    assert digest(trained_run) == before
    out = invoke_ditk("sample", tmp_path / "full", "--num", "2", "--no-progress", check=True).stdout.strip()
    report = json.loads((tmp_path / "full" / "generated").joinpath(out.split("/")[-1], "report.json").read_text())
    assert "lcm5" in out and report["generated_now"] == 2  # the preset's solver, TINY's 5 steps


def test_cd_of_a_flow_teacher_samples_in_one_step(flow_teacher, tmp_path):
    invoke_ditk("distill", "digits-dit-flow", *TINY, "distill.method=consistency", "distill.teacher_solver=euler",
                f"distill.teacher={flow_teacher}", "train.max_steps=2", "sample.solver=lcm", "sample.cfg_scale=1",
                f"run.dir={tmp_path}", *FAST, check=True)
    out = invoke_ditk("sample", tmp_path / "digits-dit-flow", "--steps", "1", "--num", "2", "--no-progress", check=True)
    assert "lcm1" in out.stdout


def test_guidance_on_an_unconditional_teacher_is_refused(tmp_path):
    root = tmp_path / "t"
    invoke_ditk("train", "digits-dit-uncond", *TINY, "train.max_steps=1", f"run.dir={root}", "--no-progress", check=True)
    proc = invoke_ditk("distill", "digits-dit-uncond", *TINY, "distill.method=consistency", "distill.guidance_scale=3",
                       f"distill.teacher={root / 'digits-dit-uncond'}", f"run.dir={tmp_path / 'runs'}", *FAST)
    assert proc.returncode == 2 and "unconditional" in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_a_flow_teacher_with_the_ddim_teacher_solver_is_refused(flow_teacher, tmp_path):
    proc = invoke_ditk("distill", "digits-dit-flow", *TINY, "distill.method=consistency",
                       f"distill.teacher={flow_teacher}", f"run.dir={tmp_path / 'runs'}", *FAST)
    assert proc.returncode == 2 and "teacher_solver" in proc.stderr and not (tmp_path / "runs").exists()
