"""Datasets, the resumable sampler, pre-encoded latents and the class conditioner."""

import itertools
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from ditk.data.digits import DigitsConfig
from ditk.data.image_folder import ImageFolderConfig, center_crop_arr
from ditk.data.latents import LatentsConfig, encode_dataset
from ditk.data.sampler import ResumableBatchSampler, flip_decision
from ditk.errors import ConfigError
from ditk.registry import AUTOENCODERS, CONDITIONERS, DATASETS


def one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


# ----------------------------------------------------------------------------------------------- digits


def test_digits_match_sklearn_scaled_to_unit_range():
    from sklearn.datasets import load_digits

    ds = DATASETS.build("digits", DigitsConfig(split="all"))
    ref = load_digits()
    assert len(ds) == 1797 and ds.shape == (1, 8, 8) and ds.num_classes == 10
    assert ds.class_names == ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    np.testing.assert_array_equal(x[:, 0].numpy(), ref.images / 8.0 - 1.0)  # 0 -> -1, 16 -> +1
    assert [ds[i][1] for i in range(len(ds))] == ref.target.tolist()
    assert isinstance(ds[0][1], int) and x.dtype == torch.float32


def test_digits_split_is_fixed_stratified_and_disjoint():
    cfg = OmegaConf.structured(DigitsConfig(split="train"))  # builders take typed OmegaConf configs too
    train = DATASETS.build("digits", cfg)
    test = DATASETS.build("digits", DigitsConfig(split="test"))
    again = DATASETS.build("digits", DigitsConfig(split="test"))
    assert set(train.indices).isdisjoint(test.indices)
    assert sorted(set(train.indices) | set(test.indices)) == list(range(1797))
    np.testing.assert_array_equal(test.indices, again.indices)
    counts = np.bincount(DATASETS.build("digits", DigitsConfig(split="all")).labels.numpy())
    assert np.bincount(test.labels.numpy()).tolist() == [int(round(c / 10)) for c in counts]
    assert len(train) + len(test) == 1797


def test_digits_upsampling_is_bilinear_and_config_errors():
    small = DATASETS.build("digits", DigitsConfig(split="test"))
    big = DATASETS.build("digits", DigitsConfig(split="test", image_size=16))
    assert big.shape == (1, 16, 16)
    ref = F.interpolate(small.images[:5], size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(torch.stack([big[i][0] for i in range(5)]), ref)
    with pytest.raises(ConfigError) as e:
        DATASETS.build("digits", DigitsConfig(hflip=True))
    assert "hflip" in one_line(e)
    with pytest.raises(ConfigError):
        DATASETS.build("digits", DigitsConfig(split="validation"))
    with pytest.raises(ConfigError):
        DATASETS.build("digits", DigitsConfig(image_size=12))
    assert small[(3, 7)][0].equal(small[3][0])  # (index, epoch) items are accepted everywhere


# ------------------------------------------------------------------------------------------ center crop


def _rand_image(w, h, seed=0):
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, size=(h, w, 3), dtype=np.uint8))


def test_center_crop_exact_size_is_identity_and_short_side_match_is_a_plain_crop():
    img = _rand_image(16, 16)
    np.testing.assert_array_equal(np.array(center_crop_arr(img, 16)), np.array(img))
    img = _rand_image(24, 16)  # short side already 16: no resize, crop x from (24-16)//2 = 4
    np.testing.assert_array_equal(np.array(center_crop_arr(img, 16)), np.array(img)[:, 4:20])
    img = _rand_image(16, 27)  # odd excess: crop y from (27-16)//2 = 5
    np.testing.assert_array_equal(np.array(center_crop_arr(img, 16)), np.array(img)[5:21, :])


