"""`ditk sample`: outputs, determinism, resumable shards, foreign weights, latent space."""

import json
import shutil

import numpy as np
import torch

from ditk_testing import TINY, invoke_ditk, run_ditk


def _sample(run, out, *args):
    proc = invoke_ditk("sample", run, "--out", out, "--no-progress", *args, check=True)
    assert proc.stdout.strip() == str(out)  # stdout carries the result only
    return np.load(out / "samples.npz")["arr_0"]


def test_sample_writes_pngs_grid_npz_and_report(trained_run, tmp_path):
    arr = _sample(trained_run, tmp_path / "s", "--num", "5", "--batch-size", "2")
    assert arr.dtype == np.uint8 and arr.shape == (5, 8, 8, 1)
    assert sorted(p.name for p in (tmp_path / "s" / "images").iterdir()) == [f"{i:06d}.png" for i in range(5)]
    assert (tmp_path / "s" / "grid.png").is_file()
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    assert report["num"] == 5 and report["settings"]["solver"] == "ddpm"


def test_images_do_not_depend_on_batch_size_and_shards_resume(trained_run, tmp_path):
    a = _sample(trained_run, tmp_path / "a", "--num", "5", "--batch-size", "5")
    b = _sample(trained_run, tmp_path / "b", "--num", "5", "--batch-size", "2")
    np.testing.assert_array_equal(a, b)
    for i in (1, 3):
        (tmp_path / "b" / "images" / f"{i:06d}.png").unlink()
    c = _sample(trained_run, tmp_path / "b", "--num", "5", "--batch-size", "2")
    np.testing.assert_array_equal(a, c)


def test_seed_and_labels_change_the_images(trained_run, tmp_path):
    a = _sample(trained_run, tmp_path / "a", "--num", "2")
    b = _sample(trained_run, tmp_path / "b", "--num", "2", "--seed", "1")
    assert not np.array_equal(a, b)
    _sample(trained_run, tmp_path / "c", "--num", "2", "--class-labels", "7,seven", "--cfg-scale", "3")
    settings = json.loads((tmp_path / "c" / "report.json").read_text())["settings"]
    assert settings["class_labels"] == "7,seven" and settings["cfg_scale"] == 3.0
    proc = invoke_ditk("sample", trained_run, "--class-labels", "11", "--out", tmp_path / "d")
    assert proc.returncode == 2 and "11" in proc.stderr


def test_other_settings_into_the_same_folder_are_refused(trained_run, tmp_path):
    _sample(trained_run, tmp_path / "s", "--num", "2")
    proc = invoke_ditk("sample", trained_run, "--out", tmp_path / "s", "--num", "2", "--seed", "9")
    assert proc.returncode == 2 and "other settings" in proc.stderr


def test_every_solver_runs(trained_run, tmp_path):
    for solver in ("ddim", "dpm-solver++", "unipc"):
        arr = _sample(trained_run, tmp_path / solver, "--num", "2", "--solver", solver)
        assert arr.shape == (2, 8, 8, 1)
    proc = invoke_ditk("sample", trained_run, "--solver", "euler", "--num", "1", "--out", tmp_path / "e")
    assert proc.returncode == 2


def test_official_format_checkpoint_with_preset(trained_run, tmp_path):
    """Weights saved the way facebookresearch/DiT saves them load through --preset."""
    from safetensors.torch import load_file

    ema = load_file(trained_run / "checkpoints" / "step-000006" / "ema.safetensors")
    torch.save({"model": ema, "ema": ema, "opt": {}, "args": None}, tmp_path / "DiT-tiny.pt")
    a = _sample(trained_run, tmp_path / "from_run", "--num", "3")
    b = _sample(tmp_path / "DiT-tiny.pt", tmp_path / "from_pt", "--num", "3",
                "--preset", trained_run / "config.yaml")
    np.testing.assert_array_equal(a, b)
    proc = invoke_ditk("sample", tmp_path / "DiT-tiny.pt")
    assert proc.returncode == 2 and "--preset" in proc.stderr


def test_latent_space_with_a_local_autoencoder_kl(tmp_path):
    """Train and sample in the latent space of a (tiny, random) diffusers AutoencoderKL from a local path,
    with latents pre-encoded once (fast-DiT style)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                        norm_num_groups=4, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    args = [*TINY, "train.max_steps=2", "data.image_size=16", "autoencoder.name=autoencoder-kl",
            f"autoencoder.path={tmp_path / 'vae'}", "model.in_channels=4", "model.input_size=8",
            "train.precompute_latents=true", f"run.dir={tmp_path}", "run.name=latent", "--no-progress"]
    invoke_ditk("train", "digits-dit", *args, check=True)
    assert list((tmp_path / "latent" / "latents").glob("*/manifest.json"))  # the latent cache (ditk.data.latent_cache)
    arr = _sample(tmp_path / "latent", tmp_path / "s", "--num", "2")
    assert arr.shape == (2, 16, 16, 1)


def test_default_folder_names_the_prompt(trained_run):
    """A prompted sample gets its own default folder (`evaluate-fid --run` and later samples would otherwise meet
    the unprompted images there): a filesystem-safe tag of the prompt plus a hash of it."""
    import hashlib
    import re

    from ditk.generate import default_out_dir, load_pipeline

    prompts = [None, "a handwritten three", "A handwritten three!", "a handwritten seven", "../../x y/z"]
    dirs = {}
    for prompt in prompts:
        overrides = [] if prompt is None else [f"sample.prompt={json.dumps(prompt)}"]
        dirs[prompt] = default_out_dir(load_pipeline(str(trained_run), overrides=overrides, device="cpu"), str(trained_run))
    assert len(set(dirs.values())) == len(prompts)  # case and punctuation count too
    assert all(d.parent == trained_run / "generated" for d in dirs.values())
    digest = hashlib.sha1(b"a handwritten three").hexdigest()[:6]
    assert dirs["a handwritten three"].name == f"{dirs[None].name}-a-handwritten-three-{digest}"
    assert re.fullmatch(r"[a-z0-9.-]+", dirs["../../x y/z"].name) and dirs["../../x y/z"].name.endswith(
        "-x-y-z-" + hashlib.sha1(b"../../x y/z").hexdigest()[:6])
