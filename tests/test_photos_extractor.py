"""The `photos` FID feature extractor (ditk/metrics/photos_extractor.py): the shipped weights are the documented
ones, it tells held-out crops apart, and its FID grows with blur, noise and the loss of colour."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ditk.metrics.extractors import ExtractorHandle


@pytest.fixture(scope="module")
def heldout():
    from ditk.data.photos import Photos, PhotosConfig

    return Photos(PhotosConfig(split="test", hflip=False)).images  # the 28 held-out crops, [-1, 1]


def test_shipped_weights_are_the_documented_file_and_registered():
    from ditk.metrics.offline import sha256_file
    from ditk.metrics.photos_extractor import PHOTOS_SHA256, PHOTOS_WEIGHTS
    from ditk.registry import FEATURE_EXTRACTORS

    assert "photos" in FEATURE_EXTRACTORS.names()
    assert sha256_file(PHOTOS_WEIGHTS) == PHOTOS_SHA256
    fe = ExtractorHandle("photos").get()
    assert fe.dim == 128 and fe.weights_sha256 == PHOTOS_SHA256 and fe.mode == "clean"


def test_heldout_crops_are_told_apart(heldout):
    """Each held-out crop shifted by 2 px finds itself among the 28 (it never saw the held-out strip)."""
    from ditk.metrics.photos_extractor import load_photos_net

    net = load_photos_net()
    to01 = lambda x: torch.clamp(127.5 * x + 128, 0, 255).floor() / 255  # noqa: E731
    shifted = F.pad(heldout, (2, 0, 2, 0), mode="replicate")[..., :32, :32]
    with torch.no_grad():
        q, k = F.normalize(net.features(to01(shifted)), dim=1), F.normalize(net.features(to01(heldout)), dim=1)
    assert float(((q @ k.t()).argmax(1) == torch.arange(len(heldout))).float().mean()) >= 0.9


def test_fid_grows_with_the_degradation(heldout):
    from ditk.restore.operators import build_operator
    from ditk.restore.set_metrics import fid_kid

    g = torch.Generator().manual_seed(0)
    same = fid_kid(heldout, heldout, "photos")
    assert same["fid"] < 1e-6 and same["n"] == 28 and same["extractor"] == "photos"
    blur = [fid_kid(build_operator("blur", (3, 32, 32), {"sigma": s}).A(heldout), heldout, "photos")["fid"]
            for s in (0.5, 1.0, 2.0)]
    noise = [fid_kid(heldout + s * torch.randn(heldout.shape, generator=g), heldout, "photos")
             for s in (0.05, 0.1, 0.2)]
    assert 0 < blur[0] < blur[1] < blur[2]
    assert 0 < noise[0]["fid"] < noise[1]["fid"] < noise[2]["fid"]
    assert noise[0]["kid"] < noise[2]["kid"]
    gray = fid_kid(heldout.mean(1, keepdim=True).expand_as(heldout), heldout, "photos")["fid"]
    assert gray > blur[2]


def test_evaluate_fid_reads_photo_folders_with_the_photos_extractor(tmp_path, heldout):
    """Folders of PNGs through `evaluate-fid`'s pipeline give the restore helper's numbers."""
    from ditk.io import save_pngs
    from ditk.metrics.fid import evaluate
    from ditk.restore.set_metrics import fid_kid

    noisy = (heldout + 0.1 * torch.randn(heldout.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    save_pngs(noisy, tmp_path / "gen")
    save_pngs(heldout, tmp_path / "ref")
    out = evaluate(tmp_path / "gen", tmp_path / "ref", ExtractorHandle("photos"), use_cache=False, progress=False,
                   kid=False)
    assert np.isclose(out["fid"], fid_kid(noisy, heldout, "photos")["fid"], rtol=0, atol=1e-4)  # fid_kid rounds to 4 decimals


def test_paired_kid_is_the_u_statistic_without_the_paired_cross_terms():
    from ditk.restore.set_metrics import kid_paired

    rng = np.random.RandomState(0)
    x, y = rng.randn(6, 5), rng.randn(6, 5)
    k = lambda a, b: (a @ b / 5 + 1) ** 3  # noqa: E731
    ref = sum(k(x[i], x[j]) + k(y[i], y[j]) - k(x[i], y[j]) - k(x[j], y[i])
              for i in range(6) for j in range(6) if i != j) / 30
    assert np.isclose(kid_paired(x, y), ref, rtol=1e-12)
    assert kid_paired(x, x) == 0.0
    # a set paired with slightly perturbed copies of itself: near zero, where clean-fid's all-pairs cross term
    # (i = j included) would put it clearly below zero
    big = rng.randn(40, 5)
    near = big + 0.01 * rng.randn(40, 5)
    assert abs(kid_paired(big, near)) < 1e-3


def test_paired_bootstrap_of_the_fid_difference():
    from ditk.restore.set_metrics import bootstrap_fid_difference, fid_of

    rng = np.random.RandomState(1)
    truth = rng.randn(30, 4)
    close, far = truth + 0.05 * rng.randn(30, 4), truth + 1.0 + 0.5 * rng.randn(30, 4)
    assert fid_of(close, truth) < fid_of(far, truth)
    better = bootstrap_fid_difference(close, far, truth, rounds=30)
    assert better["rounds"] == 30 and better["a_lower_fraction"] == 1.0 and better["diff_q975"] < 0
    same = bootstrap_fid_difference(close, close, truth, rounds=10)
    assert same["a_lower_fraction"] == 0.0 and same["diff_q025"] == same["diff_q975"] == 0.0
