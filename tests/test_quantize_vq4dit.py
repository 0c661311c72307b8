"""VQ4DiT: the k-means codebook against its exact case, and the calibrated assignment against nearest-codeword."""

import torch

from ditk.quantize.methods.vq4dit import calibrate, kmeans, output_error, subvectors


def test_kmeans_with_one_codeword_per_distinct_subvector_reproduces_the_weight_exactly():
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(10, 4, generator=g, dtype=torch.float64)  # 10 distinct sub-vectors, repeated
    w = pool[torch.randint(0, 10, (12 * 8,), generator=g)].reshape(12, 32)
    codebook = kmeans(subvectors(w, 4), 10)
    assert codebook.shape == (10, 4)
    q, info = calibrate(w.float(), torch.eye(32), codebook.float(), steps=0)
    torch.testing.assert_close(q.double(), w, rtol=0, atol=1e-6)
    assert info["error_nearest"] < 1e-10
    # fewer codewords: the Lloyd iterations never increase the quantization error
    v = subvectors(torch.randn(64, 64, generator=g), 4)
    errs = [float(((v - c[torch.cdist(v, c).argmin(1)]) ** 2).sum()) for c in (kmeans(v, 16, 0), kmeans(v, 16, 10))]
    assert errs[1] < errs[0]


def test_calibrated_assignment_beats_nearest_codeword_on_a_random_layer():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 64, generator=g) @ torch.randn(64, 64, generator=g)  # correlated inputs
    w = torch.randn(32, 64, generator=g)
    h = x.T @ x
    codebook = kmeans(subvectors(w, 4), 16)
    nearest, off = calibrate(w, h, codebook, steps=0)
    assert not off["calibrated"] and off["error_calibrated"] == off["error_nearest"]
    q, info = calibrate(w, h, codebook)  # the defaults: 4 candidates, 300 steps
    assert info["calibrated"] and info["error_calibrated"] < 0.8 * info["error_nearest"], info
    err = lambda m: float(output_error(m - w, h))  # noqa: E731
    assert err(q) < err(nearest)
    # hard assignment: every sub-vector of the result is one codeword of the (calibrated) codebook, ≤ 16 of them
    assert torch.unique(subvectors(q, 4), dim=0).shape[0] <= 16
