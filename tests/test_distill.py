"""`ditk distill`: the command, its bad-input errors, and the kd method (function and CLI)."""

import copy
import hashlib
import json

import pytest
import torch

from ditk_testing import TINY, invoke_ditk

FAST = ["optim.warmup_steps=0", "--no-progress"]


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def digest(run):
    h = hashlib.sha256()
    for f in sorted((run / "checkpoints").rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def small_student(tmp_path, **model):
    path = tmp_path / "student.yaml"
    body = "\n".join(f"  {k}: {v}" for k, v in model.items())
    path.write_text(f"base: digits-dit\nmodel:\n{body}\n")
    return str(path)


# -- the kd function ------------------------------------------------------------------------------------------------


def tiny_dit(depth=2, seed=0):
    from ditk.models.dit import DiT

    torch.manual_seed(seed)
    return DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=depth, num_heads=2, num_classes=10,
               learn_sigma=True)


def batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.rand(n, generator=g) * 999, torch.randint(0, 10, (n,), generator=g)


def test_kd_loss_is_zero_for_the_teacher_itself_and_positive_otherwise():
    from ditk.distill.kd import kd_loss

    teacher = tiny_dit().eval()
    x, t, y = batch()
    for p in teacher.final_layer.parameters():  # DiT's zero-initialised head would make every output 0
        torch.nn.init.normal_(p, std=0.1)
    same = kd_loss(copy.deepcopy(teacher), teacher, x, t, {"y": y}, feature_weight=1.0)
    assert same["out_kd"].abs().max() == 0 and same["feat"].abs().max() == 0
    other = tiny_dit(seed=1)
    for p in other.final_layer.parameters():
        torch.nn.init.normal_(p, std=0.1)
    diff = kd_loss(other, teacher, x, t, {"y": y}, target=torch.zeros_like(x), out_weight=0.9, diff_weight=0.1,
                   feature_weight=0.5)
    assert (diff["out_kd"] > 0).all() and (diff["feat"] > 0).all()
    # loss = 0.9 out_kd + 0.1 diff + 0.5 feat, per sample
    torch.testing.assert_close(diff["loss"].detach(), 0.9 * diff["out_kd"] + 0.1 * diff["diff"] + 0.5 * diff["feat"])
    diff["loss"].mean().backward()
    assert other.blocks[0].adaLN_modulation[1].weight.grad.abs().sum() > 0  # the feature term reaches block 0
    assert all(p.grad is None for p in teacher.parameters())


def test_feature_mask_drops_massive_activations_and_the_proportional_map():
    from ditk.distill.kd import massive_activation_mask, proportional_block_map

    h = torch.zeros(2, 4, 8)
    h[0, 1, 3] = 100.0  # one massive activation
    h += torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(0)) * 0.1
    mask = massive_activation_mask(h, 2.0)
    assert mask[0, 1, 3] == 0 and mask.sum() == h.numel() - 1
    assert massive_activation_mask(h, 0).sum() == h.numel()
    assert proportional_block_map(2, 4) == [1, 3] and proportional_block_map(4, 4) == [0, 1, 2, 3]
    assert proportional_block_map(3, 28)[-1] == 27


def test_feature_kd_drops_a_massive_activation_from_the_loss():
    """A student block that matches the teacher's except for massive activations: masked (2 sigma) they cost
    ~nothing, unmasked they dominate the loss."""
    from ditk.distill.kd import FeatureKD

    teacher, student = tiny_dit().eval(), tiny_dit(depth=1).eval()
    h_t = torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(0))
    h_s = h_t.clone()
    h_s[:, 0, 0] += 1e3
    results = {}
    for k in (2.0, 0.0):
        with FeatureKD(student, teacher, block_map=[0], mask_sigma=k) as fkd:
            fkd.h_s[0], fkd.h_t[0] = h_s, h_t
            results[k] = fkd.loss()
    assert results[2.0].shape == (4,)
    assert results[2.0].max() < 1.0 and results[0.0].min() > 1e3  # masked: the scale of h (unit variance), not 1e3^2/512


