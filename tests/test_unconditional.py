"""Unconditional models (`model.num_classes=0`) end to end: no label table in the model, no `y` from the
conditioner, no label dropout in training, no guidance or class labels at sampling, unlabelled data, and the
unconditional official checkpoints (Diffusion-RWKV's released M-2-uncond-32.pt layout, DiS with num_classes=-1).

Oracles: the dense DiT's parameter count minus its label table; a float64 functional DiT forward written from
the state dict with c = t_emb only; the official unconditional DiS forward (feizc/DiS DisModel with labels=None:
[time, patches] tokens, FinalLayer(condition=False)); the official key lists of tests/test_official_weights.py;
and a training run whose losses must not change when the data set's labels are hidden.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ditk_testing import TINY, invoke_ditk
from test_official_weights import (dis_official, dis_reference, drwkv_official, final_layer_reference, lin,
                                   official_timestep_embedding, random_state_dict, save_official, small_dis,
                                   small_dis_official, unpatchify_official)

from ditk.models.dit import DiT

UNCOND = ["model.num_classes=0", "data.labels=false", "sample.cfg_scale=1"]


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


#################################################################################
#                                   The models                                  #
#################################################################################


SMALL = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2)


def test_unconditional_dit_is_the_dense_dit_minus_its_label_table():
    dense = DiT(num_classes=10, class_dropout_prob=0.1, **SMALL)
    uncond = DiT(num_classes=0, class_dropout_prob=0.1, **SMALL)
    assert n_params(dense) - n_params(uncond) == (10 + 1) * 32  # 10 classes + the null row, width 32
    assert set(dense.state_dict()) - set(uncond.state_dict()) == {"y_embedder.embedding_table.weight"}
    assert uncond.y_embedder is None and uncond.num_classes == 0
    # paper size: DiT-XL/2 has 675,129,632 parameters (the paper's 675M), 1001 x 1152 of them the label table
    from ditk.models.dit import dit_size_config, build_dit

    with torch.device("meta"):
        xl = n_params(build_dit(dit_size_config("XL", 2)))
        xl_uncond = n_params(build_dit(dit_size_config("XL", 2, num_classes=0)))
    assert xl == 675_129_632 and xl_uncond == xl - 1001 * 1152
    # DiT-MoE inherits it
    from ditk.models.dit_moe import DiTMoE

    moe = dict(num_experts=4, top_k=2, num_shared_experts=1, **SMALL)
    assert n_params(DiTMoE(num_classes=10, **moe)) - n_params(DiTMoE(num_classes=0, **moe)) == 11 * 32
    with pytest.raises(Exception, match="or 0 for an unconditional model"):
        DiT(num_classes=-1, **SMALL)


def dit_reference(sd, x, t, depth, heads, out_channels):
    """DiT's forward in float64 from the state dict, with c = t_emb only (no label term anywhere)."""
    w = sd["x_embedder.proj.weight"]
    d, p = w.shape[0], w.shape[-1]
    h = F.conv2d(x, w, sd["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2) + sd["pos_embed"]
    n, tokens, _ = h.shape
    temb = official_timestep_embedding(t, 256).to(x.dtype)
    c = lin(F.silu(lin(temb, sd, "t_embedder.mlp.0.")), sd, "t_embedder.mlp.2.")

    def ln(z):
        return F.layer_norm(z, (d,), eps=1e-6)

    for i in range(depth):
        pre = f"blocks.{i}."
        shift1, scale1, gate1, shift2, scale2, gate2 = lin(F.silu(c), sd, pre + "adaLN_modulation.1.").chunk(6, dim=1)
        z = ln(h) * (1 + scale1[:, None]) + shift1[:, None]
        q, k, v = lin(z, sd, pre + "attn.qkv.").reshape(n, tokens, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1) @ v
        h = h + gate1[:, None] * lin(a.transpose(1, 2).reshape(n, tokens, d), sd, pre + "attn.proj.")
        z = ln(h) * (1 + scale2[:, None]) + shift2[:, None]
        mlp = lin(F.gelu(lin(z, sd, pre + "mlp.fc1."), approximate="tanh"), sd, pre + "mlp.fc2.")
        h = h + gate2[:, None] * mlp
    return unpatchify_official(final_layer_reference(sd, h, c), out_channels)


def test_unconditional_dit_forward_is_the_dit_forward_with_c_equal_to_t_emb():
    model = DiT(num_classes=0, **SMALL).double().eval()
    # random weights everywhere (adaLN-Zero would otherwise make the output exactly 0)
    sd = random_state_dict({k: v.shape for k, v in model.state_dict().items()}, seed=0, std=0.2)
    model.load_state_dict(sd)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0.0, 250.0, 999.0])
    with torch.no_grad():
        ours = model(x, t)
        assert torch.equal(model(x, t, y=torch.tensor([1, 2, 3])), ours)  # a label has nothing to act on
    ref = dit_reference(sd, x, t, depth=2, heads=2, out_channels=6)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    assert ours.std() > 0.1
    # ... and it depends on t: the timestep is its only condition
    with torch.no_grad():
        assert not torch.allclose(model(x, t.flip(0)), ours)


