"""Dimba backbone: parameter counts of the official code, the official checkpoint layout, the attention/Mamba
interleaving and residual streams, masked text cross-attention, training and prompting through the real loop."""

import json
import math

import pytest
import torch

from ditk.config import resolve
from ditk.errors import ConfigError
from ditk.hooks import attach
from ditk.models.dimba import (DIMBA_SIZES, Dimba, build_dimba, convert_official_state_dict, dimba_size_config,
                               mamba_positions, sincos_pos_embed)
from ditk.models.layers import CrossAttention, get_2d_sincos_pos_embed
from ditk.train import prepare_run_dir, train


def official_shapes(depth, d, heads=16, p=2, c=4, cap=4096, mamba_depth=None, n=16, expand=2, k=4):
    """name -> shape of every parameter of feizc/Dimba `Dimba` (PixArt blocks + `mamba_blocks`, bimamba v2,
    RMSNorm, learned sigma), as its modules define them."""
    mamba_depth = depth if mamba_depth is None else mamba_depth
    di, r = expand * d, math.ceil(d / 16)
    s = {"x_embedder.proj.weight": (d, c, p, p), "x_embedder.proj.bias": (d,),
         "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,),
         "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
         "t_block.1.weight": (6 * d, d), "t_block.1.bias": (6 * d,),
         "y_embedder.y_proj.fc1.weight": (d, cap), "y_embedder.y_proj.fc1.bias": (d,),
         "y_embedder.y_proj.fc2.weight": (d, d), "y_embedder.y_proj.fc2.bias": (d,),
         "final_layer.linear.weight": (p * p * 2 * c, d), "final_layer.linear.bias": (p * p * 2 * c,),
         "final_layer.scale_shift_table": (2, d)}
    for i in range(depth):
        b = f"blocks.{i}."
        s.update({b + "scale_shift_table": (6, d),
                  b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
                  b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
                  b + "cross_attn.q_linear.weight": (d, d), b + "cross_attn.q_linear.bias": (d,),
                  b + "cross_attn.kv_linear.weight": (2 * d, d), b + "cross_attn.kv_linear.bias": (2 * d,),
                  b + "cross_attn.proj.weight": (d, d), b + "cross_attn.proj.bias": (d,),
                  b + "mlp.fc1.weight": (4 * d, d), b + "mlp.fc1.bias": (4 * d,),
                  b + "mlp.fc2.weight": (d, 4 * d), b + "mlp.fc2.bias": (d,)})
    for j in range(mamba_depth):
        b = f"mamba_blocks.{j}."
        s.update({b + "norm.weight": (d,), b + "mixer.in_proj.weight": (2 * di, d), b + "mixer.out_proj.weight": (d, di)})
        for suffix, a_log, dd in (("", "A_log", "D"), ("_b", "A_b_log", "D_b")):
            s.update({b + f"mixer.conv1d{suffix}.weight": (di, 1, k), b + f"mixer.conv1d{suffix}.bias": (di,),
                      b + f"mixer.x_proj{suffix}.weight": (r + 2 * n, di),
                      b + f"mixer.dt_proj{suffix}.weight": (di, r), b + f"mixer.dt_proj{suffix}.bias": (di,),
                      b + f"mixer.{a_log}": (di, n), b + f"mixer.{dd}": (di,)})
    return s


# README: Dimba-L 0.9B, Dimba-G 1.8B (seed-models.md section 5: calc 0.86B / 1.82B with T5-XXL captions).
README_B = {"L": 0.9, "G": 1.8}


@pytest.mark.parametrize("size", list(DIMBA_SIZES))
def test_param_counts_match_the_official_code_and_readme(size):
    depth, d, heads = DIMBA_SIZES[size]
    with torch.device("meta"):
        model = build_dimba(dimba_size_config(size))
    count = sum(p.numel() for p in model.parameters())
    assert count == sum(math.prod(s) for s in official_shapes(depth, d, heads).values())
    assert round(count / 1e9, 1) == README_B[size]
    assert len(model.blocks) == depth and all(b.mamba is not None for b in model.blocks)


