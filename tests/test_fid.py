"""FID/KID: closed forms, clean-fid parity, input handling, statistics files, offline weights, digits extractor.

No test downloads anything: the Inception tests use stand-in weight files with the real file names and the
checksums patched, and every parity test uses a tiny random-weight extractor through clean-fid's own code.
"""

import re
import socket
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from ditk.errors import DitkError
from ditk.metrics import extractors, offline
from ditk.metrics import stats as stats_io
from ditk.metrics.extractors import DigitsNet, ExtractorHandle, FeatureExtractor
from ditk.metrics.fid import compute_features, compute_stats, evaluate, frechet_distance, kernel_distance
from ditk.metrics.inputs import load_side


# ----------------------------------------------------------------------------------------------- helpers

def digits_uint8():
    """scikit-learn digits as ditk writes them (uint8, ink bright) and their labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.clip(127.5 * (bunch.images / 8.0 - 1.0) + 128.0, 0, 255).astype(np.uint8)
    return x, bunch.target


@pytest.fixture(scope="module")
def digits():
    x, y = digits_uint8()
    order = np.random.RandomState(0).permutation(len(x))
    return x[order[:600]], x[order[600:1200]], y[order[:600]]


def write_pngs(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:05d}.png")
    return folder


def write_npz(path, images):
    np.savez(path, arr_0=images if images.ndim == 4 else images[..., None])
    return path


class TinyRandom(nn.Module):
    """A random-weight extractor of any input size: strided conv, average pool, linear to 8 features."""

    def __init__(self, seed=0, dim=8):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 6, 5, stride=3)
        self.fc = nn.Linear(6 * 4 * 4, dim)

    def forward(self, x):  # x in [0, 255], like clean-fid's Inception
        return self.fc(F.adaptive_avg_pool2d(torch.tanh(self.conv(x / 128 - 1)), 4).flatten(1))


def tiny_handle(mode="clean", net=None):
    net = net or TinyRandom().eval()
    return ExtractorHandle.wrap(FeatureExtractor(name="tiny-random", model=net, mode=mode, dim=8,
                                                 weights_sha256=None, resize=extractors.RESIZE_POLICY[mode]))


def colour_images(n, size, seed, shift=0):
    rng = np.random.RandomState(seed)
    base = rng.randint(0, 200, size=(n, 1, 1, 3)) + shift
    return np.clip(base + rng.randint(0, 56, size=(n, size, size, 3)), 0, 255).astype(np.uint8)


# Big batches: a 2-core machine shared with other jobs pays per torch call, not per image.
QUIET = dict(progress=False, num_workers=0, batch_size=512)
FAST = dict(QUIET, kid=False)  # KID is checked where it is the point: BLAS time on a 2-core machine


# ---------------------------------------------------------------------------------------- Fréchet / KID

def test_frechet_distance_matches_float64_closed_forms():
    rng = np.random.RandomState(0)
    d = 12
    q, _ = np.linalg.qr(rng.randn(d, d))
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    mu1, mu2 = rng.randn(d), rng.randn(d)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    # Commuting covariances: sqrt(S1 S2) = Q diag(sqrt(ab)) Q^T, so the trace term is sum (sqrt a - sqrt b)^2.
    closed = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(closed, rel=1e-9)

    # General covariances: Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2) from symmetric eigendecompositions.
    s2 = (lambda m: m @ m.T + 0.1 * np.eye(d))(rng.randn(d, d))
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    general = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(inner))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(general, rel=1e-8)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_kid_is_clean_fid_kernel_distance_with_a_seed():
    from cleanfid.fid import kernel_distance as clean_kd

    rng = np.random.RandomState(1)
    f1, f2 = rng.randn(60, 8), rng.randn(50, 8) + 0.5
    mean, std = kernel_distance(f1, f2, subsets=20, subset_size=30, seed=3)
    np.random.seed(3)
    assert mean == pytest.approx(clean_kd(f1, f2, num_subsets=20, max_subset_size=30), rel=1e-12)
    assert std > 0
    assert kernel_distance(f1, f2, 20, 30, seed=3) == (mean, std)  # repeatable
    assert kernel_distance(f1, f1 + 0.0, 20, 30)[0] < mean / 5


# ------------------------------------------------------------------------------------ clean-fid parity

@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # SciPy's notice inside clean-fid's own call
@pytest.mark.parametrize("mode", ["clean", "legacy_tensorflow", "legacy_pytorch"])
def test_same_number_as_clean_fid_compute_fid_with_the_same_custom_extractor(tmp_path, mode):
    from cleanfid import fid as cfid

    gen = write_pngs(tmp_path / "gen", colour_images(14, 20, seed=1))
    ref = write_pngs(tmp_path / "ref", colour_images(12, 20, seed=2, shift=30))
    net = TinyRandom(seed=5).eval()
    theirs = cfid.compute_fid(str(gen), str(ref), mode=mode, custom_feat_extractor=net, num_workers=0,
                              batch_size=8, device=torch.device("cpu"), verbose=False)
    ours = evaluate(gen, ref, tiny_handle(mode, net), batch_size=8, use_cache=False, kid=False, progress=False,
                    num_workers=0)
    assert ours["fid"] == pytest.approx(theirs, rel=1e-9)
    assert ours["fid"] > 1e-3 and ours["n_gen"] == 14 and ours["n_ref"] == 12


def test_npz_and_folder_of_the_same_images_give_the_same_features(tmp_path, digits):
    real, _, _ = digits
    for name, images in (("gray", real[:30]), ("rgb", colour_images(30, 16, seed=4))):
        folder = write_pngs(tmp_path / name, images)
        npz = write_npz(tmp_path / f"{name}.npz", images)
        for handle in (tiny_handle(), ExtractorHandle("digits")):
            a = compute_features(load_side(folder, "gen"), handle.get(), **QUIET)
            b = compute_features(load_side(npz, "gen"), handle.get(), **QUIET)
            np.testing.assert_array_equal(a, b)
    ref = write_pngs(tmp_path / "ref", real[30:90])
    fid_folder = evaluate(tmp_path / "gray", ref, ExtractorHandle("digits"), use_cache=False, **FAST)["fid"]
    fid_npz = evaluate(tmp_path / "gray.npz", ref, ExtractorHandle("digits"), use_cache=False, **FAST)["fid"]
    assert fid_folder == fid_npz


# ------------------------------------------------------------------------------------- digits extractor

def test_shipped_digits_extractor_is_the_documented_one_and_separates_heldout_digits():
    from safetensors.torch import load_file

    from ditk.data.digits import split_indices

    assert offline.sha256_file(extractors.DIGITS_WEIGHTS) == extractors.DIGITS_SHA256
    assert extractors.DIGITS_WEIGHTS.stat().st_size < 300_000
    net = DigitsNet()
    net.load_state_dict(load_file(extractors.DIGITS_WEIGHTS))
    x, y = digits_uint8()
    test = split_indices(y, "test")
    with torch.no_grad():
        logits = net(torch.from_numpy(x[test]).float().unsqueeze(1) / 255)
    assert (logits.argmax(1).numpy() == y[test]).mean() > 0.95


def test_digits_pipeline_reads_8x8_and_upscaled_digits_alike(tmp_path, digits):
    real, _, _ = digits
    fe = ExtractorHandle("digits").get()
    direct = fe.model(torch.from_numpy(real[:20]).float()[:, None].repeat(1, 3, 1, 1)).detach().numpy()
    small = compute_features(load_side(write_npz(tmp_path / "s.npz", real[:20]), "gen"), fe, **QUIET)
    big = real[:20].repeat(4, axis=1).repeat(4, axis=2)  # 32x32 PNGs, nearest-upscaled
    large = compute_features(load_side(write_pngs(tmp_path / "big", big), "gen"), fe, **QUIET)
    np.testing.assert_allclose(small, direct, atol=1e-5)
    np.testing.assert_allclose(large, small, atol=1e-5)


def test_digits_fid_separates_real_from_noise_and_shuffled_pixels(tmp_path, digits):
    real_a, real_b, _ = digits
    rng = np.random.RandomState(0)
    controls = {
        "noise": rng.randint(0, 256, size=real_a.shape).astype(np.uint8),
        "shuffled": np.stack([im.reshape(-1)[rng.permutation(64)].reshape(8, 8) for im in real_a]),
    }
    ref = write_npz(tmp_path / "ref.npz", real_b)
    handle = ExtractorHandle("digits")
    kid = dict(use_cache=False, kid_subsets=10, kid_subset_size=300, **QUIET)
    real = evaluate(write_npz(tmp_path / "a.npz", real_a), ref, handle, **kid)
    for name, images in controls.items():
        control = evaluate(write_npz(tmp_path / f"{name}.npz", images), ref, handle, **kid)
        assert real["fid"] * 20 < control["fid"], name
        assert real["kid_mean"] * 20 < control["kid_mean"], name
    assert real["feature_extractor"] == "digits" and real["weights_sha256"] == extractors.DIGITS_SHA256


def test_fid_grows_monotonically_with_perturbation(tmp_path, digits):
    real_a, real_b, _ = digits
    ref = write_npz(tmp_path / "ref.npz", real_b)
    rng = np.random.RandomState(0)
    noise = rng.randn(*real_a.shape)
    fids = []
    for sigma in (0, 10, 25, 50, 100):
        images = np.clip(real_a + sigma * noise, 0, 255).astype(np.uint8)
        fids.append(evaluate(write_npz(tmp_path / f"p{sigma}.npz", images), ref, ExtractorHandle("digits"),
                             use_cache=False, **FAST)["fid"])
    assert all(a < b for a, b in zip(fids, fids[1:])), fids


def test_fid_of_a_set_with_itself_is_zero(tmp_path, digits):
    real, _, _ = digits
    a = write_npz(tmp_path / "a.npz", real[:200])
    b = write_pngs(tmp_path / "b", real[:200])
    assert abs(evaluate(a, b, ExtractorHandle("digits"), use_cache=False, **FAST)["fid"]) < 1e-6


# --------------------------------------------------------------------------------- statistics and cache

def test_stats_files_cache_and_protocol_checks(tmp_path, digits, monkeypatch):
    real_a, real_b, _ = digits
    gen, ref = write_npz(tmp_path / "gen.npz", real_a[:100]), write_pngs(tmp_path / "ref", real_b[:150])
    handle = ExtractorHandle("digits")
    kid = dict(QUIET, kid_subsets=10)
    first = evaluate(gen, ref, handle, cache_dir=tmp_path / "cache", save_stats=tmp_path / "ref-stats.npz", **kid)
    assert first["ref_stats_cache_hit"] is False and first["ref_stats_cache"].startswith(str(tmp_path / "cache"))
    again = evaluate(gen, ref, handle, cache_dir=tmp_path / "cache", **kid)
    assert again["ref_stats_cache_hit"] is True and again["fid"] == first["fid"]
    assert again["kid_mean"] == first["kid_mean"]
    from_file = evaluate(gen, tmp_path / "ref-stats.npz", handle, **FAST)
    assert from_file["fid"] == first["fid"] and from_file["n_ref"] == 150

    only = compute_stats(ref, handle, tmp_path / "only.npz", **QUIET)  # `evaluate-fid REF --save-stats`
    assert only["n"] == 150 and only["saved_stats"] == str(tmp_path / "only.npz")
    np.testing.assert_array_equal(stats_io.load(tmp_path / "only.npz").sigma,
                                  stats_io.load(tmp_path / "ref-stats.npz").sigma)

    # DITK_CACHE_DIR picks the cache root; the folder's content is part of the key.
    monkeypatch.setenv("DITK_CACHE_DIR", str(tmp_path / "envcache"))
    evaluate(gen, ref, handle, **FAST)
    assert len(list((tmp_path / "envcache" / "fid-stats").glob("ref-8x8-clean-digits-*.npz"))) == 1
    Image.fromarray(real_a[0]).save(ref / "00000.png")
    assert evaluate(gen, ref, handle, **FAST)["ref_stats_cache_hit"] is False

    # Statistics are refused under another protocol.
    with pytest.raises(DitkError, match="--extractor digits --mode clean"):
        evaluate(gen, tmp_path / "ref-stats.npz", ExtractorHandle("inception", weights_dir=tmp_path), **FAST)
    wrong = stats_io.load(tmp_path / "ref-stats.npz")
    wrong.meta["weights_sha256"] = "0" * 64
    stats_io.save(wrong, tmp_path / "wrong.npz")
    with pytest.raises(DitkError, match="other digits weights"):
        evaluate(gen, tmp_path / "wrong.npz", ExtractorHandle("digits"), **FAST)


def test_adm_reference_batches_need_the_tensorflow_protocol_and_no_weights_for_stats_pairs(tmp_path):
    rng = np.random.RandomState(0)
    d = 64  # the real files are 2048-d; the checks do not depend on it
    mu1, mu2 = rng.randn(d), rng.randn(d)
    np.savez(tmp_path / "VIRTUAL_imagenet256_labeled.npz", mu=mu2, sigma=np.eye(d) * 0.5, mu_s=mu2[:7], sigma_s=np.eye(7))
    np.savez(tmp_path / "gen.npz", mu=mu1, sigma=np.eye(d) * 2.0)
    with pytest.raises(DitkError, match="legacy_tensorflow"):
        evaluate(tmp_path / "gen.npz", tmp_path / "VIRTUAL_imagenet256_labeled.npz", ExtractorHandle("inception"),
                 **QUIET)
    handle = ExtractorHandle("inception", mode="legacy_tensorflow")
    result = evaluate(tmp_path / "gen.npz", tmp_path / "VIRTUAL_imagenet256_labeled.npz", handle, **QUIET)
    expected = np.sum((mu1 - mu2) ** 2) + d * (np.sqrt(2.0) - np.sqrt(0.5)) ** 2
    assert result["fid"] == pytest.approx(expected, rel=1e-9)
    assert result["kid_mean"] is None and result["n_ref"] is None and not handle.built


@pytest.mark.parametrize("case, message", [
    ("empty", "holds no images"),
    ("only_text", "holds no images (it holds 1 other files"),
    ("one_image", "has 1 image"),
    ("mixed_sizes", "mixes resolutions: 8x8 (2 images) and 16x16"),
    ("mixed_channels", "mixes grayscale and colour"),
    ("corrupt", "is not a readable image"),
    ("float_npz", "expected uint8"),
    ("nchw_npz", "looks like NCHW"),
    ("npz_without_images", "expected arr_0"),
    ("not_an_input", "is not a folder of images"),
    ("missing", "does not exist"),
])
def test_bad_inputs_are_one_line_errors(tmp_path, case, message):
    gray, rgb = np.zeros((8, 8), np.uint8), np.zeros((8, 8, 3), np.uint8)
    path = tmp_path / case
    if case.endswith("_npz") or case == "npz_without_images":
        arrays = {"float_npz": dict(arr_0=np.zeros((4, 8, 8, 3), np.float32)),
                  "nchw_npz": dict(arr_0=np.zeros((4, 3, 8, 8), np.uint8)),
                  "npz_without_images": dict(images=np.zeros((4, 8, 8, 3), np.uint8))}[case]
        path = tmp_path / f"{case}.npz"
        np.savez(path, **arrays)
    elif case == "not_an_input":
        path = tmp_path / "notes.txt"
        path.write_text("hello")
    elif case != "missing":
        path.mkdir()
        files = {"empty": [], "only_text": [], "one_image": [gray], "mixed_channels": [gray, rgb, rgb],
                 "mixed_sizes": [gray, gray, np.zeros((16, 16), np.uint8)], "corrupt": [gray, gray]}[case]
        for i, im in enumerate(files):
            Image.fromarray(im).save(path / f"{i}.png")
        if case == "only_text":
            (path / "readme.txt").write_text("x")
        if case == "corrupt":
            (path / "2.png").write_bytes(b"not a png")
    with pytest.raises(DitkError, match=re.escape(message)) as err:
        load_side(path, "gen")
    assert "\n" not in str(err.value)


def test_gen_and_ref_must_share_channels_but_may_differ_in_size(tmp_path, digits, capsys):
    real, _, _ = digits
    gray = write_npz(tmp_path / "gray.npz", real[:20])
    rgb = write_npz(tmp_path / "rgb.npz", np.repeat(real[20:40, ..., None], 3, axis=-1))
    with pytest.raises(DitkError, match="grayscale .* colour"):
        evaluate(gray, rgb, ExtractorHandle("digits"), use_cache=False, **FAST)
    big = write_npz(tmp_path / "big.npz", real[20:40].repeat(2, axis=1).repeat(2, axis=2))
    evaluate(gray, big, ExtractorHandle("digits"), use_cache=False, **FAST)
    assert "gen is 8x8 and ref is 16x16" in capsys.readouterr().err


# --------------------------------------------------------------------------------------- offline weights

def test_missing_and_wrong_inception_weights_are_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("DITK_WEIGHTS_DIR", raising=False)
    spec = offline.INCEPTION_TORCHSCRIPT
    with pytest.raises(DitkError, match="--weights-dir") as err:
        ExtractorHandle("inception").get()
    assert spec.url in str(err.value) and spec.sha256 in str(err.value)
    with pytest.raises(DitkError, match="missing .*inception-2015-12-05.pt") as err:
        ExtractorHandle("inception", weights_dir=tmp_path).get()
    assert spec.url in str(err.value) and spec.sha256 in str(err.value) and "\n" not in str(err.value)
    (tmp_path / spec.filename).write_bytes(b"half a download")
    monkeypatch.setenv("DITK_WEIGHTS_DIR", str(tmp_path))  # the environment variable is honoured too
    with pytest.raises(DitkError, match="refusing .* sha256 is"):
        ExtractorHandle("inception").get()
    with pytest.raises(DitkError, match="pt_inception-2015-12-05-6726825d.pth"):
        ExtractorHandle("inception", mode="legacy_pytorch").get()
    with pytest.raises(DitkError, match="supports --mode clean"):
        ExtractorHandle("digits", mode="legacy_tensorflow").get()


class FakeInception(nn.Module):
    """Stands in for NVIDIA's TorchScript Inception: the same interface (`layers`, `return_features`)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(3, 4, 13, stride=13), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                    nn.Linear(16, 2048))

    def forward(self, x, return_features: bool = False):
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.layers((x - 128) / 128)


