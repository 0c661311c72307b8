"""MusicCM (`distill.method=musiccm`): hinge loss and R1 against closed forms and finite differences, the boundary
condition of the student, learning, exact resume, the frozen teacher, 4-step / long-clip sampling, bad input."""

import json

import pytest
import torch

from ditk_testing import TINY, invoke_ditk, random_audio_run
from test_distill import FAST, digest, losses

SMALL = ["model.hidden_size=32", "model.num_heads=1", "model.depth_double=1", "model.depth_single=1",
         "data.num_clips=8", "train.global_batch_size=4", "train.log_every=1", "train.sample_every=0",
         "sample.num=1", "data.griffin_lim_iters=4", "conditioner.max_length=8"]


@pytest.fixture(scope="module")
def audio_teacher(tmp_path_factory):
    """A tiny tones-fluxmusic run (1 step) whose weights are re-drawn at random: a fresh FluxMusic is the identity
    (adaLN-Zero), under which guidance, features and the consistency loss would all be trivially zero."""
    return random_audio_run(tmp_path_factory.mktemp("musiccm-teacher"), *SMALL)


# -- the losses -------------------------------------------------------------------------------------------------------


def test_hinge_losses_are_their_closed_forms():
    from ditk.distill.discriminator import hinge_d_loss, hinge_g_loss

    real = torch.tensor([[2.0, 0.5, -1.0], [1.0, 1.5, 0.0]])
    fake = torch.tensor([[-2.0, 0.0, 0.5], [-1.0, -0.5, 3.0]])
    # sample 0: real max(0, 1 - r) = 0, 0.5, 2 -> 2.5 / 3; fake max(0, 1 + f) = 0, 1, 1.5 -> 2.5 / 3
    # sample 1: real 0, 0, 1 -> 1 / 3; fake 0, 0.5, 4 -> 4.5 / 3
    torch.testing.assert_close(hinge_d_loss(real, fake), torch.tensor([5.0 / 3, 5.5 / 3]))
    torch.testing.assert_close(hinge_g_loss(fake), torch.tensor([1.5 / 3, -1.5 / 3]))  # - mean of the fake logits


def test_r1_penalty_is_the_closed_form_for_linear_and_quadratic_heads():
    from ditk.distill.discriminator import r1_penalty

    g = torch.Generator().manual_seed(0)
    h = [torch.randn(3, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)]
    w = torch.randn(4, generator=g, dtype=torch.float64)
    # a linear token head w.h: the gradient of every token's logit is w, so R1 = |w|^2 for every sample
    torch.testing.assert_close(r1_penalty(h[0] @ w, h), (w @ w).expand(3))
    # a quadratic head |h|^2: gradient 2h, R1 = sum 4 h^2 / tokens
    torch.testing.assert_close(r1_penalty((h[0] ** 2).sum(-1), h), 4 * (h[0] ** 2).sum((1, 2)) / 5)


def test_r1_of_the_discriminator_matches_finite_differences_and_its_parameter_gradient_checks():
    """R1 (autograd) against central differences of the heads' logits; the gradient of the whole discriminator loss
    (hinge + R1, a double backward) in the head parameters against torch.autograd.gradcheck's finite differences."""
    from torch.func import functional_call

    from ditk.distill.discriminator import Discriminator, hinge_d_loss, r1_penalty

    torch.manual_seed(0)
    disc = Discriminator([6, 6], hidden=5, cond_dim=3).double()
    real = [torch.randn(2, 4, 6, dtype=torch.float64) for _ in range(2)]
    fake = [torch.randn(2, 4, 6, dtype=torch.float64) for _ in range(2)]
    c = torch.randn(2, 3, dtype=torch.float64)

    feats = [h.clone().requires_grad_(True) for h in real]
    r1 = r1_penalty(disc(feats, c), feats)
    eps, numeric = 1e-6, torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for layer in range(2):
            for idx in torch.cartesian_prod(*(torch.arange(n) for n in real[layer].shape[1:])):
                for i in range(2):
                    up = [h.clone() for h in real]
                    down = [h.clone() for h in real]
                    up[layer][(i, *idx)] += eps
                    down[layer][(i, *idx)] -= eps
                    d = (disc(up, c)[i].sum() - disc(down, c)[i].sum()) / (2 * eps)
                    numeric[i] += d**2
    tokens = sum(h.shape[1] for h in real)
    torch.testing.assert_close(r1.detach(), numeric / tokens, rtol=1e-6, atol=1e-9)

    names = [n for n, _ in disc.named_parameters()]

    def d_loss(*params):
        state = dict(zip(names, params))
        hs = [h.clone().requires_grad_(True) for h in real]
        logits = functional_call(disc, state, (hs, c))
        return (hinge_d_loss(logits, functional_call(disc, state, (fake, c))) + 0.5 * r1_penalty(logits, hs)).sum()

    params = tuple(p.detach().clone().requires_grad_(True) for p in disc.parameters())
    assert torch.autograd.gradcheck(d_loss, params, eps=1e-6, atol=1e-5)