# -- the command --------------------------------------------------------------------------------------------------------


def test_kd_student_runs_resumes_exactly_and_leaves_the_teacher_untouched(trained_run, tmp_path):
    before = digest(trained_run)
    student = small_student(tmp_path, depth=1, hidden_size=32, num_heads=2)
    args = ["digits-dit", *TINY, "distill.method=kd", f"distill.teacher={trained_run}", f"distill.student={student}",
            "optim.lr=3e-3", f"run.dir={tmp_path}", *FAST]
    full = invoke_ditk("distill", *args, "run.name=full", "train.max_steps=8", check=True)
    assert full.stdout == f"{tmp_path / 'full'}\n"
    invoke_ditk("distill", *args, "run.name=cut", "train.max_steps=3", check=True)
    invoke_ditk("distill", *args, "run.name=cut", "train.max_steps=8", check=True)
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    curve = losses(tmp_path / "full")
    assert sum(curve[-3:]) < sum(curve[:3])  # the student learns the teacher
    lineage = json.loads((tmp_path / "full" / "lineage.json").read_text())
    assert lineage["parent"] == str(trained_run.resolve())
    cfg = (tmp_path / "full" / "config.yaml").read_text()
    assert "method: kd" in cfg and "depth: 1" in cfg
    assert digest(trained_run) == before  # the teacher is never written
    out = invoke_ditk("sample", tmp_path / "full", "--num", "2", "--no-progress", check=True)
    assert (tmp_path / "full" / "generated").is_dir() and out.stdout.strip()


@pytest.mark.parametrize("extra, message", [
    (["distill.teacher=/nonexistent/run"], "does not exist"),
    (["model.hidden_size=48"], "different architecture"),
    (["objective.variance=fixed_small", "model.learn_sigma=false"], "objective.variance"),
    (["distill.student={wide}", "train.init_from={teacher}"], "wider than"),
    (["distill.method=nope"], "unknown distillation method"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(trained_run, tmp_path, extra, message):
    wide = small_student(tmp_path, depth=2, hidden_size=64, num_heads=2)
    extra = [e.format(wide=wide, teacher=trained_run) for e in extra]
    args = ["digits-dit", *TINY, "distill.method=kd", f"distill.teacher={trained_run}", *extra]
    proc = invoke_ditk("distill", *args, f"run.dir={tmp_path / 'runs'}", *FAST)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_a_preset_without_distill_section_says_how():
    proc = invoke_ditk("distill", "digits-dit", "--no-progress")
    assert proc.returncode == 2 and "distill.method" in proc.stderr


@pytest.mark.parametrize("preset, method, params", [
    ("dit-xl-2-lcm", "consistency", 675.1e6), ("dit-xl-2-dmd2", "dmd2", 675.1e6),
    ("digits-dit-cd", "consistency", None), ("digits-dit-dmd2", "dmd2", None),
    ("digits-dit-progressive", "progressive", None), ("digits-dit-reflow", "reflow", None),
    ("digits-dit-lcm", "consistency", None),
])
def test_distill_presets_build_and_validate(preset, method, params):
    """Every distill preset resolves (the paper-scale ones with their required paths given), its method accepts
    its options, and the student model builds (on the meta device: DiT-XL/2 is 675.1M, the paper's 675M)."""
    from ditk.build import build_model, build_objective
    from ditk.config import resolve
    from ditk.distill import build_method

    paths = ["data.path=/data", "autoencoder.path=/vae"] if params else []
    cfg = resolve(preset, ["distill.teacher=/teacher", *paths])
    assert cfg.distill.method == method
    build_method(cfg, build_objective(cfg))
    if params:
        with torch.device("meta"):
            model = build_model(cfg)
        assert abs(sum(p.numel() for p in model.parameters()) - params) < 0.1e6


def test_presets_show_prints_a_distill_preset_with_its_required_teacher_marked():
    proc = invoke_ditk("presets", "show", "dit-xl-2-lcm", check=True)
    assert "method: consistency" in proc.stdout and "teacher: ???" in proc.stdout
