"""Block-wise calibration: PTQ4DiT's AdaRound block reconstruction and VQ4DiT's block-level codeword calibration
each end with a lower block output error than their uncalibrated start (round to nearest / nearest codeword) on a
random block, and AdaRound only ever rounds a weight down or up on its own grid."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from ditk.quantize.adaround import adaround_block
from ditk.quantize.blocks import BlockData, block_error, capture, find_blocks
from ditk.quantize.layers import FakeQuantLinear
from ditk.quantize.methods.vq4dit import calibrate_block, kmeans, subvectors
from ditk.quantize.quantizers import minmax_params, quantize_weight


class Block(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x, scale):
        return x + self.fc2(F.gelu(self.fc1(x * scale[:, None, :])))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(16, 16)
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, x, t):
        h = self.embed(x)
        for b in self.blocks:
            h = b(h, torch.ones(h.shape[0], 16) + t[:, None] / 1000)
        return h


def recorded_block():
    torch.manual_seed(0)
    model = Model()
    inputs = {"x": torch.randn(96, 6, 16) @ torch.randn(16, 16), "t": torch.randint(0, 1000, (96,))}
    names = ["embed", "blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2"]
    assert find_blocks(model, names) == {"blocks.0": ["blocks.0.fc1", "blocks.0.fc2"],
                                         "blocks.1": ["blocks.1.fc1", "blocks.1.fc2"]}
    data = capture(model, ["blocks.1"], inputs, batch_size=32)["blocks.1"]
    assert data.rows == 96 and data.args[1][1]  # the per-row scale is batched too
    block = model.blocks[1]
    assert block_error(block, data) == 0
    return block, data


def test_adaround_block_reconstruction_beats_round_to_nearest_on_its_grid():
    block, data = recorded_block()
    layers = {}
    for name in ("fc1", "fc2"):
        linear = getattr(block, name)
        w = linear.weight.data.clone()
        layer = FakeQuantLinear.from_linear(linear, quantize_weight(w, 3, 8), act={"bits": 8, "granularity": "token"})
        setattr(block, name, layer)
        layers[name] = (layer, w, 3, 8)
    info = adaround_block(block, layers, data, steps=60, rows_per_step=32)
    assert info["kept"] and info["error_adaround"] < 0.97 * info["error_nearest"], info
    for layer, w, bits, g in layers.values():
        rows = w.reshape(w.shape[0], -1, g)
        scale = minmax_params(rows, bits)[0]
        assert ((layer.weight.reshape(rows.shape) - rows).abs() < scale * (1 + 1e-5)).all()  # floor or ceil only
        assert not layer.weight.requires_grad and layer.act == {"bits": 8, "granularity": "token"}  # restored


def test_vq4dit_block_calibration_beats_the_nearest_codeword():
    block, data = recorded_block()
    layers = {}
    for name in ("fc1", "fc2"):
        linear = getattr(block, name)
        w = linear.weight.data.clone()
        codebook = kmeans(subvectors(w, 4), 16, iters=10)
        nearest = codebook[torch.cdist(subvectors(w, 4), codebook).argmin(dim=1)].reshape(w.shape)
        layer = FakeQuantLinear.from_linear(linear, nearest)
        setattr(block, name, layer)
        layers[name] = (layer, w, codebook)
    info = calibrate_block(block, layers, data, steps=120, lr=1e-2, reg=3.0, candidates=4)
    assert info["kept"] and info["error_block"] < 0.9 * info["error_layerwise"], info
    for layer, w, codebook in layers.values():
        assert len(torch.unique(layer.weight.reshape(-1, 4), dim=0)) <= 16  # still at most 16 codewords (hard)
