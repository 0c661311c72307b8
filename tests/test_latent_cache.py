"""train.precompute_latents (ditk.data.latent_cache, ditk.data.latents): the VAE posterior's moments encoded
once, sharded per process, and a fresh latent drawn at every step, which is the step that encodes the pixels."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ditk_testing import TINY, invoke_ditk, torchrun
from ditk.data import latent_cache
from ditk.data.latents import Latents, PosteriorDraw, encode_moments


def _vae(channels=3, seed=0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=channels, out_channels=channels, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                         norm_num_groups=4, sample_size=16)


def _kl(**kw):
    from ditk.autoencoders import KLAutoencoder

    return KLAutoencoder(_vae(), "tiny", **{"scale_factor": 0.5, **kw})


class _Images(torch.utils.data.Dataset):
    """Random images with labels and flips, as an image folder presents them (load(i, flip))."""

    def __init__(self, n=10, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand((n, 3, 16, 16), generator=g) * 2 - 1
        self.y = torch.arange(n) % 3
        self.hflip, self.shape, self.num_classes, self.class_names = True, (3, 16, 16), 3, ["a", "b", "c"]

    def __len__(self):
        return len(self.x)

    def load(self, i, flip=False):
        return (self.x[i].flip(-1) if flip else self.x[i]), int(self.y[i])


def test_posterior_split_is_encode_bit_for_bit():
    """encode(x, g) == from_posterior(*posterior(x), posterior_noise(shape, g)): for the image VAE and for the
    mel VAE, whose draw is made in its own (time, mel) layout."""
    from ditk.audio.vae import MelVAE

    x = torch.rand((3, 3, 16, 16)) * 2 - 1
    for ae in (_kl(shift_factor=0.1), _kl(sample_posterior=False)):
        mean, std = ae.posterior(x)
        eps = ae.posterior_noise(mean.shape, torch.Generator().manual_seed(5)) if ae.sample_posterior else None
        assert ae.from_posterior(mean, std, eps).equal(ae.encode(x, generator=torch.Generator().manual_seed(5)))
    mel = MelVAE(_vae(channels=1), "tiny-mel", scale_factor=0.7)
    spec = torch.rand((2, 1, 16, 32)) * 2 - 1  # (N, 1, n_mels, frames): non-square, so the layouts differ
    mean, std = mel.posterior(spec)
    assert mean.shape == (2, 4, 8, 16)
    eps = mel.posterior_noise(mean.shape, torch.Generator().manual_seed(2))
    assert mel.from_posterior(mean, std, eps).equal(mel.encode(spec, generator=torch.Generator().manual_seed(2)))


def test_per_step_draws_follow_the_posterior(tmp_path):
    """Drawing from the stored moments is sampling the VAE posterior: over 4,000 draws the mean and std of each
    latent element match the closed form scale * (mean - shift), scale * std of vae.encode(x).latent_dist; and
    with the step's generator the draw is encode's own, bit for bit."""
    ae = _kl(shift_factor=0.1)
    ds = _Images(4)
    shard = encode_moments(ds, ae, tmp_path / "s.safetensors", dtype="float32", batch_size=4)
    lat = Latents(str(shard))
    assert lat.kind == "moments" and lat.shape == (8, 8, 8) and lat.stored_flips
    x = torch.stack([ds.load(i)[0] for i in range(4)])
    dist = ae.vae.encode(x).latent_dist
    mu, sigma = 0.5 * (dist.mean - 0.1), 0.5 * dist.std
    moments = torch.stack([lat.load(i)[0] for i in range(4)])
    flipped = torch.stack([lat.load(i, True)[0] for i in range(4)])
    torch.testing.assert_close(flipped[:, :4], ae.posterior(x.flip(-1))[0], rtol=1e-5, atol=1e-6)
    draw = PosteriorDraw(ae)
    k = 4000
    z = draw.encode(moments.repeat(k, 1, 1, 1), torch.Generator().manual_seed(0)).view(k, 4, 4, 8, 8)
    mean_err = (z.mean(0) - mu).abs() / (sigma / k ** 0.5)
    assert mean_err.max() < 5.5 and mean_err.mean() < 1.0  # |z-score| of each element's sample mean
    torch.testing.assert_close(z.std(0) / sigma, torch.ones_like(sigma), rtol=0, atol=0.1)
    assert draw.encode(moments, torch.Generator().manual_seed(9)).equal(
        ae.encode(x, generator=torch.Generator().manual_seed(9)))
    # bfloat16 storage (train.latents_dtype): half the file, the moments to bfloat16's 8 bits
    half = encode_moments(ds, ae, tmp_path / "h.safetensors", dtype="bfloat16", batch_size=4)
    assert half.stat().st_size < 0.6 * shard.stat().st_size
    assert Latents(str(half)).load(2)[0].equal(moments[2].bfloat16().float())
    # sample_posterior=false: the mean, no draw
    assert PosteriorDraw(ae, sample_posterior=False).encode(moments).equal(0.5 * (dist.mean - 0.1))


def test_processes_draw_their_rows_of_the_global_draw():
    ae = _kl()
    moments = torch.rand((6, 8, 8, 8)) + 0.1
    whole = PosteriorDraw(ae).encode(moments, torch.Generator().manual_seed(3))
    for rank in (0, 1):
        part = PosteriorDraw(ae, rank, 2).encode(moments[rank::2], torch.Generator().manual_seed(3))
        assert part.equal(whole[rank::2])


def _image_folder(root: Path, n=16):
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / ("cats" if i % 2 else "dogs")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return root


def _losses(run: Path) -> list:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def vae_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent-cache")
    _vae().save_pretrained(root / "vae")
    _image_folder(root / "imgs")
    args = [*TINY, "data.name=image-folder", f"data.path={root / 'imgs'}", "data.image_size=16", "data.hflip=true",
            "model.num_classes=2", "autoencoder.name=autoencoder-kl", f"autoencoder.path={root / 'vae'}",
            "model.in_channels=4", "model.input_size=8", "train.num_workers=0", "--no-progress"]
    return root, args


def test_cached_step_is_the_step_that_encodes_the_pixels(vae_setup):
    """3 steps (3 epochs of 16 images, random flips) from the cache = 3 steps encoding every batch, same eps."""
    root, args = vae_setup
    runs = root / "equal"
    cached = invoke_ditk("train", "digits-dit", *args, "train.max_steps=3", "train.precompute_latents=true",
                         f"run.dir={runs}", "run.name=cached", check=True)
    fly = invoke_ditk("train", "digits-dit", *args, "train.max_steps=3", "train.precompute_latents=false",
                      f"run.dir={runs}", "run.name=fly", check=True)
    assert "encoding the data set's VAE posteriors once" in cached.stderr and "encoding" not in fly.stderr
    assert _losses(runs / "cached") == pytest.approx(_losses(runs / "fly"), rel=1e-5)
    a = load_file(runs / "cached" / "checkpoints" / "step-000003" / "model.safetensors")
    b = load_file(runs / "fly" / "checkpoints" / "step-000003" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    # The same step either way: a run resumes with the other setting (a speed lever) and stays on the same path.
    invoke_ditk("train", "digits-dit", *args, "train.max_steps=4", "train.precompute_latents=true",
                f"run.dir={runs}", "run.name=fly", check=True)
    invoke_ditk("train", "digits-dit", *args, "train.max_steps=4", "train.precompute_latents=true",
                f"run.dir={runs}", "run.name=cached", check=True)
    assert len(_losses(runs / "fly")) == 4
    assert _losses(runs / "fly") == pytest.approx(_losses(runs / "cached"), rel=1e-5)


def _cache(run: Path) -> Path:
    (folder,) = [p for p in (run / "latents").iterdir() if p.is_dir()]
    return folder


@pytest.mark.slow
def test_two_processes_shard_the_encode_and_train_on_the_same_latents(vae_setup):
    """torchrun, 2 CPU processes (gloo): each writes its shard, rank 0 the complete manifest, and the run equals
    a 1-process run (same moments, same losses), as does a 2-process run encoding every batch. Then a damaged shard is found and encoded again on resume, and
    another VAE (new weights) gets a cache of its own."""
    root, args = vae_setup
    runs = root / "dist"
    overrides = [a for a in args if "=" in a] + ["train.precompute_latents=true"]
    spec = ",".join(o for o in overrides if not o.startswith(tuple(k.split("=")[0] for k in TINY)))
    stderr = torchrun(Path(__file__).parent / "distributed_runs.py", runs, f"two:3:{spec}",
                      f"fly:3:{spec},train.precompute_latents=false")
    assert "rank 0: encoding shard-000000000-000000008" in stderr and "rank 1: encoding shard-000000008-000000016" in stderr
    one = invoke_ditk("train", "digits-dit", *args, "train.max_steps=3", "train.precompute_latents=true",
                      f"run.dir={runs}", "run.name=one", check=True)
    assert "encoding" in one.stderr
    two_cache, one_cache = _cache(runs / "two"), _cache(runs / "one")
    assert two_cache.name == one_cache.name  # the same key: the same VAE, data and settings
    manifest = json.loads((two_cache / "manifest.json").read_text())
    assert manifest["count"] == 16 and [(s["start"], s["stop"]) for s in manifest["shards"]] == [(0, 8), (8, 16)]
    assert sorted(p.name for p in two_cache.iterdir()) == sorted(
        [s["file"] for s in manifest["shards"]] + [s["file"].replace(".safetensors", ".json") for s in manifest["shards"]]
        + ["manifest.json"])  # nothing else left (markers, temp files)
    a, b = Latents(str(two_cache / "manifest.json")), Latents(str(one_cache / "manifest.json"))
    for i in range(16):
        for flip in (False, True):
            torch.testing.assert_close(a.load(i, flip)[0], b.load(i, flip)[0], rtol=1e-5, atol=1e-6)
        assert a.load(i)[1] == b.load(i)[1]
    assert _losses(runs / "two") == pytest.approx(_losses(runs / "one"), rel=1e-4)
    assert _losses(runs / "fly") == pytest.approx(_losses(runs / "one"), rel=1e-4)  # each process its own eps
    assert not (runs / "fly" / "latents").exists()

    # A damaged shard (one byte changed) is found when the run resumes, named in one line, and encoded again.
    shard = two_cache / manifest["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    resumed = invoke_ditk("train", "digits-dit", *args, "train.max_steps=4", "train.precompute_latents=true",
                          f"run.dir={runs}", "run.name=two", check=True)
    (line,) = [l for l in resumed.stderr.splitlines() if "latent cache shard" in l]
    assert shard.name in line and "damaged: encoding it again" in line
    assert latent_cache.shard_problem(two_cache, manifest["shards"][1]) is None  # the same bytes again
    assert len(_losses(runs / "two")) == 4

    # Other VAE weights: another key, another cache folder; the old one is not read.
    _vae(seed=1).save_pretrained(root / "vae2")
    other = invoke_ditk("train", "digits-dit", *[a.replace("/vae", "/vae2") for a in args], "train.max_steps=1",
                        "train.precompute_latents=true", f"run.dir={runs}", "run.name=one-other",
                        f"train.latents_dir={runs / 'one' / 'latents'}", check=True)
    assert "encoding" in other.stderr
    assert len([p for p in (runs / "one" / "latents").iterdir() if p.is_dir()]) == 2


def test_truncated_or_unrecorded_shards_are_encoded_again(tmp_path, capsys):
    """A shard cut short (listed by the manifest) is reported and re-encoded; a shard with no record beside it
    (an encode killed after the rename) is re-encoded silently; a complete cache is reused as it is."""
    ae, ds = _kl(), _Images(6)
    key = "k" * 64

    def prepare():
        return latent_cache.prepare(tmp_path, key, ds, ae, flips=True, shard_items=4)

    manifest = prepare()
    folder = manifest.parent
    info = json.loads(manifest.read_text())
    assert [(e["start"], e["stop"]) for e in info["shards"]] == [(0, 4), (4, 6)]
    shard = folder / info["shards"][0]["file"]
    reference = Latents(str(manifest))
    mtime = shard.stat().st_mtime_ns
    capsys.readouterr()
    assert prepare() == manifest and shard.stat().st_mtime_ns == mtime  # reused, not rewritten
    shard.write_bytes(shard.read_bytes()[:-64])
    prepare()
    err = capsys.readouterr().err
    assert "has" in err and "truncated or overwritten: encoding it again" in err
    assert all(reference.load(i)[0].equal(Latents(str(manifest)).load(i)[0]) for i in range(6))
    (folder / shard.name.replace(".safetensors", ".json")).unlink()
    manifest.unlink()
    prepare()
    assert json.loads(manifest.read_text()) == info
    assert "again" not in capsys.readouterr().err
    # Another key never reads this folder.
    assert latent_cache.prepare(tmp_path, "j" * 64, ds, ae, flips=True).parent != folder


def test_cache_key_follows_weights_data_and_settings():
    ae, ds = _kl(), _Images(4)
    data, ae_cfg = {"name": "x", "image_size": 16, "flip_seed": 0}, {"name": "autoencoder-kl", "path": "/a"}
    key = latent_cache.cache_key(data, ae_cfg, ds, ae, "float32", True)
    assert key == latent_cache.cache_key({**data, "flip_seed": 3}, {**ae_cfg, "path": "/b"}, ds, ae, "float32", True)
    with torch.no_grad():
        next(ae.vae.parameters()).view(-1)[0] += 1e-3
    changed = [latent_cache.cache_key(data, ae_cfg, ds, ae, "float32", True),
               latent_cache.cache_key({**data, "image_size": 32}, ae_cfg, ds, _kl(), "float32", True),
               latent_cache.cache_key(data, {**ae_cfg, "scale_factor": 0.13}, ds, _kl(), "float32", True),
               latent_cache.cache_key(data, ae_cfg, _Images(5), _kl(), "float32", True),
               latent_cache.cache_key(data, ae_cfg, ds, _kl(), "float16", True),
               latent_cache.cache_key(data, ae_cfg, ds, _kl(), "float32", False)]
    assert len(set(changed + [key])) == len(changed) + 1
    assert latent_cache.plan(10, 3) == [[(0, 3)], [(3, 6)], [(6, 10)]] and latent_cache.plan(1, 2) == [[], [(0, 1)]]
    assert latent_cache.plan(10, 2, shard_items=2) == [[(0, 2), (2, 4), (4, 5)], [(5, 7), (7, 9), (9, 10)]]


def test_epoch_dependent_data_are_refused(tmp_path):
    """A data set that changes its items per epoch without a load(i, flip) (audio windows, captions) would be
    frozen by a one-time encode: one line, the fix named."""
    from ditk.config import resolve
    from ditk.errors import ConfigError
    from ditk.train import train_in_run_dir

    _vae(channels=1).save_pretrained(tmp_path / "vae")
    cfg = resolve("digits-dit", [*TINY, "train.max_steps=1", "autoencoder.name=autoencoder-kl",
                                 f"autoencoder.path={tmp_path / 'vae'}", "train.precompute_latents=true",
                                 "model.in_channels=4", "model.input_size=4", f"run.dir={tmp_path}", "run.name=r"])
    from ditk import build

    original = build.build_dataset

    class EpochItems(torch.utils.data.Dataset):
        def __init__(self, inner):
            self.inner, self.shape, self.num_classes = inner, inner.shape, inner.num_classes

        def __len__(self):
            return len(self.inner)

        def set_epoch(self, epoch):
            pass

        def __getitem__(self, i):
            return self.inner[i]

    import ditk.train as train_module

    train_module.build_dataset = lambda c: EpochItems(original(c))
    try:
        with pytest.raises(ConfigError, match="changes its items from epoch to epoch.*precompute_latents=false"):
            train_in_run_dir(cfg, tmp_path / "r", None, progress=False)
    finally:
        train_module.build_dataset = original
    assert not (tmp_path / "r").exists()


def test_a_start_stopped_after_the_encode_keeps_its_cache(tmp_path, monkeypatch):
    """A first start that fails after encoding (here: the conditioner) keeps the run directory with its shards
    (an ImageNet encode is hours), and the corrected rerun reuses them instead of encoding again."""
    import ditk.train as train_module
    from ditk.config import resolve
    from ditk.errors import ConfigError

    _vae(channels=1).save_pretrained(tmp_path / "vae")
    cfg = resolve("digits-dit", [*TINY, "train.max_steps=1", "autoencoder.name=autoencoder-kl", "train.num_workers=0",
                                 f"autoencoder.path={tmp_path / 'vae'}", "train.precompute_latents=true",
                                 "model.in_channels=4", "model.input_size=4", f"run.dir={tmp_path}", "run.name=r"])

    def refuse(*a, **k):
        raise ConfigError("no conditioner today")

    monkeypatch.setattr(train_module, "build_conditioner", refuse)
    with pytest.raises(ConfigError, match="no conditioner today"):
        train_module.train_in_run_dir(cfg, tmp_path / "r", None, progress=False)
    assert list((tmp_path / "r" / "latents").glob("*/manifest.json"))
    monkeypatch.undo()
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    proc = invoke_ditk("train", "digits-dit", *TINY, "train.max_steps=1", "autoencoder.name=autoencoder-kl",
                       "train.num_workers=0", f"autoencoder.path={tmp_path / 'vae'}", "train.precompute_latents=true",
                       "model.in_channels=4", "model.input_size=4", f"run.dir={tmp_path}", "run.name=r", "--no-progress",
                       check=True)
    assert "encoding" not in proc.stderr and (tmp_path / "r" / "checkpoints").is_dir()