def test_center_crop_box_halving_then_bicubic_then_crop():
    # 100x60 -> 16: 60 >= 32 so BOX-halve to 50x30; 30 < 32 stop; BICUBIC by 16/30 to (round(26.67)=27, 16);
    # crop x from (27-16)//2 = 5.
    img = _rand_image(100, 60, seed=1)
    step = img.resize((50, 30), resample=Image.BOX).resize((27, 16), resample=Image.BICUBIC)
    np.testing.assert_array_equal(np.array(center_crop_arr(img, 16)), np.array(step)[:, 5:21])
    # 32x32 -> 16: one BOX halving (a 2x2 mean), then the BICUBIC resize to the same size is a copy
    img = _rand_image(32, 32, seed=2)
    a = np.array(img).astype(np.float64).reshape(16, 2, 16, 2, 3).mean(axis=(1, 3))
    out = np.array(center_crop_arr(img, 16)).astype(np.float64)
    assert out.shape == (16, 16, 3) and np.abs(out - a).max() <= 1  # PIL's fixed-point BOX is within 1
    # 130x70 -> 16: halve twice (130x70 -> 65x35 -> 32x17), BICUBIC by 16/17 to (round(30.1)=30, 16), crop x 7
    img = _rand_image(130, 70, seed=3)
    step = img.resize((65, 35), Image.BOX).resize((32, 17), Image.BOX).resize((30, 16), Image.BICUBIC)
    np.testing.assert_array_equal(np.array(center_crop_arr(img, 16)), np.array(step)[:, 7:23])


# ----------------------------------------------------------------------------------------- image folder


def _write(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture
def image_tree(tmp_path):
    root = tmp_path / "imgs"
    ramp = np.tile(np.linspace(0, 255, 20).astype(np.uint8)[None, :, None], (20, 1, 3))  # left dark, right bright
    _write(root / "b_dogs" / "1.png", np.full((30, 40, 3), (255, 0, 0), np.uint8))
    _write(root / "a_cats" / "x.png", ramp)
    _write(root / "a_cats" / "deep" / "y.bmp", np.full((16, 16, 3), 0, np.uint8))
    gray = root / "a_cats" / "z.png"
    Image.fromarray(np.full((18, 18), 255, np.uint8)).save(gray)  # grayscale file -> RGB
    (root / "a_cats" / "notes.txt").write_text("not an image")
    _write(root / ".hidden" / "h.png", np.zeros((16, 16, 3), np.uint8))
    return root


def test_image_folder_layout_and_pixels(image_tree):
    ds = DATASETS.build("image-folder", OmegaConf.structured(ImageFolderConfig(path=str(image_tree), image_size=16, hflip=False)))
    assert ds.class_names == ["a_cats", "b_dogs"] and ds.num_classes == 2 and ds.shape == (3, 16, 16)
    names = [os.path.relpath(f, image_tree) for f, _ in ds.samples]
    assert names == ["a_cats/x.png", "a_cats/z.png", "a_cats/deep/y.bmp", "b_dogs/1.png"]
    assert [y for _, y in ds.samples] == [0, 0, 0, 1]
    red, label = ds[3]
    assert label == 1 and red.shape == (3, 16, 16)
    torch.testing.assert_close(red, torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 16, 16))
    torch.testing.assert_close(ds[1][0], torch.ones(3, 16, 16))  # gray 255 -> white RGB
    torch.testing.assert_close(ds[2][0], -torch.ones(3, 16, 16))
    ramp = ds[0][0]
    expected = torch.from_numpy(np.array(center_crop_arr(Image.open(image_tree / "a_cats" / "x.png").convert("RGB"), 16)))
    torch.testing.assert_close(ramp, expected.permute(2, 0, 1).float() / 127.5 - 1)


