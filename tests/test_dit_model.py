"""DiT backbone: parameter counts vs the paper, shapes, adaLN-Zero init, fixed embeddings vs closed forms."""

import math

import pytest
import torch

from ditk.errors import ConfigError
from ditk.models.dit import DIT_SIZES, DiT, DiTConfig, build_dit, dit_size_config
from ditk.models.layers import get_2d_sincos_pos_embed, timestep_embedding
from ditk.registry import MODELS


def official_param_count(depth, d, p, in_channels=4, num_classes=1000, input_size=32, mlp_ratio=4.0, learn_sigma=True):
    """All parameters of facebookresearch/DiT models.py (commit ed81ce2), from its layer shapes.

    Returns (total, trainable); the difference is the frozen pos_embed (requires_grad=False).
    """
    linear = lambda i, o: i * o + o  # noqa: E731  weight + bias
    out_channels = 2 * in_channels if learn_sigma else in_channels
    hidden = int(d * mlp_ratio)
    tokens = (input_size // p) ** 2
    x_embedder = in_channels * p * p * d + d  # Conv2d(C, D, p, stride p)
    t_embedder = linear(256, d) + linear(d, d)  # 256-d sinusoid -> Linear -> SiLU -> Linear
    y_embedder = (num_classes + 1) * d  # + 1 null class (class_dropout_prob > 0)
    block = linear(d, 3 * d) + linear(d, d) + linear(d, hidden) + linear(hidden, d) + linear(d, 6 * d)
    final = linear(d, 2 * d) + linear(d, p * p * out_channels)
    trainable = x_embedder + t_embedder + y_embedder + depth * block + final
    return trainable + tokens * d, trainable


# Exact counts of DiT's own code at 256x256 (latent 32x32x4, 1000 classes, learned sigma), patch 2:
# (total incl. the frozen pos_embed, trainable) and the paper's rounded figure (DiT paper, Table 1 / README).
PAPER = {
    "S": (32_963_360, 32_865_056, 33),
    "B": (130_512_416, 130_315_808, 130),
    "L": (458_102_816, 457_840_672, 458),
    "XL": (675_129_632, 674_834_720, 675),
}


def count(model):
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def meta_dit(size, patch_size):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        return build_dit(dit_size_config(size, patch_size))


@pytest.mark.parametrize("size", list(DIT_SIZES))
def test_param_counts_match_official_code_and_paper(size):
    depth, d, _ = DIT_SIZES[size]
    total, trainable, paper_millions = PAPER[size]
    assert official_param_count(depth, d, 2) == (total, trainable)
    model = meta_dit(size, 2)
    assert model.pos_embed.is_meta
    assert count(model) == (total, trainable)
    assert round(trainable / 1e6) == paper_millions


@pytest.mark.parametrize("size", list(DIT_SIZES))
def test_patch_size_changes_only_embedding_and_final_layer(size):
    depth, d, _ = DIT_SIZES[size]
    shapes = {p: {k: tuple(v.shape) for k, v in meta_dit(size, p).state_dict().items()} for p in (2, 4, 8)}
    for p in (4, 8):
        assert shapes[p].keys() == shapes[2].keys()
        changed = {k for k in shapes[2] if shapes[p][k] != shapes[2][k]}
        assert changed == {"x_embedder.proj.weight", "pos_embed", "final_layer.linear.weight",
                           "final_layer.linear.bias"}  # fmt: skip
        assert shapes[p]["pos_embed"] == (1, (32 // p) ** 2, d)
        assert shapes[p]["final_layer.linear.weight"] == (p * p * 8, d)
        assert count(meta_dit(size, p)) == official_param_count(depth, d, p)


def tiny(**overrides):
    cfg = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=4, num_classes=5)
    cfg.update(overrides)
    return DiT(**cfg)


def randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_forward_shape_and_batch_independence(learn_sigma):
    torch.manual_seed(0)
    model = randomise(tiny(learn_sigma=learn_sigma)).eval()
    assert model.out_channels == (6 if learn_sigma else 3)
    assert (model.in_channels, model.input_size, model.learn_sigma, model.num_classes) == (3, 8, learn_sigma, 5)
    assert len(model.blocks) == 2
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([0.0, 10.5, 999.0]), torch.tensor([0, 4, 5])  # 5 = null label
    with torch.no_grad():
        out = model(x, t, y)
        single = model(x[1:2], t[1:2], y[1:2])
    assert out.shape == (3, model.out_channels, 8, 8)
    assert out.abs().max() > 0
    torch.testing.assert_close(out[1:2], single, rtol=1e-5, atol=1e-6)


def test_label_embedding_has_null_row_and_no_randomness():
    model = randomise(tiny())
    assert model.y_embedder.embedding_table.num_embeddings == 6  # 5 classes + null
    assert tiny(class_dropout_prob=0.0).y_embedder.embedding_table.num_embeddings == 5
    model.train()  # DiT drops labels at random in train mode; ditk leaves that to the training loop
    x, t, y = torch.randn(4, 3, 8, 8), torch.full((4,), 3.0), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        assert torch.equal(model(x, t, y), model(x, t, y))


def test_adaln_zero_init_gives_zero_output_and_identity_blocks():
    torch.manual_seed(0)
    model = tiny()
    seen = []
    hooks = [b.register_forward_hook(lambda m, inp, out: seen.append(torch.equal(inp[0], out))) for b in model.blocks]
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([1.0, 500.0]), torch.tensor([1, 2])
    with torch.no_grad():
        out = model(x, t, y)
    for h in hooks:
        h.remove()
    assert torch.equal(out, torch.zeros_like(out))
    assert seen == [True, True]  # gates are zero: every block is the identity at init
    # ...and it is the adaLN-Zero init, not a dead forward: nonzero final layer -> nonzero output.
    with torch.no_grad():
        model.final_layer.linear.bias.fill_(1.0)
        assert torch.equal(model(x, t, y), torch.ones_like(out))
    # Other layers follow DiT's init: N(0, 0.02) embeddings, xavier linears with zero bias.
    assert 0.01 < model.y_embedder.embedding_table.weight.std() < 0.03
    assert torch.equal(model.blocks[0].attn.qkv.bias, torch.zeros(96))


def test_pos_embed_matches_float64_closed_form():
    d, grid = 32, 4
    quarter = d // 4
    ref = torch.zeros(grid * grid, d, dtype=torch.float64)
    for row in range(grid):
        for col in range(grid):
            for k in range(quarter):
                w = 10000.0 ** (-k / quarter)
                # first half encodes the column (DiT's meshgrid puts w first), second half the row
                ref[row * grid + col, k] = math.sin(col * w)
                ref[row * grid + col, quarter + k] = math.cos(col * w)
                ref[row * grid + col, 2 * quarter + k] = math.sin(row * w)
                ref[row * grid + col, 3 * quarter + k] = math.cos(row * w)
    ours = torch.from_numpy(get_2d_sincos_pos_embed(d, grid))
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    model = tiny(hidden_size=d)  # input 8, patch 2 -> 4x4 grid
    assert not model.pos_embed.requires_grad and "pos_embed" in model.state_dict()
    torch.testing.assert_close(model.pos_embed[0].double(), ref, rtol=0, atol=1e-7)


def test_timestep_embedding_matches_closed_form():
    t = torch.tensor([0.0, 1.0, 37.5, 999.0])
    ours = timestep_embedding(t, 256)
    freqs = [10000.0 ** (-i / 128) for i in range(128)]  # DiT/GLIDE: exponent divided by half = 128
    ref = torch.tensor(
        [[math.cos(s * f) for f in freqs] + [math.sin(s * f) for f in freqs] for s in t.tolist()], dtype=torch.float64
    )
    torch.testing.assert_close(ours.double(), ref, rtol=0, atol=2e-4)  # fp32 arguments up to 999 rad


def test_registry_builds_from_dataclass_and_omegaconf():
    from omegaconf import OmegaConf

    cfg = DiTConfig(input_size=8, patch_size=4, in_channels=1, hidden_size=16, depth=1, num_heads=2, num_classes=3)
    a = MODELS.build("dit", cfg)
    b = MODELS.build("dit", OmegaConf.structured(cfg))
    assert MODELS.get("dit").config is DiTConfig
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    assert a.out_channels == 2 and a.blocks[0].attn.num_heads == 2


def test_bad_configs_raise_config_error():
    with pytest.raises(ConfigError, match="num_heads"):
        tiny(num_heads=5)
    with pytest.raises(ConfigError, match="patch_size"):
        tiny(input_size=9)
    with pytest.raises(ConfigError, match="input_size"):
        tiny()(torch.zeros(1, 3, 16, 16), torch.zeros(1), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ConfigError, match="size"):
        dit_size_config("XXL")
