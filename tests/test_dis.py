"""DiS backbone: parameter counts of the official code, token layout, the U-ViT long skips, training with both
objectives through the real loop."""

import json
import math

import pytest
import torch

from ditk.config import resolve
from ditk.errors import ConfigError
from ditk.models.dis import DIS_SIZES, DiS, build_dis, dis_size_config
from ditk.models.mamba import MambaBlock
from ditk.registry import MODELS
from ditk.train import prepare_run_dir, train


def official_param_count(depth, d, p, in_channels=4, num_classes=1000, input_size=32, d_state=16, expand=2, d_conv=4):
    """All parameters of feizc/DiS models_dis.py `DisModel` (class-conditional, learn_sigma, skip=True,
    bimamba v2, RMSNorm), from its layer shapes."""
    linear = lambda i, o, bias=True: i * o + (o if bias else 0)  # noqa: E731
    d_inner, rank, tokens = expand * d, math.ceil(d / 16), (input_size // p) ** 2
    patch_embed = in_channels * p * p * d + d
    time_embed = linear(d, 4 * d) + linear(4 * d, d)  # on a d-dim sinusoid
    label_emb = (num_classes + 1) * d  # + the null label
    pos_embed = (2 + tokens) * d  # label, time, patches
    direction = d_inner * d_conv + d_inner + linear(d_inner, rank + 2 * d_state, False) + linear(rank, d_inner) \
        + d_inner * d_state + d_inner  # conv1d, x_proj, dt_proj, A_log, D
    mixer = linear(d, 2 * d_inner, False) + 2 * direction + linear(d_inner, d, False)
    block = mixer + d  # + RMSNorm weight
    skip_linear = linear(2 * d, d)  # out blocks only
    final = linear(d, p * p * 2 * in_channels) + linear(d, 2 * d)
    return patch_embed + time_embed + label_emb + pos_embed + (depth + 1) * block + depth // 2 * skip_linear + d + final


# seed-models.md section 3(b): parameters of the official configs at 256x256 (latent 32, 1000 classes), in millions;
# the papers round DiS-H to 900M.
REFERENCE_M = {"S": 29.1, "B": 121, "M": 231, "L": 407, "H": 907}


@pytest.mark.parametrize("size", list(DIS_SIZES))
@pytest.mark.parametrize("patch", [2, 4])
def test_param_counts_match_the_official_code(size, patch):
    depth, d = DIS_SIZES[size]
    with torch.device("meta"):
        model = build_dis(dis_size_config(size, patch))
    count = sum(p.numel() for p in model.parameters())
    assert count == official_param_count(depth, d, patch)
    digits = 1 if size == "S" else 0
    assert round(count / 1e6, digits) == REFERENCE_M[size]
    assert len(model.blocks) == depth + 1


@pytest.mark.parametrize("name,size,patch", [("dis-s-2", "S", 2), ("dis-b-4", "B", 4), ("dis-h-2", "H", 2)])
def test_paper_presets_build_the_named_size(name, size, patch):
    cfg = resolve(name, allow_missing=("data", "autoencoder"))
    depth, d = DIS_SIZES[size]
    assert (cfg.model.name, cfg.model.depth, cfg.model.hidden_size, cfg.model.patch_size) == ("dis", depth, d, patch)
    assert (cfg.optim.lr, cfg.train.global_batch_size, cfg.train.grad_clip, cfg.sample.cfg_channels) == (1e-4, 128, 1.0, 3)


def tiny(**kw):
    cfg = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=4, d_state=4, num_classes=5)
    cfg.update(kw)
    torch.manual_seed(0)
    return DiS(**cfg)


def test_tokens_layout_and_output():
    model = tiny().eval()
    assert (model.in_channels, model.out_channels, model.input_size, model.num_classes, model.learn_sigma) == (1, 2, 8, 5, True)
    assert model.pos_embed.shape == (1, 2 + 16, 32) and model.pos_embed.requires_grad
    assert model.t_embedder.mlp[0].weight.shape == (128, 32)  # D-dim sinusoid -> 4D -> D
    assert model.y_embedder.embedding_table.num_embeddings == 6  # + null label
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([1.0, 500.0, 999.0]), torch.tensor([0, 4, 5])
    with torch.no_grad():
        out = model(x, t, y)
        assert out.shape == (3, 2, 8, 8)
        # no mixing across the batch
        torch.testing.assert_close(out[1:2], model(x[1:2], t[1:2], y[1:2]), rtol=1e-5, atol=1e-6)
        # the label and time tokens reach the output
        assert not torch.allclose(out, model(x, t, torch.tensor([1, 3, 0])))
        assert not torch.allclose(out, model(x, t + 100, y))
    # the sequence the blocks see is [label, time, patches] + pos_embed
    seen = []
    handle = model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        model(x, t, y)
    handle.remove()
    expected = torch.cat([model.y_embedder(y)[:, None], model.t_embedder(t)[:, None], model.x_embedder(x)], 1)
    torch.testing.assert_close(seen[0], expected + model.pos_embed)


