"""Structure preservation outside the changed strokes (ditk.edit.preserve) against hand computations."""

import math

import numpy as np
import torch

from ditk.edit.preserve import changed_strokes, digits_prototypes, masked_ssim, preservation, ssim_maps


def _ssim_map_by_hand(x: np.ndarray, y: np.ndarray, win: int, data_range: float = 2.0) -> np.ndarray:
    """One-channel SSIM map (Wang et al. 2004) with a win x win uniform window over reflect-padded images
    (scipy's 'reflect' = symmetric: the edge pixel repeats) and sample (N - 1) covariances, as scikit-image."""
    r = win // 2
    xp, yp = np.pad(x, r, mode="symmetric"), np.pad(y, r, mode="symmetric")
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    n = win * win
    out = np.zeros_like(x)
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            a, b = xp[i:i + win, j:j + win].ravel(), yp[i:i + win, j:j + win].ravel()
            ma, mb = a.mean(), b.mean()
            va, vb = a.var() * n / (n - 1), b.var() * n / (n - 1)
            cov = ((a - ma) * (b - mb)).sum() / (n - 1)
            out[i, j] = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2))
    return out


def test_masked_ssim_is_the_mean_of_the_hand_computed_ssim_map_over_the_mask():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 1, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    b = (a + 0.3 * torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)).clamp(-1, 1)
    keep = (torch.rand(2, 1, 8, 8, generator=g) > 0.4).float()
    got = masked_ssim(a, b, keep)
    for i in range(2):
        hand = _ssim_map_by_hand(a[i, 0].numpy(), b[i, 0].numpy(), win=7)
        np.testing.assert_allclose(ssim_maps(a[i:i + 1], b[i:i + 1])[0].numpy(), hand, atol=1e-12)
        want = hand[keep[i, 0].bool().numpy()].mean()
        assert math.isclose(got[i], want, abs_tol=1e-12)
    # scikit-image's own SSIM is the mean over the interior (a border of win // 2 left out): the same map
    from ditk.edit.artefact import ssim

    interior = torch.zeros(2, 1, 8, 8)
    interior[..., 3:5, 3:5] = 1
    np.testing.assert_allclose(masked_ssim(a, b, interior), ssim(a, b), atol=1e-12)
    assert math.isnan(masked_ssim(a, b, torch.zeros(2, 1, 8, 8))[0])  # nothing kept: undefined, not 1


def test_preservation_psnr_counts_only_the_kept_pixels():
    a = torch.zeros(1, 1, 4, 4)
    b = a.clone()
    b[..., 0, 0] = 2.0  # one changed pixel (error 4)...
    b[..., 3, 3] = 0.2  # ...and one small error (0.04) outside it
    changed = torch.zeros(1, 1, 4, 4)
    changed[..., 0, 0] = 1
    row = preservation(a, b, changed)[0]
    assert math.isclose(row["psnr_outside_changed_db"], 10 * math.log10(4 / (0.04 / 15)), rel_tol=1e-6)
    assert row["mask_changed_fraction"] == 1 / 16


def test_changed_strokes_mask_threshold_and_dilation():
    src = torch.full((1, 1, 5, 5), -1.0)
    ref = src.clone()
    ref[..., 2, 2] = 1.0  # the target has ink where the source has none
    ref[..., 0, 0] = -0.6  # a difference of 0.4: below the threshold 0.5
    m = changed_strokes(src, ref)
    assert m.sum() == 1 and m[0, 0, 2, 2] == 1
    d = changed_strokes(src, ref, radius=1)
    assert d.sum() == 9 and d[0, 0, 1:4, 1:4].min() == 1
    # the digits prototypes: one mean training digit per class, in [-1, 1]
    p = digits_prototypes()
    assert p.shape == (10, 1, 8, 8) and -1 <= float(p.min()) and float(p.max()) <= 1
