"""Progressive distillation: the closed-form two-step target, the halving grid, rounds across resumes, the CLI."""

import pytest
import torch

from ditk_testing import TINY, invoke_ditk
from test_distill import FAST, digest, losses, small_student
from test_distill_consistency import flow_teacher  # noqa: F401  (a module-scoped fixture)


def method(**options):
    from ditk.distill.progressive import Progressive, ProgressiveConfig
    from ditk.objectives.ddpm import DDPM

    return Progressive(ProgressiveConfig(teacher="unused", **options), DDPM(), cfg=None)


def test_one_student_step_equals_two_teacher_steps_at_the_target():
    """With x̂ = x̃ (the target), one DDIM step a -> c lands exactly where the teacher's two steps a -> b -> c do."""
    from ditk.distill.progressive import ddim_step, two_step_target
    from ditk.models.dit import DiT

    torch.manual_seed(0)
    teacher = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10,
                  learn_sigma=True).double().eval()
    for p in teacher.parameters():
        torch.nn.init.normal_(p, std=0.1)
    pd = method(teacher_steps=8, student_steps=4)
    z = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    cond = {"y": torch.tensor([0, 1, 2, 3])}
    b = lambda v: v.view(-1, 1, 1, 1)  # noqa: E731
    for i in (1, 2, 3, 4):  # 4 = from the pure-noise end; 1 = the last step, onto the data (sigma_c = 0)
        idx = torch.full((4,), i)
        (t_a, a_a, s_a), (t_b, a_b, s_b), (t_c, a_c, s_c) = (pd.point(2 * idx - k, 8) for k in (0, 1, 2))
        with torch.no_grad():
            x_a = pd.predict_x0(teacher, z, t_a, a_a, s_a, cond, 1.0)
            z_b = ddim_step(z, x_a, b(a_a), b(s_a), b(a_b), b(s_b))
            x_b = pd.predict_x0(teacher, z_b, t_b, a_b, s_b, cond, 1.0)
            z_c = ddim_step(z_b, x_b, b(a_b), b(s_b), b(a_c), b(s_c))
        target = two_step_target(z, z_c, b(a_a), b(s_a), b(a_c), b(s_c))
        torch.testing.assert_close(ddim_step(z, target, b(a_a), b(s_a), b(a_c), b(s_c)), z_c, rtol=0, atol=1e-10)
        # the teacher's own single step does not land there
        assert not torch.allclose(ddim_step(z, x_a, b(a_a), b(s_a), b(a_c), b(s_c)), z_c)


def test_grid_halves_and_is_ddim_trailing_at_the_final_steps():
    from diffusers import DDIMScheduler

    pd = method(teacher_steps=16, student_steps=2)
    assert pd.rounds == 3 and [pd.steps_of_round(r) for r in range(3)] == [16, 8, 4]
    t16 = pd.point(torch.arange(16, 0, -1), 16)[0]
    t8 = pd.point(torch.arange(8, 0, -1), 8)[0]
    assert t8.tolist() == t16[::2].tolist()  # the student's grid is every other teacher point
    scheduler = DDIMScheduler(timestep_spacing="trailing")
    for n in (1, 2, 4, 8):
        scheduler.set_timesteps(n)
        assert pd.point(torch.arange(n, 0, -1), n)[0].tolist() == scheduler.timesteps.tolist()


def test_bad_step_counts_are_refused():
    from ditk.errors import ConfigError

    for teacher, student in ((8, 3), (12, 4), (4, 4)):
        with pytest.raises(ConfigError, match="power of 2"):
            method(teacher_steps=teacher, student_steps=student)


def test_rounds_resume_exactly_and_the_teacher_is_untouched(trained_run, tmp_path):
    before = digest(trained_run)
    args = ["digits-dit-progressive", *TINY, f"distill.teacher={trained_run}", "distill.teacher_steps=16",
            "distill.student_steps=2", "distill.steps_per_round=3", "train.ckpt_every=2", f"run.dir={tmp_path}", *FAST]
    invoke_ditk("distill", *args, "run.name=full", "train.max_steps=8", check=True)
    invoke_ditk("distill", *args, "run.name=cut", "train.max_steps=4", check=True)  # stops inside round 1
    invoke_ditk("distill", *args, "run.name=cut", "train.max_steps=8", check=True)
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    state = torch.load(tmp_path / "full" / "checkpoints" / "step-000008" / "state.pt", weights_only=True)
    assert state["objective"]["round"] == 2 and "teacher" in state["objective"]
    assert digest(trained_run) == before
    out = invoke_ditk("sample", tmp_path / "full", "--num", "2", "--steps", "2", "--no-progress", check=True)
    assert "ddim2" in out.stdout


def test_a_fresh_student_learns(trained_run, tmp_path):
    student = small_student(tmp_path, depth=1, hidden_size=32, num_heads=2)
    invoke_ditk("distill", "digits-dit-progressive", *TINY, f"distill.teacher={trained_run}", f"distill.student={student}",
                "distill.teacher_steps=8", "distill.student_steps=4", "optim.lr=3e-3", "train.max_steps=8",
                f"run.dir={tmp_path}", *FAST, check=True)
    curve = losses(tmp_path / "digits-dit-progressive")
    assert sum(curve[-3:]) < sum(curve[:3])


def test_progressive_on_a_flow_teacher_is_refused(flow_teacher, tmp_path):  # noqa: F811
    proc = invoke_ditk("distill", "digits-dit-flow", *TINY, "distill.method=progressive",
                       f"distill.teacher={flow_teacher}", f"run.dir={tmp_path / 'runs'}", *FAST)
    assert proc.returncode == 2 and "rectified-flow" in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "runs").exists()
