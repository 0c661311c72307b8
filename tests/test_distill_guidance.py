"""LCM's embedded guidance: the w-embedding (ditk.models.guidance), consistency with distill.guidance_range, and
`ditk sample --cfg-scale W` feeding W to the student in one forward per step."""

import copy

import pytest
import torch

from ditk_testing import TINY, invoke_ditk
from test_distill import FAST, losses
from test_distill_consistency import method


def tiny(embed: bool, seed=0):
    from ditk.models.dit import DiT
    from ditk.models.guidance import add_guidance_embedding

    torch.manual_seed(seed)
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    for p in model.parameters():  # a teacher whose output is far from 0
        torch.nn.init.normal_(p, std=0.1)
    return add_guidance_embedding(model) if embed else model


def inputs(n=3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=g), torch.tensor([10.0, 500.0, 990.0][:n]), torch.tensor([1, 2, 3][:n])


def test_the_w_embedding_is_diffusers_lcm_s():
    from diffusers import LatentConsistencyModelPipeline

    from ditk.models.guidance import guidance_scale_embedding

    w = torch.tensor([1.0, 2.5, 8.0, 15.0])
    for dim in (256, 31):
        want = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
        torch.testing.assert_close(guidance_scale_embedding(w, dim), want, rtol=0, atol=1e-6)


def test_a_zero_init_student_equals_its_teacher_exactly_for_every_w():
    from ditk.models.convert import load_state_dict_checked

    teacher, student = tiny(False), tiny(True, seed=5)
    load_state_dict_checked(student, student.convert_state_dict(teacher.state_dict()), "teacher")
    x, t, y = inputs()
    with torch.no_grad():
        want = teacher(x, t, y=y)
        for w in (1.0, 2.0, 7.5):
            assert torch.equal(student(x, t, y=y, w=torch.full((3,), w)), want)
    with pytest.raises(Exception, match="embeds the guidance scale"):
        student(x, t, y=y)  # a missing w is an error, not a silent w = 0


def test_the_ema_copy_uses_its_own_embedding_weights():
    student = tiny(True)
    for p in student.t_embedder.w_embedder.parameters():
        torch.nn.init.normal_(p, std=0.5)
    ema = copy.deepcopy(student)
    x, t, y = inputs()
    w = torch.tensor([1.0, 3.0, 6.0])
    with torch.no_grad():
        same = torch.equal(ema(x, t, y=y, w=w), student(x, t, y=y, w=w))
        torch.nn.init.zeros_(ema.t_embedder.w_embedder.mlp[2].weight)
        torch.nn.init.zeros_(ema.t_embedder.w_embedder.mlp[2].bias)
        changed = not torch.allclose(ema(x, t, y=y, w=w), student(x, t, y=y, w=w))
    assert same and changed


def test_sampling_feeds_cfg_scale_as_w_in_one_forward_per_step():
    from ditk.objectives.ddpm import DDPM
    from ditk.sampling import sample

    student = tiny(True).eval()
    for p in student.t_embedder.w_embedder.parameters():
        torch.nn.init.normal_(p, std=0.5)
    calls = []
    student.register_forward_pre_hook(lambda m, a, k: calls.append((a[0].shape[0], k["w"].tolist())), with_kwargs=True,
                                      prepend=True)
    z, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 4])
    a = sample(student, DDPM(), z, {"y": y}, solver="lcm", steps=4, cfg_scale=3.0)  # no uncond needed
    assert calls == [(2, [3.0, 3.0])] * 4  # batch 2, not [cond; uncond] = 4
    b = sample(student, DDPM(), z, {"y": y}, solver="lcm", steps=4, cfg_scale=1.0)
    assert not torch.allclose(a, b)


def test_guidance_range_draws_w_per_sample_and_feeds_the_teacher_and_student():
    from ditk.objectives.ddpm import DDPM

    cm = method(DDPM(), guidance_range=[1.0, 5.0])
    rows = cm.sample_time(1000, torch.Generator().manual_seed(0))
    assert rows.shape == (1000, 2) and rows[:, 1].min() >= 1.0 and rows[:, 1].max() <= 5.0
    assert rows[:, 1].std() > 1.0 and set(rows[:, 0].long().tolist()) <= set(range(50))
    with pytest.raises(Exception, match="guidance_range"):
        method(DDPM(), guidance_range=[4.0, 2.0])
    with pytest.raises(Exception, match="guidance_scale=1"):
        method(DDPM(), guidance_range=[1.0, 4.0], guidance_scale=2.0)