@pytest.mark.parametrize("ratio,positions", [(1.0, [0, 1, 2, 3, 4, 5, 6, 7]), (0.5, [1, 3, 5, 7]), (0.25, [1, 5])])
def test_official_checkpoint_layout_maps_onto_the_model(ratio, positions):
    assert mamba_positions(8, ratio) == positions
    model = Dimba(input_size=8, patch_size=2, hidden_size=32, depth=8, num_heads=2, mamba_ratio=ratio,
                  caption_channels=24, d_state=4)
    shapes = official_shapes(8, 32, 2, cap=24, mamba_depth=len(positions), n=4)
    fake = {name: torch.zeros(shape) for name, shape in shapes.items()}
    fake["pos_embed"], fake["y_embedder.y_embedding"] = torch.zeros(1, 16, 32), torch.zeros(300, 24)  # buffers
    converted = convert_official_state_dict(fake, model)
    ours = model.state_dict()
    assert set(converted) == set(ours)
    assert all(converted[k].shape == ours[k].shape for k in ours)
    assert [i for i, b in enumerate(model.blocks) if b.mamba is not None] == positions
    model.load_state_dict(converted)  # strict


def test_bad_mamba_ratio_is_a_config_error():
    with pytest.raises(ConfigError, match="mamba_ratio"):
        mamba_positions(28, 0.3)
    with pytest.raises(ConfigError, match="mamba_ratio"):
        mamba_positions(28, 0.0)


def test_position_embedding_is_pixart_sincos():
    torch.testing.assert_close(torch.from_numpy(sincos_pos_embed(32, 4)), torch.from_numpy(get_2d_sincos_pos_embed(32, 4)))
    # pe_interpolation s evaluates the same functions at positions / s: token (row 1, col 2), first channel = sin(col / s)
    emb = sincos_pos_embed(32, 4, 2.0)
    assert emb[1 * 4 + 2, 0] == pytest.approx(math.sin(2 / 2.0)) and emb[1 * 4 + 2, 16] == pytest.approx(math.sin(1 / 2.0))


def test_cross_attention_is_masked_softmax_attention():
    torch.manual_seed(0)
    attn = CrossAttention(16, 4, context_dim=8)
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 6, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    q = attn.q_linear(x).view(2, 5, 4, 4).transpose(1, 2)
    k, v = attn.kv_linear(ctx).view(2, 6, 2, 4, 4).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-1, -2)) / 2.0  # sqrt(head_dim)
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    expected = attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(attn(x, ctx, mask), expected, rtol=1e-5, atol=1e-6)
    # padding tokens are invisible; an all-padding caption gives no cross-attention contribution (not NaN)
    ctx2 = ctx.clone()
    ctx2[0, 3:] = 100.0
    torch.testing.assert_close(attn(x, ctx2, mask)[0], attn(x, ctx, mask)[0])
    empty = attn(x, ctx, torch.zeros(2, 6, dtype=torch.bool))
    torch.testing.assert_close(empty, attn.proj.bias.expand(2, 5, 16))


def tiny(**kw):
    cfg = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=4, num_heads=2, caption_channels=12,
               d_state=4, num_classes=10)
    cfg.update(kw)
    torch.manual_seed(0)
    return Dimba(**cfg)


def randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def inputs(n=3, length=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, length, dtype=torch.bool)
    mask[0, 3:] = False
    return (torch.randn(n, 1, 8, 8, generator=g), torch.tensor([1.0, 400.0, 999.0])[:n],
            torch.randn(n, length, 12, generator=g), mask)


def test_forward_follows_the_official_interleaving():
    """Layer i: x <- PixArt block(x); then Mamba: residual <- residual + x (x for the first), x <- mixer(RMSNorm(residual)).
    The attention stream continues from the Mamba output; the head reads the last x with t (not t0)."""
    for ratio in (1.0, 0.5):
        model = randomise(tiny(mamba_ratio=ratio)).eval()
        x, t, ctx, mask = inputs()
        with torch.no_grad():
            h = model.x_embedder(x) + model.pos_embed
            temb = model.t_embedder(t)
            t0 = model.t_block(temb)
            y = model.y_embedder.y_proj(ctx)
            residual = None
            for blk in model.blocks:
                s = (blk.scale_shift_table[None] + t0.view(3, 6, 32)).chunk(6, dim=1)
                h = h + s[2] * blk.attn(blk.norm1(h) * (1 + s[1]) + s[0])
                h = h + blk.cross_attn(h, y, mask)
                h = h + s[5] * blk.mlp(blk.norm2(h) * (1 + s[4]) + s[3])
                if blk.mamba is not None:
                    residual = h if residual is None else residual + h
                    h = blk.mamba.mixer(blk.mamba.norm(residual))
            shift, scale = (model.final_layer.scale_shift_table[None] + temb[:, None]).chunk(2, dim=1)
            head = model.final_layer.linear(model.final_layer.norm_final(h) * (1 + scale) + shift)
            torch.testing.assert_close(model(x, t, ctx, mask), model.unpatchify(head), rtol=1e-5, atol=1e-5)