def test_long_skips_pair_mirrored_blocks_last_in_first_out():
    model = tiny(depth=6).eval()  # 3 in, 1 middle, 3 out
    assert [b.skip_linear is not None for b in model.blocks] == [False] * 4 + [True] * 3
    outputs, skips = {}, {}
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda m, args, out, i=i: outputs.__setitem__(i, out[0]))
        block.register_forward_pre_hook(lambda m, args, kwargs, i=i: skips.__setitem__(i, kwargs.get("skip")),
                                        with_kwargs=True)
    with torch.no_grad():
        model(torch.randn(2, 1, 8, 8), torch.tensor([3.0, 7.0]), torch.tensor([1, 2]))
    for out_block, in_block in ((4, 2), (5, 1), (6, 0)):
        assert torch.equal(skips[out_block], outputs[in_block])
    assert all(skips[i] is None for i in range(4))


def test_blocks_follow_the_prenorm_residual_recurrence():
    """Block i: residual += hidden; hidden = mixer(RMSNorm(residual)) - and the head normalises residual + hidden."""
    model = tiny(depth=2, skip=False).eval()
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 7.0]), torch.tensor([1, 2])
    with torch.no_grad():
        h = torch.cat([model.y_embedder(y)[:, None], model.t_embedder(t)[:, None], model.x_embedder(x)], 1) + model.pos_embed
        r = h
        h = model.blocks[0].mixer(model.blocks[0].norm(r))
        for block in model.blocks[1:]:
            r = r + h
            h = block.mixer(block.norm(r))
        head = model.final_layer(model.norm_f(r + h), model.t_embedder(t) + model.y_embedder(y))
        torch.testing.assert_close(model(x, t, y), model.unpatchify(head[:, 2:]))


def test_init_follows_mamba_ssm():
    model = tiny(depth=4)
    for block in model.blocks:
        assert isinstance(block, MambaBlock) and block.mixer.bidirectional
        assert block.mixer.in_proj.bias is None and block.mixer.out_proj.bias is None
        # out_proj: kaiming-uniform(a=sqrt 5) bound 1/sqrt(fan_in), divided by sqrt(depth)
        bound = 1 / math.sqrt(block.mixer.d_inner) / math.sqrt(4)
        assert block.mixer.out_proj.weight.abs().max() <= bound
        assert block.mixer.dt_proj.bias.abs().sum() > 0  # kept (softplus^-1 of dt), not zeroed
        if block.skip_linear is not None:
            assert torch.equal(block.skip_linear.bias, torch.zeros(32))
    assert torch.equal(model.pos_embed, torch.zeros_like(model.pos_embed))
    assert model.y_embedder.embedding_table.weight.std() < 0.03


def test_drop_path_is_linear_over_blocks_and_off_in_eval():
    model = tiny(depth=4, drop_path=0.2)
    assert [round(b.drop_path.p, 6) for b in model.blocks] == [0.0, 0.0, round(0.2 / 3, 6), round(0.4 / 3, 6), 0.2]
    model.eval()
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 7.0]), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(model(x, t, y), model(x, t, y))


def test_bad_configs_are_config_errors():
    with pytest.raises(ConfigError, match="even depth"):
        tiny(depth=3)
    with pytest.raises(ConfigError, match="multiple"):
        tiny(input_size=9)
    with pytest.raises(ConfigError, match="scan_backend"):
        tiny(scan_backend="fast")
    assert "dis" in MODELS.names()


TINY_DIS = ["model.hidden_size=32", "model.depth=2", "model.d_state=4", "train.global_batch_size=16",
            "train.log_every=1", "train.ckpt_every=3", "train.sample_every=0", "sample.num=4", "sample.batch_size=4",
            "sample.steps=3", "sample.grid_scale=1"]


@pytest.mark.parametrize("objective", [
    [],
    ["objective.name=rectified-flow", "model.learn_sigma=false", "sample.solver=euler"],
])
def test_tiny_preset_trains_through_the_loop_with_both_objectives(tmp_path, objective):
    cfg = resolve("digits-dis", [*TINY_DIS, "train.max_steps=3", "run.name=dis", *objective])
    run = tmp_path / "dis"
    cfg = prepare_run_dir(cfg, run, None)
    assert train(cfg, run, progress=False) == 0
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert (run / "checkpoints" / "step-000003" / "ema.safetensors").is_file()
    assert (run / "samples" / "step-000003.png").is_file()