def test_lcm_student_trains_resumes_rebuilds_from_config_and_w_changes_its_samples(trained_run, tmp_path):
    from ditk.generate import load_pipeline, sample_images

    args = ["digits-dit-lcm", *TINY, f"distill.teacher={trained_run}", "optim.lr=3e-3", f"run.dir={tmp_path}", *FAST]
    invoke_ditk("distill", *args, "run.name=full", "train.max_steps=6", check=True)
    invoke_ditk("distill", *args, "run.name=cut", "train.max_steps=3", check=True)
    invoke_ditk("distill", *args, "run.name=cut", "train.max_steps=6", check=True)
    run = tmp_path / "full"
    assert (run / "config.yaml").read_text().count("guidance_embed: true") == 1
    assert losses(run) == losses(tmp_path / "cut")
    images = {w: sample_images(load_pipeline(str(run), overrides=[f"sample.cfg_scale={w}", "sample.steps=2"],
                                             device="cpu"), [0, 1]) for w in (1.0, 4.0)}
    assert not torch.allclose(images[1.0], images[4.0])  # trained steps moved the w-embedding off zero
    out = invoke_ditk("sample", run, "--num", "2", "--cfg-scale", "3", "--no-progress", check=True).stdout
    assert "cfg3" in out


def test_a_guidance_range_on_an_unconditional_teacher_is_one_line_exit_2(tmp_path):
    root = tmp_path / "t"
    invoke_ditk("train", "digits-dit-uncond", *TINY, "train.max_steps=1", f"run.dir={root}", "--no-progress", check=True)
    proc = invoke_ditk("distill", "digits-dit-uncond", *TINY, "distill.method=consistency",
                       "distill.guidance_range=[1,4]", f"distill.teacher={root / 'digits-dit-uncond'}",
                       f"run.dir={tmp_path / 'runs'}", *FAST)
    assert proc.returncode == 2 and "unconditional" in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_guidance_embed_is_a_model_key_every_backbone_section_accepts_and_rebuilds():
    from ditk.build import build_model
    from ditk.config import resolve

    cfg = resolve("digits-dit", [*TINY, "model.guidance_embed=true"], allow_missing=("data",))
    assert cfg.model.guidance_embed is True
    assert any(k.startswith("t_embedder.w_embedder.") for k in build_model(cfg).state_dict())
    plain = resolve("digits-dit", TINY, allow_missing=("data",))
    assert "guidance_embed" not in plain.model  # configs that do not use it are unchanged
    with pytest.raises(Exception, match="guidance_embed"):
        resolve("digits-dit", ["model.guidance_embed=maybe"], allow_missing=("data",))


@pytest.mark.parametrize("preset", ["digits-dit-moe", "digits-dis", "digits-drwkv", "digits-dydit"])
def test_the_embedding_is_generic_over_backbones_with_a_timestep_mlp(preset):
    """Every t_embedder backbone: a student built with model.guidance_embed and started from the plain model
    (through convert_state_dict, as train.init_from does) equals it exactly; a trained embedding makes w matter."""
    from ditk.build import build_model
    from ditk.config import resolve

    torch.manual_seed(0)
    plain = build_model(resolve(preset, [], allow_missing=("data",))).eval()
    for name, p in plain.named_parameters():  # adaLN-Zero's zeros would hide what c does
        if "adaLN" in name or "final_layer" in name:
            torch.nn.init.normal_(p, std=0.05)
    student = build_model(resolve(preset, ["model.guidance_embed=true"], allow_missing=("data",))).eval()
    student.load_state_dict(student.convert_state_dict(plain.state_dict()))
    x = torch.randn(2, plain.in_channels, plain.input_size, plain.input_size)
    t, y = torch.tensor([10.0, 500.0]), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(plain(x, t, y=y), student(x, t, y=y, w=torch.tensor([2.0, 3.0])))
        torch.nn.init.normal_(student.t_embedder.w_embedder.mlp[2].weight, std=0.5)
        assert not torch.allclose(student(x, t, y=y, w=torch.tensor([1.0, 1.0])),
                                  student(x, t, y=y, w=torch.tensor([4.0, 4.0])))
