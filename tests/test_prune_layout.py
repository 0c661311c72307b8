"""Depth pruning on every backbone with a block list: the smaller model built from its config section alone
equals the source model with the removed blocks bypassed (identity hooks), to 1e-6; the U-ViT layouts prune
in matched pairs and refuse to lose their fixed blocks; Block Influence equals a hand computation."""

import pytest
import torch
import torch.nn as nn

from ditk.errors import ConfigError
from ditk.hooks import attach
from ditk.prune.gates import bypass_hooks
from ditk.prune.layout import layout_for
from ditk.prune.score import block_influence, index_units, select
from ditk.prune.surgery import build_from_section, depth_pruned

N = 2
IMAGE = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, learn_sigma=False)
SECTIONS = {
    "dit": dict(depth=6, num_heads=2, num_classes=10, **IMAGE),
    "dit-moe": dict(depth=4, num_heads=2, num_classes=10, num_experts=4, top_k=2, num_shared_experts=1, **IMAGE),
    "dydit": dict(depth=4, num_heads=4, num_classes=10, **IMAGE),
    "dis": dict(depth=6, num_classes=10, scan_backend="torch", **IMAGE),  # 7 blocks: 3 in, mid, 3 out
    "diffusion-rwkv": dict(depth=7, num_classes=10, wkv_impl="torch", **IMAGE),  # 3 in, mid, 3 out
    "dimba": dict(depth=6, num_heads=2, caption_channels=16, mamba_ratio=0.5, scan_backend="torch", **IMAGE),
    "fluxmusic": dict(input_size=4, frames=8, patch_size=2, in_channels=1, hidden_size=32, num_heads=2,
                      depth_double=2, depth_single=3, axes_dim=[4, 6, 6], context_dim=16, pooled_dim=8),
}
# source blocks kept by the test (each a legal choice for its layout)
KEPT = {"dit": [0, 2, 3, 5], "dit-moe": [1, 3], "dydit": [0, 3], "dis": [0, 2, 3, 4, 6],
        "diffusion-rwkv": [0, 2, 3, 4, 6], "dimba": [0, 1, 4, 5], "fluxmusic": [1, 2, 4]}


def inputs(name):
    g = torch.Generator().manual_seed(3)
    if name == "fluxmusic":
        x = torch.randn(N, 1, 4, 8, generator=g)
        return x, {"context": torch.randn(N, 5, 16, generator=g), "pooled": torch.randn(N, 8, generator=g)}
    x = torch.randn(N, 1, 8, 8, generator=g)
    if name == "dimba":
        return x, {"context": torch.randn(N, 5, 16, generator=g), "context_mask": torch.ones(N, 5, dtype=torch.bool)}
    return x, {"y": torch.tensor([3, 10])}


def random_model(name):
    torch.manual_seed(0)
    model = build_from_section(name, SECTIONS[name])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every weight random: zero-initialised gates would make blocks the identity anyway
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        if name == "dydit":
            for block in model.blocks:
                block.token_selection.mlp_head[2].bias.fill_(5.0)  # most tokens pass: the blocks do work
    return model.eval()


@pytest.mark.parametrize("name", list(SECTIONS))
def test_pruned_model_from_config_equals_source_with_bypassed_blocks(name):
    model = random_model(name)
    layout = layout_for(name, SECTIONS[name])
    kept = KEPT[name]
    removed = [i for i in range(layout.num_blocks) if i not in kept]
    small, section = depth_pruned(model, name, SECTIONS[name], kept)
    rebuilt = build_from_section(name, section)  # config alone (what config.yaml holds) + the renamed weights
    rebuilt.load_state_dict(small.state_dict())
    rebuilt.eval()
    assert len(rebuilt.blocks) == len(kept)
    x, cond = inputs(name)
    t = torch.tensor([0.3, 0.8]) if name == "fluxmusic" else torch.tensor([10.0, 700.0])
    with torch.no_grad():
        full = model(x, t, **cond)
        with attach(model, bypass_hooks(layout, removed)):
            reference = model(x, t, **cond)
        got = rebuilt(x, t, **cond)
    assert (reference - full).abs().max() > 1e-3  # the removed blocks did matter
    torch.testing.assert_close(got, reference, atol=1e-6, rtol=0)


def test_skip_layouts_prune_in_pairs_and_keep_fixed_blocks():
    dis = layout_for("dis", SECTIONS["dis"])
    assert dis.units == [(0, 6), (1, 5), (2, 4)] and dis.fixed == [3]
    rwkv = layout_for("diffusion-rwkv", SECTIONS["diffusion-rwkv"])
    assert rwkv.units == [(1, 5), (2, 4)] and rwkv.fixed == [0, 3, 6]
    with pytest.raises(ConfigError, match="pair"):
        index_units(dis, [0, 1, 2, 3, 4, 6])  # keeps 5's partner 1 but not 5
    with pytest.raises(ConfigError, match="middle"):
        index_units(dis, [0, 1, 2, 4, 5, 6])
    with pytest.raises(ConfigError, match="pairs"):
        select([0.0] * 3, dis, keep=4)  # 7 - 4 = 3 blocks cannot be removed in pairs
    assert dis.kept_blocks(select([0.3, 0.1, 0.2], dis, keep=5)) == [0, 2, 3, 4, 6]


def test_dimba_refuses_a_mamba_layout_no_ratio_describes():
    model = random_model("dimba")  # Mamba after blocks 1, 3, 5 (ratio 1/2)
    with pytest.raises(ConfigError, match="mamba_ratio"):
        depth_pruned(model, "dimba", SECTIONS["dimba"], [0, 1, 3, 5])


