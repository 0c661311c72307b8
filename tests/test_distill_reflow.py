"""Reflow: pairs generated once (resumable, equal to the teacher's ODE), exact resume, learning, bad input."""

import torch

from ditk_testing import TINY, invoke_ditk
from test_distill import FAST, digest, losses
from test_distill_consistency import flow_teacher  # noqa: F401  (a module-scoped fixture)

PAIRS = ["distill.num_pairs=300", "distill.pair_steps=4"]


def test_pairs_are_the_teacher_ode_endpoints_made_once_and_resumed(flow_teacher, tmp_path):  # noqa: F811
    from safetensors.torch import load_file

    from ditk.generate import load_pipeline
    from ditk.sampling import sample

    before = digest(flow_teacher)
    args = ["digits-dit-reflow", *TINY, *PAIRS, f"distill.teacher={flow_teacher}", "train.max_steps=2",
            f"run.dir={tmp_path}", *FAST]
    invoke_ditk("distill", *args, check=True)
    folder = tmp_path / "digits-dit-reflow" / "reflow-pairs"
    chunks = sorted(folder.glob("chunk-*.safetensors"))
    assert [c.name for c in chunks] == ["chunk-00000.safetensors", "chunk-00001.safetensors"]
    first = load_file(str(chunks[1]))
    assert first["z"].shape == (44, 1, 8, 8) and first["y"].tolist()[:2] == [256 % 10, 257 % 10]
    # the endpoint is the teacher's guided Euler ODE solution from z
    pipe = load_pipeline(str(flow_teacher), device="cpu")
    cond, uncond = pipe.conditioner.cond(first["y"][:3]), pipe.conditioner.uncond(3)
    x = sample(pipe.model, pipe.objective, first["z"][:3], cond, uncond, solver="euler", steps=4, cfg_scale=2.0)
    torch.testing.assert_close(first["x"][:3], x, rtol=0, atol=1e-5)
    # a lost chunk is regenerated identically and the others are not touched
    stamp = chunks[0].stat().st_mtime_ns
    chunks[1].unlink()
    proc = invoke_ditk("distill", *args[:-2], "train.max_steps=3", f"run.dir={tmp_path}", *FAST, check=True)
    assert "generating 256 of 300" in proc.stderr
    assert chunks[0].stat().st_mtime_ns == stamp
    torch.testing.assert_close(load_file(str(chunks[1]))["x"], first["x"], rtol=0, atol=0)
    assert digest(flow_teacher) == before


def test_reflow_resumes_exactly_and_learns(flow_teacher, tmp_path):  # noqa: F811
    args = ["digits-dit-reflow", *TINY, *PAIRS, f"distill.teacher={flow_teacher}", "optim.lr=3e-3",
            f"run.dir={tmp_path}", *FAST]
    invoke_ditk("distill", *args, "run.name=full", "train.max_steps=8", check=True)
    invoke_ditk("distill", *args, "run.name=cut", "train.max_steps=3", check=True)
    invoke_ditk("distill", *args, "run.name=cut", "train.max_steps=8", check=True)
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    curve = losses(tmp_path / "full")
    assert sum(curve[-3:]) < sum(curve[:3])
    out = invoke_ditk("sample", tmp_path / "full", "--steps", "1", "--num", "2", "--no-progress", check=True)
    assert "euler1" in out.stdout


def test_reflow_on_a_ddpm_teacher_is_refused(trained_run, tmp_path):
    proc = invoke_ditk("distill", "digits-dit", *TINY, "distill.method=reflow", f"distill.teacher={trained_run}",
                       f"run.dir={tmp_path / 'runs'}", *FAST)
    assert proc.returncode == 2 and "ddpm" in proc.stderr and not (tmp_path / "runs").exists()


def test_one_step_distillation_trains_exactly_what_one_euler_step_samples():
    """Oracle: in the one-step phase the loss of pair (z, x) is ‖S(z) − x‖², S = the sampling loop's 1-step Euler."""
    from types import SimpleNamespace

    from ditk.distill.reflow import Reflow, ReflowConfig
    from ditk.models.dit import DiT
    from ditk.objectives.flow import RectifiedFlow
    from ditk.sampling import sample

    torch.manual_seed(0)
    objective = RectifiedFlow()
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10,
                learn_sigma=False).eval()
    for p in model.final_layer.parameters():
        torch.nn.init.normal_(p, std=0.1)
    m = Reflow(ReflowConfig(teacher="unused", num_pairs=4, one_step_after=5), objective, cfg=None)
    m.z, m.x, m.y = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8), torch.tensor([1, 2, 3, 4])
    m.conditioner = SimpleNamespace(cond=lambda y: {"y": y})
    rows = torch.stack([torch.full((4,), 0.3, dtype=torch.float64), torch.arange(4).double()], dim=1)
    m.begin_step(model, 4, 10)
    with torch.no_grad():
        reflow = m.training_losses(model, None, rows, None)["loss"]
        m.begin_step(model, 5, 10)
        one_step = m.training_losses(model, None, rows, None)["loss"]
        x_hat = sample(model, objective, m.z, {"y": m.y}, solver="euler", steps=1)
    torch.testing.assert_close(one_step, ((x_hat - m.x) ** 2).flatten(1).mean(1))
    assert not torch.allclose(reflow, one_step)


def test_one_step_phase_resumes_exactly_across_the_switch_and_lpips_is_refused(flow_teacher, tmp_path):  # noqa: F811
    args = ["digits-dit-reflow", *TINY, *PAIRS, f"distill.teacher={flow_teacher}", "optim.lr=3e-3",
            "distill.one_step_after=3", f"run.dir={tmp_path}", *FAST]
    invoke_ditk("distill", *args, "run.name=full", "train.max_steps=6", check=True)
    invoke_ditk("distill", *args, "run.name=cut", "train.max_steps=4", check=True)
    invoke_ditk("distill", *args, "run.name=cut", "train.max_steps=6", check=True)
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    proc = invoke_ditk("distill", *args, "distill.one_step_loss=lpips", "run.name=lp", "train.max_steps=1")
    assert proc.returncode == 2 and "LPIPS" in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "lp").exists()
