"""LRQ-DiT: the Hadamard rotation against exact orthogonality, the twin-log quantizer against the single log2 one."""

import pytest
import torch

from ditk.quantize.layers import FakeQuantLinear
from ditk.quantize.methods.lrqdit import log2_quantize, twin_log_quantize
from ditk.quantize.rotation import block_hadamard, block_size, hadamard


@pytest.mark.parametrize("n", [96, 384, 64])
def test_block_hadamard_is_orthogonal_and_leaves_the_layer_output_unchanged(n):
    assert block_size(96) == 32 and block_size(384) == 128 and block_size(64) == 64
    r = block_hadamard(n, block_size(n), torch.float64)
    torch.testing.assert_close(r @ r.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    h = hadamard(8, torch.float64) * 8**0.5  # entries ±1, as Sylvester's construction
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    g = torch.Generator().manual_seed(n)
    x = torch.randn(20, n, generator=g, dtype=torch.float64)
    x[:, 3] *= 100  # a salient channel: spread over its block by the rotation
    w = torch.randn(12, n, generator=g, dtype=torch.float64)
    torch.testing.assert_close((x @ r) @ (w @ r).T, x @ w.T, rtol=1e-12, atol=1e-9)
    assert (x @ r).abs().amax() < 0.5 * x.abs().amax()
    # the fake-quant layer with rotation, activations in float: the same output as the Linear
    layer = FakeQuantLinear(n, 12, bias=False, rotation=block_size(n))
    torch.testing.assert_close(layer.rot.double(), r, rtol=0, atol=1e-7)  # stored in the model's dtype (fp32)
    layer = layer.double()
    layer.rot = r  # compare in exact (float64) arithmetic
    layer.weight.data.copy_(w @ r)
    torch.testing.assert_close(layer(x), x @ w.T, rtol=1e-12, atol=1e-9)
    assert "rot" not in layer.state_dict()


@pytest.mark.parametrize("bits", [3, 4])
def test_twin_log_beats_a_single_log2_grid_on_heavy_tailed_weights(bits):
    g = torch.Generator().manual_seed(bits)
    gauss = torch.randn(32, 256, generator=g, dtype=torch.float64)
    chi2 = (torch.randn(3, 32, 256, generator=g, dtype=torch.float64) ** 2).sum(0)
    w = gauss / (chi2 / 3).sqrt()  # Student-t, 3 degrees of freedom: Gaussian-like with long tails
    w = w * (0.02 + torch.rand(32, 1, generator=g, dtype=torch.float64))
    tl, single = twin_log_quantize(w, bits), log2_quantize(w, bits)
    err_tl, err_log = float(((tl - w) ** 2).sum()), float(((single - w) ** 2).sum())
    assert err_tl < 0.9 * err_log, (err_tl, err_log)
    # at most 2^(b-1) magnitudes per channel (plus the sign), and zero is representable
    for row in tl:
        assert len(row.abs().unique()) <= 2 ** (bits - 1)
    assert twin_log_quantize(torch.tensor([[0.0, 1.0]], dtype=torch.float64), bits)[0, 0] == 0
    # single log2 quantizer: exactly its levels m·2^{-i}
    q = log2_quantize(torch.tensor([[1.0, 0.5, 0.26, 0.24]], dtype=torch.float64), 3)
    torch.testing.assert_close(q, torch.tensor([[1.0, 0.5, 0.25, 0.25]], dtype=torch.float64))