def test_image_folder_flips_are_deterministic_per_index_and_epoch(image_tree):
    ds = DATASETS.build("image-folder", ImageFolderConfig(path=str(image_tree), image_size=16, hflip=True, flip_seed=5))
    plain = ds.load(0)[0]
    assert not plain.equal(plain.flip(-1))  # the ramp is not symmetric, so a flip is visible
    seen = set()
    for epoch in range(12):
        x, _ = ds[(0, epoch)]
        flipped = flip_decision(5, 0, epoch)
        assert x.equal(plain.flip(-1) if flipped else plain)
        seen.add(flipped)
        ds.set_epoch(epoch)
        assert ds[0][0].equal(x)  # a bare index uses set_epoch's value
    assert seen == {True, False}
    off = DATASETS.build("image-folder", ImageFolderConfig(path=str(image_tree), image_size=16, hflip=False))
    assert all(off[(0, e)][0].equal(plain) for e in range(12))


def test_flip_decision_is_balanced_and_varies_with_every_argument():
    bits = np.array([[flip_decision(0, i, e) for i in range(2000)] for e in range(3)])
    assert 0.46 < bits.mean() < 0.54
    assert 0.45 < (bits[0] == bits[1]).mean() < 0.55  # epochs independent
    other = np.array([flip_decision(1, i, 0) for i in range(2000)])
    assert 0.45 < (bits[0] == other).mean() < 0.55  # seeds independent
    assert flip_decision(0, 7, 3) == flip_decision(0, 7, 3)


def test_image_folder_errors_name_the_path_and_layout(tmp_path, image_tree):
    with pytest.raises(ConfigError) as e:
        DATASETS.build("image-folder", ImageFolderConfig(path=str(tmp_path / "nope")))
    assert "nope" in one_line(e) and "expected" in one_line(e)
    with pytest.raises(ConfigError) as e:
        DATASETS.build("image-folder", ImageFolderConfig())  # path not set
    assert "data.path" in one_line(e)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as e:
        DATASETS.build("image-folder", ImageFolderConfig(path=str(tmp_path / "empty")))
    assert "empty" in one_line(e) and "no images" in one_line(e)
    (tmp_path / "texts" / "c").mkdir(parents=True)
    (tmp_path / "texts" / "c" / "a.txt").write_text("x")
    with pytest.raises(ConfigError) as e:
        DATASETS.build("image-folder", ImageFolderConfig(path=str(tmp_path / "texts")))
    assert "no images" in one_line(e)
    flat = DATASETS.build("image-folder", ImageFolderConfig(path=str(image_tree / "b_dogs"), image_size=8))
    assert flat.num_classes == 1 and len(flat) == 1 and flat[0][0].shape == (3, 8, 8)


# ---------------------------------------------------------------------------------------------- sampler


def test_sampler_follows_the_contract_permutation():
    s = ResumableBatchSampler(23, 4, seed=3)
    assert s.steps_per_epoch == 5
    batches = list(itertools.islice(iter(s), 12))
    for step, batch in enumerate(batches):
        e, k = divmod(step, 5)
        perm = torch.randperm(23, generator=torch.Generator().manual_seed(3 * 1_000_003 + e))
        assert batch == perm[k * 4 : k * 4 + 4].tolist()


def test_sampler_resume_equals_uninterrupted():
    full = list(itertools.islice(iter(ResumableBatchSampler(50, 8, seed=1)), 40))
    for k in (0, 1, 5, 6, 13, 31):
        resumed = list(itertools.islice(iter(ResumableBatchSampler(50, 8, seed=1, start_step=k)), 40 - k))
        assert resumed == full[k:]
    assert full != list(itertools.islice(iter(ResumableBatchSampler(50, 8, seed=2)), 40))


def test_sampler_rank_slices_union_to_the_global_batch():
    single = list(itertools.islice(iter(ResumableBatchSampler(37, 12, seed=0)), 9))
    ranks = [list(itertools.islice(iter(ResumableBatchSampler(37, 12, seed=0, rank=r, world_size=3)), 9)) for r in range(3)]
    for step, batch in enumerate(single):
        parts = [ranks[r][step] for r in range(3)]
        assert all(len(p) == 4 for p in parts)
        assert sorted(sum(parts, [])) == sorted(batch)
        assert parts[1] == batch[1::3]