def test_unconditional_official_dis_loads_and_matches_the_official_forward(tmp_path):
    from ditk.models.convert import load_pretrained

    official = random_state_dict(small_dis_official(num_classes=-1), seed=21)
    model = small_dis(num_classes=0).double().eval()
    assert not any(k.startswith(("y_embedder", "final_layer.adaLN")) for k in model.state_dict())
    load_pretrained(model, save_official(tmp_path, official, "ema"))  # strict, through the official file format
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([5.0, 800.0])
    with torch.no_grad():
        ours = model(x, t)
    torch.testing.assert_close(ours, dis_reference(official, x, t, None, depth=4, out_channels=6), rtol=1e-5, atol=1e-5)
    assert ours.std() > 0.1


def test_paper_size_dis_takes_the_unconditional_official_key_list():
    from ditk.build import build_model
    from ditk.config import resolve

    cfg = resolve("dis-h-2", ["model.num_classes=0"], allow_missing=("data", "autoencoder", "conditioner"))
    with torch.device("meta"):
        model = build_model(cfg)
        official = {k: torch.empty(s) for k, s in dis_official(48, 1536, 2, num_classes=-1).items()}
    converted = model.convert_state_dict(official)
    ours = model.state_dict()
    assert set(converted) == set(ours)
    assert all(tuple(converted[k].shape) == tuple(ours[k].shape) for k in ours)


#################################################################################
#                       Conditioner, training and sampling                      #
#################################################################################


def test_the_class_conditioner_of_an_unconditional_model_gives_no_condition():
    from ditk.build import build_conditioner
    from ditk.config import resolve

    cfg = resolve("digits-dit", ["model.num_classes=0"])
    uncond_model = DiT(num_classes=0, **SMALL)
    conditioner = build_conditioner(cfg, 10, [str(i) for i in range(10)], model=uncond_model)
    labels = torch.tensor([3, 1, 4])
    assert conditioner.unconditional and conditioner.num_classes == 0
    assert conditioner.cond(labels) == {} and conditioner.uncond(3) == {}
    assert torch.equal(conditioner.drop(labels, torch.Generator(), 1.0), labels)
    # a class-conditional model keeps its class conditioner
    dense = build_conditioner(cfg, 10, None, model=DiT(num_classes=10, **SMALL))
    assert not getattr(dense, "unconditional", False) and torch.equal(dense.cond(labels)["y"], labels)


@pytest.fixture(scope="module")
def uncond_run(tmp_path_factory):
    """digits-dit with model.num_classes=0 on the unlabelled digits, 3 tiny steps."""
    root = tmp_path_factory.mktemp("uncond-runs")
    proc = invoke_ditk("train", "digits-dit", *TINY, *UNCOND, "train.max_steps=3", f"run.dir={root}",
                       "--no-progress", check=True)
    return root / "digits-dit"


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_training_ignores_labels_and_drops_none(uncond_run, tmp_path):
    assert not (uncond_run / "classes.json").exists()
    from safetensors.torch import load_file

    weights = load_file(uncond_run / "checkpoints" / "step-000003" / "ema.safetensors")
    assert weights and not any(k.startswith("y_embedder") for k in weights)
    # The same run on the labelled digits (labels visible, class_dropout_prob 0.1): an unconditional model cannot
    # see them, so every loss is the same to the bit.
    invoke_ditk("train", "digits-dit", *TINY, "model.num_classes=0", "sample.cfg_scale=1", "train.max_steps=3",
                f"run.dir={tmp_path}", "--no-progress", check=True)
    assert _losses(tmp_path / "digits-dit") == _losses(uncond_run)


def test_sampling_an_unconditional_run(uncond_run, tmp_path):
    out = tmp_path / "s"
    proc = invoke_ditk("sample", uncond_run, "--out", out, "--num", "3", "--batch-size", "2", "--no-progress",
                       check=True)
    assert proc.stdout.strip() == str(out)
    assert np.load(out / "samples.npz")["arr_0"].shape == (3, 8, 8, 1)
    report = json.loads((out / "report.json").read_text())
    assert report["conditioning"] == "unconditional" and report["settings"]["class_labels"] is None
    assert report["settings"]["cfg_scale"] == 1.0
    assert json.loads((out / "settings.json").read_text())["conditioning"] == "unconditional"