def test_text_conditioning_reaches_the_output_through_unmasked_tokens_only():
    model = randomise(tiny()).eval()
    x, t, ctx, mask = inputs()
    with torch.no_grad():
        out = model(x, t, ctx, mask)
        assert out.shape == (3, 2, 8, 8)
        changed = ctx.clone()
        changed[0, 3:] += 5.0  # padding of sample 0
        torch.testing.assert_close(model(x, t, changed, mask), out)
        changed[0, 0] += 5.0  # a real token
        assert not torch.allclose(model(x, t, changed, mask)[0], out[0])
        # a sample alone equals its row of the batch up to float rounding (the BLAS rounds a batch of 1 and one
        # of 3 differently, from the timestep MLP on: ~2e-6 here)
        torch.testing.assert_close(model(x[1:2], t[1:2], ctx[1:2], mask[1:2]), out[1:2], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model(x, t, ctx, mask, pooled=torch.randn(3, 12)), out)  # pooled is unused
    with pytest.raises(ConfigError, match="caption_channels"):
        model(x, t, torch.randn(3, 5, 7), mask)


def test_init_follows_the_official_order():
    model = tiny()
    with torch.no_grad():
        x, t, ctx, mask = inputs()
        assert torch.equal(model(x, t, ctx, mask), torch.zeros(3, 2, 8, 8))  # zero output layer
    for blk in model.blocks:
        assert torch.equal(blk.cross_attn.proj.weight, torch.zeros(32, 32))
        # PixArt's xavier/zero init reaches the Mamba linears too, so dt_proj's bias is 0 as in the official model
        assert torch.equal(blk.mamba.mixer.dt_proj.bias, torch.zeros(64))
        bound = 1 / math.sqrt(128) / math.sqrt(4)  # fc2: kaiming-uniform / sqrt(number of Mamba blocks)
        assert 0 < blk.mlp.fc2.weight.abs().max() <= bound
    assert model.y_embedder.y_proj.fc2.weight.abs().max() <= 1 / math.sqrt(32) / 2
    assert model.y_embedder.y_proj.fc1.weight.std() < 0.03
    assert not any(name == "pos_embed" for name in model.state_dict())  # fixed, recomputed from the config


def test_hook_points_cover_attention_cross_attention_and_mamba():
    model = randomise(tiny()).eval()
    x, t, ctx, mask = inputs()
    with torch.no_grad():
        out = model(x, t, ctx, mask)
        zero = lambda m, i, o: torch.zeros_like(o)  # noqa: E731
        with attach(model, {"blocks.*.cross_attn.v_hook": zero}):  # zero values: the text no longer matters
            no_text = model(x, t, ctx, mask)
            torch.testing.assert_close(model(x, t, ctx + 3.0, mask), no_text)
        assert not torch.allclose(no_text, out)
        with attach(model, {"blocks.1.mamba.mixer.out_hook": lambda m, i, o: None}) as names:
            assert names == ["blocks.1.mamba.mixer.out_hook"]


TINY_DIMBA = ["model.hidden_size=32", "model.depth=2", "model.num_heads=2", "model.d_state=4",
              "conditioner.max_length=8", "train.global_batch_size=8", "train.log_every=1", "train.ckpt_every=2",
              "train.sample_every=0", "sample.num=2", "sample.batch_size=2", "sample.steps=2", "sample.grid_scale=1"]


@pytest.mark.parametrize("objective", [[], ["objective.name=rectified-flow", "model.learn_sigma=false", "sample.solver=euler"]])
def test_tiny_preset_trains_with_captions_and_samples_from_a_prompt(tmp_path, objective):
    from ditk.generate import generate_to_dir, load_pipeline

    cfg = resolve("digits-dimba", [*TINY_DIMBA, "train.max_steps=2", "run.name=dimba", *objective])
    run = tmp_path / "dimba"
    cfg = prepare_run_dir(cfg, run, None)
    assert train(cfg, run, progress=False) == 0
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    pipe = load_pipeline(str(run), overrides=["sample.prompt='a handwritten three'", "sample.cfg_scale=3"])
    captions = pipe.conditioner.encode_prompts(["a handwritten three", ""])
    assert captions["context"].shape[-1] == pipe.model.caption_channels == 384
    report = generate_to_dir(pipe, tmp_path / "gen", progress=False)
    assert report["num"] == 2 and len(list((tmp_path / "gen" / "images").glob("*.png"))) == 2