def test_feature_blocks_are_add_s_evenly_spaced_layers():
    from ditk.distill.discriminator import evenly_spaced_blocks

    assert evenly_spaced_blocks(12) == [2, 5, 8, 11]  # ADD's DINO ViT-S layers
    assert evenly_spaced_blocks(24) == [5, 11, 17, 23] and evenly_spaced_blocks(2) == [0, 1]


# -- the method ------------------------------------------------------------------------------------------------------


def built_method(teacher, tmp_path, *overrides, perturb=0.0):
    """A MusicCM method attached as the training loop attaches it, with the student initialised from the teacher."""
    import copy

    from ditk.build import build_conditioner, build_model, build_objective
    from ditk.distill import build_method
    from ditk.distill.base import load_teacher
    from ditk.distill.prepare import prepare

    cfg, _ = prepare("tones-musiccm", [*SMALL, f"distill.teacher={teacher}", f"run.dir={tmp_path}", *overrides])
    method = build_method(cfg, build_objective(cfg))
    student = load_teacher(str(teacher))[0].train().requires_grad_(True)
    if perturb:  # a student away from its teacher (as a smaller or pruned student starts), so there is much to learn
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn(p.shape, generator=g) * perturb)
    ema = copy.deepcopy(student).requires_grad_(False).eval()
    conditioner = build_conditioner(cfg, 1, ["a melody"], model=build_model(cfg))  # prompts are encoded directly
    torch.manual_seed(0)  # the heads' initial weights (the training loop seeds the same way before it builds)
    method.attach(ema=ema, conditioner=conditioner, run_dir=tmp_path)
    return method, student, ema, conditioner


def test_student_boundary_condition_holds_exactly(audio_teacher, tmp_path):
    """f(x, t_min = 0) = x exactly for the student's parameterisation, though its velocity there is far from 0."""
    method, student, _, conditioner = built_method(audio_teacher, tmp_path)
    cond = conditioner.encode_prompts(["a fast rising melody", "a slow falling melody"], "cpu")
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(method.consistency_function(student, x, torch.zeros(2), cond), x)
        assert student(x, torch.zeros(2), **cond).abs().mean() > 0.01
        assert not torch.allclose(method.consistency_function(student, x, torch.full((2,), 0.5), cond), x)