def test_sampler_visits_every_index_once_per_epoch():
    s = ResumableBatchSampler(24, 6, seed=4)
    steps = list(itertools.islice(iter(s), 4 * 3))
    for e in range(3):
        assert sorted(sum(steps[e * 4 : (e + 1) * 4], [])) == list(range(24))
    assert sum(steps[0:4], []) != sum(steps[4:8], [])  # a fresh shuffle each epoch
    ragged = list(itertools.islice(iter(ResumableBatchSampler(23, 6, seed=4, drop_last=False)), 4))
    assert [len(b) for b in ragged] == [6, 6, 6, 5] and sorted(sum(ragged, [])) == list(range(23))
    dropped = list(itertools.islice(iter(ResumableBatchSampler(23, 6, seed=4)), 3))
    assert len(set(sum(dropped, []))) == 18


def test_sampler_with_epoch_pairs_and_errors():
    s = ResumableBatchSampler(10, 4, seed=0, start_step=3, with_epoch=True)
    plain = ResumableBatchSampler(10, 4, seed=0, start_step=3)
    for got, want, step in zip(iter(s), iter(plain), range(3, 8)):
        assert [i for i, _ in got] == want and {e for _, e in got} == {step // 2}
    with pytest.raises(ConfigError):
        ResumableBatchSampler(10, 4, seed=0, world_size=3)
    with pytest.raises(ConfigError):
        ResumableBatchSampler(10, 16, seed=0)
    with pytest.raises(ConfigError):
        ResumableBatchSampler(0, 1, seed=0)


def test_dataloader_with_epoch_pairs_and_workers(image_tree):
    ds = DATASETS.build("image-folder", ImageFolderConfig(path=str(image_tree), image_size=8, flip_seed=2))
    sampler = ResumableBatchSampler(len(ds), 2, seed=0, with_epoch=True)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=1)
    for (x, y), pairs in zip(loader, itertools.islice(iter(sampler), 6)):
        want = torch.stack([ds[p][0] for p in pairs])
        assert x.equal(want) and y.tolist() == [ds.samples[i][1] for i, _ in pairs]


# ---------------------------------------------------------------------------------------------- latents


def _tiny_kl(scale=0.5):
    from diffusers import AutoencoderKL

    from ditk.autoencoders import KLAutoencoder

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=16,
    )
    return KLAutoencoder(vae, path="tiny", scale_factor=scale, sample_posterior=True)


def test_latents_identity_round_trip_and_metadata(tmp_path):
    from safetensors.torch import load_file

    ds = DATASETS.build("digits", DigitsConfig(split="test"))
    out = encode_dataset(ds, AUTOENCODERS.build("identity"), tmp_path / "d.safetensors", batch_size=64, dtype="float32")
    assert sorted(os.listdir(tmp_path)) == ["d.safetensors"]  # nothing temporary left behind
    raw = load_file(out)  # a plain safetensors file, readable by the reference loader
    assert set(raw) == {"latents", "labels"}
    assert raw["latents"].equal(ds.images) and raw["labels"].equal(ds.labels)
    lat = DATASETS.build("latents", OmegaConf.structured(LatentsConfig(path=str(out))))
    assert len(lat) == len(ds) and lat.shape == (1, 8, 8) and lat.num_classes == 10 and not lat.hflip
    assert lat.class_names == ds.class_names and lat.autoencoder == "identity" and lat.scale_factor == 1.0
    assert lat.metadata["count"] == str(len(ds)) and lat.metadata["image_size"] == "8"
    for i in (0, 17, len(ds) - 1):
        x, y = lat[(i, 4)]
        assert x.dtype == torch.float32 and x.equal(ds[i][0]) and y == ds[i][1]
    half = encode_dataset(ds, AUTOENCODERS.build("identity"), tmp_path / "h.safetensors", batch_size=50)
    assert DATASETS.build("latents", LatentsConfig(path=str(half)))[5][0].equal(ds[5][0].half().float())
    assert pickle.loads(pickle.dumps(lat))[3][0].equal(ds[3][0])  # picklable after reads (DataLoader workers)