def test_select_keep_and_pattern():
    layout = layout_for("dit", dict(depth=8))
    scores = [0.5, 0.1, 0.9, 0.3, 0.2, 0.8, 0.7, 0.05]
    assert select(scores, layout, keep=4) == [0, 2, 5, 6]
    assert select(scores, layout, pattern="2:4") == [0, 2, 5, 6]
    assert select(scores, layout, pattern="1:2") == [0, 2, 5, 6]
    for bad in (dict(keep=8), dict(keep=0, pattern="3:5"), dict(pattern="4:4")):
        with pytest.raises(ConfigError):
            select(scores, layout, **bad)


class Toy(nn.Module):
    """Two linear blocks: a toy with a block list."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(3, 3), nn.Linear(3, 3)])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def test_block_influence_equals_hand_computation():
    torch.manual_seed(0)
    toy = Toy().double()
    layout = layout_for("dit", dict(depth=2))
    xs = [torch.randn(2, 4, 3, dtype=torch.float64), torch.randn(1, 5, 3, dtype=torch.float64)]
    bi = block_influence(toy, layout, [lambda x=x: toy(x) for x in xs])
    # by hand: every token of every batch, cos between a block's input and output
    cos = [[], []]
    with torch.no_grad():
        for x in xs:
            h1 = toy.blocks[0](x)
            h2 = toy.blocks[1](h1)
            for (a, b), store in (((x, h1), cos[0]), ((h1, h2), cos[1])):
                for row_a, row_b in zip(a.reshape(-1, 3), b.reshape(-1, 3)):
                    store.append(float(row_a @ row_b / (row_a.norm() * row_b.norm())))
    expected = [1 - sum(c) / len(c) for c in cos]
    assert bi == pytest.approx(expected, abs=1e-12)


def test_tinyfusion_paper_preset_builds_the_14_block_dit_xl():
    from ditk.config import resolve
    from ditk.prune.learnable import MaskSearch
    from ditk.prune.layout import pruned_section
    from ditk.prune.run import model_section
    from ditk.prune.score import target_units

    cfg = resolve("tinyfusion-dit-xl-2-2to4", ["prune.source=DiT-XL-2-256x256.pt"], allow_missing=("data", "autoencoder"))
    section = model_section(cfg)
    layout = layout_for("dit", section)
    assert target_units(layout, int(cfg.prune.keep), str(cfg.prune.pattern)) == (14, 2, 4)
    search = MaskSearch(28, 2, 4)
    assert tuple(search.logits.shape) == (7, 6)  # 7 groups, C(4, 2) = 6 masks each
    small = pruned_section("dit", section, search.decision())
    with torch.device("meta"):
        big, tiny = build_from_section("dit", section), build_from_section("dit", small)
    n = lambda m: sum(p.numel() for p in m.parameters())
    block = sum(p.numel() for p in big.blocks[0].parameters())
    assert len(tiny.blocks) == 14 and n(tiny) == n(big) - 14 * block
    assert abs(n(tiny) / 1e6 - 340) < 1  # TinyDiT-D14: 340M parameters (TinyFusion, ≈ from the paper's table)


@pytest.mark.parametrize("name", ["dis", "dimba", "fluxmusic", "diffusion-rwkv"])
def test_per_sample_tensor_gates_mix_full_and_bypassed_rows(name):
    """The learnable search gates each sample on its own: row 0 gate 1 (block kept), row 1 gate 0 (removed)."""
    from ditk.prune.gates import gate_hooks

    model = random_model(name)
    layout = layout_for(name, SECTIONS[name])
    removed = [i for i in range(layout.num_blocks) if i not in KEPT[name]]
    x, cond = inputs(name)
    t = torch.tensor([0.3, 0.8]) if name == "fluxmusic" else torch.tensor([10.0, 700.0])
    gate = torch.tensor([1.0, 0.0])
    with torch.no_grad():
        full = model(x, t, **cond)
        with attach(model, bypass_hooks(layout, removed)):
            bypassed = model(x, t, **cond)
        with attach(model, gate_hooks(layout, {i: gate for i in removed})):
            mixed = model(x, t, **cond)
    torch.testing.assert_close(mixed[0], full[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(mixed[1], bypassed[1], atol=1e-6, rtol=0)


def test_tinyfusion_paper_command_line_passes_every_check(tmp_path):
    """The preset's documented end-to-end command (search + prune + KD recovery from the official .pt) is accepted
    as written: the mask EMA and scaling are TinyFusion's, the KD LR is 2e-4 at its own batch."""
    from ditk.config import resolve
    from ditk.prune.recover import recovery_lr
    from ditk.prune.run import check_request

    (tmp_path / "DiT-XL-2-256x256.pt").write_bytes(b"")
    for d in ("imagenet/train", "sd-vae-ft-ema"):
        (tmp_path / d).mkdir(parents=True)
    cfg = resolve("tinyfusion-dit-xl-2-2to4", [f"prune.source={tmp_path / 'DiT-XL-2-256x256.pt'}",
                                               f"data.path={tmp_path / 'imagenet/train'}",
                                               f"autoencoder.path={tmp_path / 'sd-vae-ft-ema'}",
                                               "prune.recover_steps=1000"])
    check_request(cfg, tmp_path / "runs" / "tinyfusion")
    p = cfg.prune
    assert (p.method, p.pattern, p.mask_ema_decay, p.logit_scale, p.logit_scale_end) == ("learnable", "2:4", 0.999, 100.0, 100.0)
    assert (p.tau_start, p.tau_end, p.lora_rank, p.lora_alpha, p.search_batch_size) == (4.0, 0.1, 8, 16.0, 128)
    assert recovery_lr(cfg)[0] == pytest.approx(2e-4)
    assert not (tmp_path / "runs").exists()