@pytest.fixture
def no_network(monkeypatch):
    import cleanfid.downloads_helper as dh

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(dh, "check_download_inception", refuse)
    monkeypatch.setattr(dh, "check_download_url", refuse)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")  # the reference InceptionV3W below
def test_inception_torchscript_loads_from_the_weights_dir_only(tmp_path, monkeypatch, no_network):
    from cleanfid.fid import get_folder_features
    from cleanfid.inception_torchscript import InceptionV3W

    torch.manual_seed(0)
    path = tmp_path / "w" / offline.INCEPTION_TORCHSCRIPT.filename
    path.parent.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; clean-fid's file is TorchScript
        torch.jit.script(FakeInception()).save(str(path))
    sha = offline.sha256_file(path)
    monkeypatch.setattr(offline, "INCEPTION_TORCHSCRIPT",
                        offline.WeightFile(path.name, offline.INCEPTION_TORCHSCRIPT.url, sha, "Inception"))
    images = write_pngs(tmp_path / "imgs", colour_images(6, 24, seed=0))
    for mode in ("clean", "legacy_tensorflow"):
        fe = ExtractorHandle("inception", mode=mode, weights_dir=tmp_path / "w").get()
        assert fe.weights_sha256 == sha and fe.dim == 2048
        ours = compute_features(load_side(images, "gen"), fe, **QUIET)
        model = InceptionV3W(str(path.parent), download=False, resize_inside=mode == "legacy_tensorflow")
        theirs = get_folder_features(str(images), model, num_workers=0, device=torch.device("cpu"), mode=mode,
                                     verbose=False)
        assert ours.shape == (6, 2048)
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)