def test_latents_kl_with_flips_equal_direct_encoding(tmp_path, image_tree):
    ds = DATASETS.build("image-folder", ImageFolderConfig(path=str(image_tree), image_size=16, hflip=True))
    ae = _tiny_kl()
    out = encode_dataset(ds, ae, tmp_path / "kl.safetensors", batch_size=3, dtype="float32", seed=7)
    g = torch.Generator().manual_seed(7)
    direct, direct_flip = [], []
    for start in (0, 3):  # the same batches, the same generator order: images, then their mirrors
        x = torch.stack([ds.load(i)[0] for i in range(start, min(start + 3, len(ds)))])
        direct.append(ae.encode(x, generator=g))
        direct_flip.append(ae.encode(x.flip(-1), generator=g))
    direct, direct_flip = torch.cat(direct), torch.cat(direct_flip)
    lat = DATASETS.build("latents", LatentsConfig(path=str(out), flip_seed=3))
    assert lat.shape == (4, 8, 8) and lat.hflip and lat.metadata["autoencoder"] == "autoencoder-kl"
    assert lat.metadata["scale_factor"] == "0.5" and lat.metadata["flips"] == "true"
    for i in range(len(ds)):
        assert lat.load(i)[0].equal(direct[i]) and lat.load(i, True)[0].equal(direct_flip[i])
        for e in range(4):
            want = direct_flip[i] if flip_decision(3, i, e) else direct[i]
            assert lat[(i, e)][0].equal(want)
    assert not direct_flip.equal(direct)
    never = DATASETS.build("latents", LatentsConfig(path=str(out), hflip=False))
    assert all(never[(0, e)][0].equal(direct[0]) for e in range(6))


def test_latents_errors(tmp_path):
    with pytest.raises(ConfigError) as e:
        DATASETS.build("latents", LatentsConfig(path=str(tmp_path / "none.safetensors")))
    assert "none.safetensors" in one_line(e)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(ConfigError):
        DATASETS.build("latents", LatentsConfig(path=str(bad)))
    ds = DATASETS.build("digits", DigitsConfig(split="test"))
    out = encode_dataset(ds, AUTOENCODERS.build("identity"), tmp_path / "d.safetensors")
    with pytest.raises(ConfigError) as e:
        DATASETS.build("latents", LatentsConfig(path=str(out), hflip=True))
    assert "flips" in one_line(e)


# ------------------------------------------------------------------------------------------ conditioner


def test_class_conditioner():
    cond = CONDITIONERS.build("class", None, 10, [f"c{i}" for i in range(10)])
    assert cond.cond([3, 5])["y"].tolist() == [3, 5] and cond.cond([3])["y"].dtype == torch.long
    assert cond.uncond(3)["y"].tolist() == [10, 10, 10]
    labels = torch.arange(10).repeat(100)
    assert cond.drop(labels, torch.Generator().manual_seed(0), 0.0).equal(labels)
    assert (cond.drop(labels, torch.Generator().manual_seed(0), 1.0) == 10).all()
    dropped = cond.drop(labels, torch.Generator().manual_seed(1), 0.1)
    mask = torch.rand(1000, generator=torch.Generator().manual_seed(1)) < 0.1
    assert dropped.equal(torch.where(mask, 10, labels)) and 50 < mask.sum() < 150
    assert cond.parse_labels("3,5,7") == [3, 5, 7] == cond.parse_labels(" 3 5  7 ")
    assert cond.parse_labels("C7, c0") == [7, 0]
    with pytest.raises(ConfigError) as e:
        cond.parse_labels("3,10")
    assert "0..9" in one_line(e)
    with pytest.raises(ConfigError) as e:
        cond.parse_labels("c77")
    assert "did you mean" in one_line(e)
    with pytest.raises(ConfigError):
        cond.parse_labels("  ")
