"""`ditk invert` and `ditk edit` on the session's tiny trained run: outputs, artefacts, one-line input errors."""

import json

import numpy as np
import torch
import pytest
from PIL import Image

from ditk_testing import TINY, invoke_ditk


@pytest.fixture(scope="module")
def digit_pngs(tmp_path_factory):
    from ditk.data.digits import Digits
    from ditk.io import save_pngs

    folder = tmp_path_factory.mktemp("digits")
    d = Digits(split="test")
    save_pngs(d.images[:3], folder)
    return folder


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("flowruns")
    invoke_ditk("train", "digits-dit-flow", *TINY, "train.max_steps=3", f"run.dir={root}", "--no-progress", check=True)
    return root / "digits-dit-flow"


def test_invert_writes_artefacts_and_a_reconstruction_report(trained_run, digit_pngs, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "inv"
    proc = invoke_ditk("invert", trained_run, digit_pngs, "--method", "bdia", "--steps", "8", "--reconstruct",
                       "--save-trajectory", "--save-features", "--class-labels", "0,1,2", "--out", out, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    report = json.loads((out / "report.json").read_text())
    assert len(report["images"]) == 3 and "guidance" in report
    assert report["mean_psnr_db"] > 60  # BDIA is exact up to float32 rounding
    with safe_open(str(out / "000000.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["ditk"])
        keys = set(f.keys())
        assert f.get_tensor("trajectory").shape == (9, 1, 8, 8)  # 8 evaluation points + the end point
    assert {"noise", "pair", "image", "trajectory"} <= keys
    assert any(k.startswith("feat|") and k.endswith("blocks.1.attn.v_hook") for k in keys)
    assert meta["method"] == "bdia" and meta["steps"] == 8 and meta["schedule"]["kind"] == "alphas_cumprod"
    assert meta["model"]["depth"] == 2 and len(meta["schedule"]["values"]) == 9
    assert (out / "lineage.json").is_file() and (out / "reconstructions" / "000000.png").is_file()

    # edit from the artefacts (DDPM: tic reuses the stored inversion when method and steps match)
    edit_out = tmp_path / "edit"
    proc = invoke_ditk("edit", trained_run, out, "--method", "naive", "--inversion", "bdia", "--steps", "8",
                       "--class-labels", "8", "--out", edit_out)  # the source labels come from the artefacts
    assert proc.returncode == 0, proc.stderr
    assert "reusing the inversion" in proc.stderr
    proc = invoke_ditk("edit", trained_run, out, "--method", "naive", "--inversion", "bdia", "--steps", "8",
                       "--source-labels", "5", "--class-labels", "8", "--out", tmp_path / "other")
    assert proc.returncode == 0 and "another source condition" in proc.stderr, proc.stderr
    report = json.loads((edit_out / "report.json").read_text())
    assert report["inversion_nfe"] == 0 and len(report["images"]) == 3
    assert {"predicted_class", "target_class", "feature_distance", "psnr_outside_changed_db",
            "ssim_outside_changed"} <= set(report["images"][0])
    # digits: the changed strokes are where the source and the target class's mean training digit differ
    from ditk.edit.preserve import changed_strokes, digits_prototypes

    assert "mean training image of the target class" in report["changed_strokes"]
    src = torch.stack([torch.from_numpy(np.asarray(Image.open(p), np.float32) / 127.5 - 1)[None]
                       for p in sorted(digit_pngs.iterdir())])
    want = changed_strokes(src, digits_prototypes()[[8, 8, 8]]).flatten(1).mean(1)
    np.testing.assert_allclose([r["mask_changed_fraction"] for r in report["images"]], want.numpy(), atol=1e-6)
    assert np.load(edit_out / "samples.npz")["arr_0"].shape == (3, 8, 8, 1)


def test_edit_methods_on_a_flow_run(flow_run, digit_pngs, tmp_path):
    for method in ("rf-edit", "tic"):
        out = tmp_path / method
        proc = invoke_ditk("edit", flow_run, digit_pngs, "--method", method, "--steps", "4", "--class-labels", "5",
                           "--source-labels", "0,1,2", "--cfg-scale", "2", "--out", out)
        assert proc.returncode == 0, proc.stderr
        report = json.loads((out / "report.json").read_text())
        assert report["method"] == method and report["nfe_per_image"] > 0
        assert (out / "grid.png").is_file()
    mask = tmp_path / "mask.png"
    m = np.zeros((8, 8), dtype=np.uint8)
    m[:4] = 255  # edit the top half; the target may copy the bottom half's source tokens
    Image.fromarray(m).save(mask)
    proc = invoke_ditk("edit", flow_run, digit_pngs, "--method", "tic", "--steps", "3", "--class-labels", "5",
                       "--mask", mask, "--out", tmp_path / "masked")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "masked" / "report.json").read_text())
    assert report["rules"][-1]["mask"] == "image" and report["mask_keep_fraction"] == 0.5


def _error(*args):
    proc = invoke_ditk(*map(str, args))
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_bad_inputs_are_one_line_errors(trained_run, flow_run, digit_pngs, tmp_path):
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(big)
    assert "--resize" in _error("invert", trained_run, big, "--steps", "2", "--out", tmp_path / "a")
    assert not (tmp_path / "a").exists()  # nothing left behind
    proc = invoke_ditk("invert", trained_run, big, "--steps", "2", "--resize", "--out", tmp_path / "b", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "out of range" in _error("edit", trained_run, digit_pngs, "--class-labels", "12", "--steps", "2",
                                    "--out", tmp_path / "c")
    assert "without guidance" in _error("invert", trained_run, digit_pngs, "--cfg-scale", "3")
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    assert "not a ditk invert output folder" in _error("invert", trained_run, digit_pngs, "--out", keep)
    assert (keep / "notes.txt").read_text() == "mine"
    assert "for rectified-flow models" in _error("invert", trained_run, digit_pngs, "--method", "rf-solver")
    # an artefact of another model/schedule
    inv = tmp_path / "flowinv"
    invoke_ditk("invert", flow_run, digit_pngs, "--method", "euler", "--steps", "2", "--out", inv, "--no-progress",
                check=True)
    msg = _error("edit", trained_run, inv / "000000.safetensors", "--class-labels", "3", "--steps", "2")
    assert "inverted with another" in msg
    assert "has none: drop --mask" in _error("edit", flow_run, digit_pngs, "--method", "naive", "--mask", big,
                                             "--class-labels", "3", "--steps", "2")
    spec = tmp_path / "spec.yaml"
    spec.write_text("rules:\n  - {blocks: [0, 9], tensor: v, op: replace}\n")
    assert "names block 9 but the model has 2 blocks" in _error(
        "edit", trained_run, digit_pngs, "--method", "custom", "--spec", spec, "--class-labels", "3", "--steps", "2")


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; from ditk.cli import cli\n"
            "for args in (['invert', '--help'], ['edit', '--help']):\n"
            "    cli.main(args=args, standalone_mode=False)\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_latent_model_reports_the_vae_bound(tmp_path):
    """A latent DiT (tiny random AutoencoderKL): images are encoded, inverted in latent space, and the report gives
    the VAE round trip's PSNR next to the reconstruction's."""
    import torch
    from diffusers import AutoencoderKL
    from safetensors import safe_open

    from ditk.data.digits import Digits
    from ditk.io import save_pngs

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                        norm_num_groups=4, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    args = [*TINY, "train.max_steps=2", "data.image_size=16", "autoencoder.name=autoencoder-kl",
            f"autoencoder.path={tmp_path / 'vae'}", "model.in_channels=4", "model.input_size=8",
            f"run.dir={tmp_path}", "run.name=latent", "--no-progress"]
    invoke_ditk("train", "digits-dit", *args, check=True)
    save_pngs(Digits(split="test", image_size=16).images[:2], tmp_path / "in")
    out = tmp_path / "inv"
    proc = invoke_ditk("invert", tmp_path / "latent", tmp_path / "in", "--method", "bdia", "--steps", "3",
                       "--reconstruct", "--out", out, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    row = json.loads((out / "report.json").read_text())["images"][0]
    # BDIA is exact in latent space, so the pixels are as good as the VAE round trip allows, no better
    assert abs(row["psnr_db"] - row["vae_bound_psnr_db"]) < 0.01 and row["latent_mse"] < 1e-8
    with safe_open(str(out / "000000.safetensors"), "pt") as f:
        assert f.get_tensor("noise").shape == (4, 8, 8)
        assert json.loads(f.metadata()["ditk"])["latent"] is True
    proc = invoke_ditk("edit", tmp_path / "latent", tmp_path / "in", "--class-labels", "3", "--steps", "2",
                       "--out", tmp_path / "ed")
    assert proc.returncode == 0, proc.stderr
    assert np.load(tmp_path / "ed" / "samples.npz")["arr_0"].shape == (2, 16, 16, 1)


def test_text_model_edits_from_a_prompt(digit_pngs, tmp_path):
    """Dimba (text by cross-attention, here a rectified flow with random weights; training it costs ~40 s on a CPU):
    source and target prompts in one batch, injection into its self-attention hook points, guidance."""
    import torch

    from ditk.build import build_autoencoder, build_conditioner, build_model, build_objective
    from ditk.config import resolve
    from ditk.edit.run import run_edit
    from ditk.generate import Pipeline

    cfg = resolve("digits-dimba", ["model.hidden_size=32", "model.depth=2", "model.num_heads=2", "model.d_state=4",
                                   "conditioner.max_length=8", "objective.name=rectified-flow", "model.learn_sigma=false"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    for p in model.parameters():  # non-zero adaLN gates and output layer, so attention reaches the output
        torch.nn.init.normal_(p, std=0.05)
    pipe = Pipeline(cfg, model, build_objective(cfg), build_autoencoder(cfg),
                    build_conditioner(cfg, 10, None, model=model), torch.device("cpu"), source="random-dimba")
    report = run_edit(pipe, [str(digit_pngs)], "tic", 3, {}, None, None, None, "a handwritten five", None,
                      "a handwritten zero", 2.0, None, tmp_path / "tic", False, 0)
    assert report["target_condition"] == "prompt: 'a handwritten five'" and report["feature_cache_mb"] > 0
    assert report["nfe_per_image"] == 3 + 3 * 2 * 2 and (tmp_path / "tic" / "grid.png").is_file()