def test_inception_pytorch_fid_weights_load_from_the_weights_dir_only(tmp_path, monkeypatch, no_network):
    from cleanfid.inception_pytorch import FIDInceptionA, _inception_v3

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        donor = _inception_v3(num_classes=1008, aux_logits=False, init_weights=True)
    # pytorch-fid's file holds the torchvision layout with the FID blocks; shapes match after the swaps below.
    from cleanfid import inception_pytorch as ip

    donor.Mixed_5b, donor.Mixed_5c, donor.Mixed_5d = FIDInceptionA(192, 32), FIDInceptionA(256, 64), FIDInceptionA(288, 64)
    donor.Mixed_6b, donor.Mixed_6c = ip.FIDInceptionC(768, 128), ip.FIDInceptionC(768, 160)
    donor.Mixed_6d, donor.Mixed_6e = ip.FIDInceptionC(768, 160), ip.FIDInceptionC(768, 192)
    donor.Mixed_7b, donor.Mixed_7c = ip.FIDInceptionE_1(1280), ip.FIDInceptionE_2(2048)
    path = tmp_path / offline.INCEPTION_PYTORCH_FID.filename
    torch.save(donor.state_dict(), path)
    monkeypatch.setattr(offline, "INCEPTION_PYTORCH_FID",
                        offline.WeightFile(path.name, "https://example.invalid/x", offline.sha256_file(path), "Inception"))
    fe = ExtractorHandle("inception", mode="legacy_pytorch", weights_dir=tmp_path).get()
    x = torch.rand(2, 3, 299, 299) * 255
    with torch.no_grad():
        feats = fe.model(x)
    assert feats.shape == (2, 2048)
    assert ip.load_state_dict_from_url.__name__ != "load_local"  # clean-fid's loader is restored


# -------------------------------------------------------------------------------------------- --run ref

def test_run_reference_is_the_data_set_as_samples_are_written(tmp_path):
    """A run's reference images are its data set through to_uint8: for digits, exactly the pixels the digits
    extractor was trained on."""
    from ditk.config import resolve, to_yaml
    from ditk.data.digits import split_indices
    from ditk.metrics.from_run import dataset_images

    (tmp_path / "config.yaml").write_text(to_yaml(resolve("digits-dit")))
    images = dataset_images(str(tmp_path))
    x, y = digits_uint8()
    assert (images.count, images.resolution, images.channels, images.name) == (1618, "8x8", 1, "digits-train")
    view = images.array()
    np.testing.assert_array_equal(np.stack([view[i] for i in range(len(view))])[..., 0], x[split_indices(y, "train")])