def test_student_learns_and_the_discriminator_separates_real_from_student(audio_teacher, tmp_path):
    """A few steps as the training loop takes them: the consistency term falls, the discriminator's hinge loss falls
    from its value at chance (2 at logits 0), the heads are trained by their own optimizer and the teacher not."""
    from ditk.train import update_ema

    method, student, ema, conditioner = built_method(audio_teacher, tmp_path, "distill.head_hidden=16", "distill.disc_lr=5e-3",
                                                       perturb=0.05)
    teacher_before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    heads_before = {k: v.clone() for k, v in method.disc.state_dict().items()}
    opt = torch.optim.Adam(student.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    prompts = ["a fast rising melody", "a slow falling melody"] * 2
    cond = conditioner.encode_prompts(prompts, "cpu")
    # Stands for the data (fixed, so the losses compare): smooth spectrogram-like rows, which noised inputs are not.
    x0 = 0.5 * torch.sin(torch.arange(64.0) / 3 + torch.arange(4.0).view(4, 1, 1, 1)).view(4, 1, 64, 1).expand(4, 1, 64, 64)
    noise = torch.randn(4, 1, 64, 64, generator=g)
    index = torch.tensor([10, 20, 30, 40])
    distill, hinge = [], []
    for _ in range(12):
        out = method.training_losses(student, x0, index, noise, cond)
        opt.zero_grad()
        out["loss"].mean().backward()
        opt.step()
        update_ema(ema, student, 0.5)
        distill.append(float(out["distill"].mean()))
        hinge.append(float(out["disc_hinge"].mean()))
        assert all(p.grad is None for p in method.disc.parameters())  # the generator's term never trains the heads
    assert sum(distill[-3:]) < sum(distill[:3]), distill
    assert hinge[-1] < hinge[0] - 0.05, hinge
    assert any(not torch.equal(v, method.disc.state_dict()[k]) for k, v in heads_before.items())
    assert all(torch.equal(v, method.teacher.state_dict()[k]) for k, v in teacher_before.items())


def test_musiccm_runs_resumes_exactly_keeps_the_teacher_and_samples_4_steps_and_long_clips(audio_teacher, tmp_path):
    before = digest(audio_teacher)
    args = ["tones-musiccm", *SMALL, f"distill.teacher={audio_teacher}", "optim.lr=1e-3", "distill.head_hidden=16",
            "train.ckpt_every=2", f"run.dir={tmp_path}", "--no-progress"]
    invoke_ditk("distill", *args, "run.name=full", "train.max_steps=4", check=True)
    invoke_ditk("distill", *args, "run.name=cut", "train.max_steps=2", check=True)
    state = torch.load(tmp_path / "cut" / "checkpoints" / "step-000002" / "state.pt", weights_only=False)
    assert set(state["objective"]) == {"disc", "disc_opt"}  # the discriminator and its AdamW state are checkpointed
    invoke_ditk("distill", *args, "run.name=cut", "train.max_steps=4", check=True)
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")  # heads and optimizer resumed exactly
    assert digest(audio_teacher) == before
    lineage = json.loads((tmp_path / "full" / "lineage.json").read_text())
    assert lineage["parent"] == str(audio_teacher.resolve())
    out = invoke_ditk("sample", tmp_path / "full", "--prompt", "a fast rising melody", "--duration", "4", "--num", "1",
                      "--no-progress", check=True).stdout.strip()
    report = json.loads((tmp_path / "full" / "generated" / out.split("/")[-1] / "report.json").read_text())
    assert "lcm4" in out and report["settings"]["steps"] == 4 and report["settings"]["cfg_scale"] == 1.0
    assert report["windows"] == "multidiffusion" and report["clip_seconds"] == 4.0


@pytest.fixture(scope="module")
def image_flow_teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    invoke_ditk("train", "digits-dit-flow", *TINY, "train.max_steps=1", f"run.dir={root}", "--no-progress", check=True)
    return root / "digits-dit-flow"


@pytest.mark.parametrize("case, message", [
    ("image", "no audio front end"),
    ("ddpm", "supports rectified-flow"),
    ("missing", "does not exist"),
    ("features", "must be an A-JEPA run"),
    ("blocks", "feature_blocks"),
    ("sampler", "sample.solver=lcm"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(audio_teacher, image_flow_teacher, trained_run, tmp_path,
                                                          case, message):
    args = {"image": ["digits-dit-flow", *TINY, "distill.method=musiccm", f"distill.teacher={image_flow_teacher}",
                      "sample.solver=lcm", "sample.cfg_scale=1"],
            "ddpm": ["digits-dit", *TINY, "distill.method=musiccm", f"distill.teacher={trained_run}"],
            "missing": ["tones-musiccm", *SMALL, f"distill.teacher={tmp_path / 'nope'}"],
            "features": ["tones-musiccm", *SMALL, f"distill.teacher={audio_teacher}",
                         f"distill.features={image_flow_teacher}"],
            "blocks": ["tones-musiccm", *SMALL, f"distill.teacher={audio_teacher}", "distill.feature_blocks=[7]"],
            "sampler": ["tones-fluxmusic", *SMALL, "distill.method=musiccm", f"distill.teacher={audio_teacher}"]}[case]
    proc = invoke_ditk("distill", *args, f"run.dir={tmp_path / 'runs'}", *FAST)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_musiccm_presets_build_and_validate():
    """tones-musiccm and the paper-scale fluxmusic-small-musiccm resolve, their method accepts its options, and
    the FluxMusic-small student builds on the meta device (142.3 M parameters, the paper's count)."""
    from ditk.build import build_model, build_objective
    from ditk.config import resolve
    from ditk.distill import build_method

    for preset, paths, params in (("tones-musiccm", [], None),
                                  ("fluxmusic-small-musiccm", ["data.path=/data", "autoencoder.path=/vae"], 142.3e6)):
        cfg = resolve(preset, ["distill.teacher=/teacher", *paths])
        method = build_method(cfg, build_objective(cfg))
        assert cfg.distill.method == "musiccm" and method.w == 2.0 and cfg.sample.solver == "lcm"
        assert cfg.sample.steps == 4 and cfg.sample.cfg_scale == 1.0 and cfg.train.ema_decay == 0.95
        if params:
            with torch.device("meta"):
                model = build_model(cfg)
            assert abs(sum(p.numel() for p in model.parameters()) - params) < 0.1e6


def test_an_a_jepa_run_as_the_discriminator_s_feature_network(audio_teacher, tmp_path):
    """distill.features=<A-JEPA run>: its frozen target encoder's tokens feed the heads, and the adversarial term's
    gradient reaches the student through it (the paper's frozen AudioMAE, in ditk's family)."""
    invoke_ditk("train", "a-jepa-tiny", "model.hidden_size=32", "model.depth=2", "model.predictor_hidden_size=16",
                "model.predictor_depth=1", "data.num_clips=8", "train.global_batch_size=4", "train.max_steps=1",
                "train.ckpt_every=1", "train.sample_every=0", f"run.dir={tmp_path}", "--no-progress", check=True)
    method, student, _, conditioner = built_method(audio_teacher, tmp_path, f"distill.features={tmp_path / 'a-jepa-tiny'}",
                                                   "distill.distill_weight=0", "distill.head_hidden=8", perturb=0.05)
    assert method.features.net is not method.teacher and method.features.block_ids == [0, 1]
    assert [h.fc.in_features for h in method.disc.heads] == [32, 32]
    cond = conditioner.encode_prompts(["a fast rising melody"] * 2, "cpu")
    x0 = torch.zeros(2, 1, 64, 64)
    out = method.training_losses(student, x0, torch.tensor([25, 45]), torch.randn(2, 1, 64, 64), cond)
    out["loss"].mean().backward()  # the adversarial term alone (distill_weight 0)
    assert student.final_layer.linear.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in method.features.net.parameters())