@pytest.mark.parametrize("args, words", [
    (("--cfg-scale", "4"), "use --cfg-scale 1"),
    (("--class-labels", "3"), "drop --class-labels"),
    (("--prompt", "a seven"), "drop --prompt"),
])
def test_guidance_and_labels_on_an_unconditional_model_are_one_line_errors(uncond_run, tmp_path, args, words):
    proc = invoke_ditk("sample", uncond_run, *args, "--out", tmp_path / "x", "--no-progress")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "unconditional" in lines[0], proc.stderr
    assert not (tmp_path / "x").exists()  # refused before anything is written


def test_training_refuses_guidance_before_the_first_step(tmp_path):
    proc = invoke_ditk("train", "digits-dit", *TINY, "model.num_classes=0", "train.max_steps=2", f"run.dir={tmp_path}",
                       "--no-progress")  # digits-dit samples with cfg 2.0
    assert proc.returncode == 2 and "sample.cfg_scale=1" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "digits-dit" / "checkpoints").exists()


def test_a_class_model_on_unlabelled_data_names_the_fix(tmp_path):
    proc = invoke_ditk("train", "digits-dit", *TINY, "data.labels=false", f"run.dir={tmp_path}", "--no-progress")
    assert proc.returncode == 2 and "set model.num_classes=0" in proc.stderr


def test_evaluate_fid_on_an_unconditional_run(uncond_run, tmp_path):
    proc = invoke_ditk("evaluate-fid", "--run", uncond_run, "--num", "4", "--sample-batch-size", "4",
                       "--samples-dir", tmp_path / "gen", "--cache-dir", tmp_path / "cache", "--kid-subsets", "2",
                       "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["n_gen"] == 4 and result["feature_extractor"] == "digits" and math.isfinite(result["fid"])
    assert json.loads((tmp_path / "gen" / "report.json").read_text())["conditioning"] == "unconditional"


def test_an_unconditional_model_trains_on_a_flat_image_folder(tmp_path):
    """A folder of images without class sub-folders (CelebA / FFHQ style)."""
    from PIL import Image

    folder = tmp_path / "faces"
    folder.mkdir()
    rng = np.random.RandomState(0)
    for i in range(16):
        Image.fromarray(rng.randint(0, 256, (12, 10, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    proc = invoke_ditk("train", "digits-dit", *TINY, "model.num_classes=0", "sample.cfg_scale=1", "model.in_channels=3",
                       "data.name=image-folder", f"data.path={folder}", "data.image_size=8", "train.max_steps=2",
                       f"run.dir={tmp_path}", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (tmp_path / "digits-dit" / "classes.json").exists()
    assert len(_losses(tmp_path / "digits-dit")) == 2


#################################################################################
#            The released unconditional Diffusion-RWKV checkpoint layout        #
#################################################################################


# drwkv-m-2 as for M-2-uncond-32.pt (unconditional, pixel space), shrunk to a tiny width/depth/resolution
DRWKV_UNCOND = ["model.num_classes=0", "model.in_channels=3", "autoencoder.name=identity", "model.input_size=8",
                "model.hidden_size=16", "model.depth=5", "model.wkv_impl=torch"]


def test_official_unconditional_drwkv_file_samples_with_the_paper_preset(tmp_path):
    from ditk.build import build_model
    from ditk.config import resolve
    from ditk.generate import load_pipeline

    official = random_state_dict(drwkv_official(5, 16, 2, c=3, num_classes=0, input_size=8), seed=30,
                                 dtype=torch.float32)
    path = save_official(tmp_path, official, "ema")
    pipe = load_pipeline(str(path), preset="drwkv-m-2", overrides=[*DRWKV_UNCOND, "sample.cfg_scale=1"], device="cpu")
    expected = build_model(resolve("drwkv-m-2", DRWKV_UNCOND, allow_missing=("data",))).convert_state_dict(official)
    loaded = pipe.model.state_dict()
    assert set(loaded) == set(expected) and all(torch.equal(loaded[k], expected[k]) for k in loaded)
    assert pipe.conditioner.unconditional

    out = tmp_path / "s"
    args = ("sample", path, "--preset", "drwkv-m-2", *DRWKV_UNCOND, "--num", "2", "--steps", "3", "--out", out,
            "--no-progress")
    refused = invoke_ditk(*args)  # the preset guides with cfg 1.5, which needs a class-conditional model
    assert refused.returncode == 2 and "use --cfg-scale 1" in refused.stderr
    invoke_ditk(*args, "--cfg-scale", "1", check=True)
    assert np.load(out / "samples.npz")["arr_0"].shape == (2, 8, 8, 3)
    assert json.loads((out / "report.json").read_text())["conditioning"] == "unconditional"
