"""Attention-head pruning: removing heads whose proj columns are zero leaves the output unchanged; the head Taylor
importance equals autograd's derivative of the loss w.r.t. per-head parameter scales; the pruned run's
config.yaml alone rebuilds the in-memory pruned model; per-block head counts keep official loading unchanged."""

import json

import pytest
import torch
from torch.func import functional_call

from ditk.errors import ConfigError
from ditk.prune.heads import choose_heads, head_cols, head_importance, head_rows, keep_heads
from ditk.prune.layout import pruned_section
from ditk.prune.surgery import build_from_section, depth_pruned
from ditk_testing import TINY, invoke_ditk

SECTION = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=3, num_heads=4, num_classes=10,
               learn_sigma=False)
MOE = dict(SECTION, num_experts=4, top_k=2, num_shared_experts=1, qk_norm=True)


def randomised(name, section, seed=0):
    torch.manual_seed(seed)
    model = build_from_section(name, section).double().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.2)
    return model


def data(n=4, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64)
    t = torch.rand(n, generator=g, dtype=torch.float64) * 999
    return x, t, torch.randint(10, (n,), generator=g), torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("name,section", [("dit", SECTION), ("dit-moe", MOE)])
def test_removing_heads_with_zero_output_columns_leaves_the_output_unchanged(name, section):
    model = randomised(name, section)
    kept = [[0, 2, 3], [1], [0, 1, 2, 3]]  # blocks keep 3, 1 and all 4 heads
    d = 32 // 4
    with torch.no_grad():  # "dead" heads: their proj columns are zero, so they contribute nothing
        for block, k in zip(model.blocks, kept):
            dead = [h for h in range(4) if h not in k]
            if dead:
                block.attn.proj.weight[:, head_cols(d, dead)] = 0
    small = build_from_section(name, {**section, "block_heads": [len(k) for k in kept]}).double().eval()
    small.load_state_dict(keep_heads(model.state_dict(), model, kept), strict=True)
    assert [b.attn.num_heads for b in small.blocks] == [3, 1, 4]
    assert small.blocks[1].attn.qkv.weight.shape == (3 * d, 32) and small.blocks[1].attn.proj.weight.shape == (32, d)
    x, t, y, _ = data()
    with torch.no_grad():
        torch.testing.assert_close(small(x, t, y), model(x, t, y), atol=1e-6, rtol=0)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


class Calib:
    def __init__(self, x, t, y, target):
        self.data = (x, t, y, target)

    def loss(self, model, part):
        x, t, y, target = self.data
        return ((model(x[part], t[part], y[part]) - target[part]) ** 2).mean()


def test_head_taylor_importance_is_the_derivative_wrt_per_head_scales():
    model = randomised("dit", SECTION)
    calib = Calib(*data(6))
    batches = [slice(0, 3), slice(3, 6)]
    scores = head_importance(model, calib, batches)
    # oracle: multiply every parameter of head h (its q, k, v rows of qkv, weight and bias, and its proj columns)
    # by s_h; I_h = |d (sum of the batch losses) / d s_h| at s = 1.
    d = 32 // 4
    s = [torch.ones(4, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    params = dict(model.named_parameters())
    for i in range(3):
        rows = s[i].repeat_interleave(d).repeat(3)  # (3 * 4 * d,): [q | k | v], head-major inside each
        cols = s[i].repeat_interleave(d)
        params[f"blocks.{i}.attn.qkv.weight"] = params[f"blocks.{i}.attn.qkv.weight"] * rows[:, None]
        params[f"blocks.{i}.attn.qkv.bias"] = params[f"blocks.{i}.attn.qkv.bias"] * rows
        params[f"blocks.{i}.attn.proj.weight"] = params[f"blocks.{i}.attn.proj.weight"] * cols[None, :]
    x, t, y, target = calib.data
    total = sum(((functional_call(model, params, (x[b], t[b], y[b])) - target[b]) ** 2).mean() for b in batches)
    grads = torch.autograd.grad(total, s)
    for i in range(3):
        torch.testing.assert_close(scores[i], grads[i].abs(), atol=1e-10, rtol=1e-8)
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def test_head_choice_per_block_and_global():
    scores = [torch.tensor([0.1, 5.0, 0.3, 0.2]), torch.tensor([0.01, 0.02, 0.03, 0.04]),
              torch.tensor([9.0, 8.0, 7.0, 0.5])]
    assert choose_heads(scores, 2, "block") == [[1, 2], [2, 3], [0, 1]]
    # 6 heads overall: every block's best (1; 3; 0) first, then the 3 largest of the rest: 8, 7, 0.5 (block 2)
    assert choose_heads(scores, 2, "global") == [[1], [3], [0, 1, 2, 3]]
    assert head_rows(2, 3, [1]).tolist() == [3, 4, 5, 9, 10, 11, 15, 16, 17]


def test_block_heads_config_is_checked_and_follows_depth_pruning():
    with pytest.raises(ConfigError, match="one head count per block"):
        build_from_section("dit", {**SECTION, "block_heads": [1, 2]})
    with pytest.raises(ConfigError, match="at least 1"):
        build_from_section("dit", {**SECTION, "block_heads": [1, 0, 2]})
    with pytest.raises(ConfigError, match="block_heads"):
        build_from_section("dydit", {**SECTION, "num_heads": 4, "block_heads": [1, 2, 3]})
    # the default (uniform heads) builds the very same module as before: same names, shapes and seeded values
    torch.manual_seed(0)
    a = build_from_section("dit", SECTION)
    torch.manual_seed(0)
    b = build_from_section("dit", {**SECTION, "block_heads": [4, 4, 4]})
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    # depth pruning a head-pruned model keeps the kept blocks' head counts
    assert pruned_section("dit", {**SECTION, "block_heads": [3, 1, 2]}, [0, 2])["block_heads"] == [3, 2]
    model = randomised("dit", {**SECTION, "block_heads": [3, 1, 2]})
    small, section = depth_pruned(model, "dit", {**SECTION, "block_heads": [3, 1, 2]}, [1, 2])
    assert [b.attn.num_heads for b in small.blocks] == [1, 2] and section["block_heads"] == [1, 2]


def test_heads_through_the_cli_rebuild_from_config(tmp_path):
    tiny = [a for a in TINY if not a.startswith("model.")] + ["model.hidden_size=32", "model.depth=2",
                                                                "model.num_heads=4"]
    invoke_ditk("train", "digits-dit", *tiny, "train.max_steps=1", f"run.dir={tmp_path}", "run.name=dense",
                "--no-progress", check=True)
    common = ["prune.calib_batches=1", "prune.calib_batch_size=4", f"run.dir={tmp_path}", "--no-progress",
              f"prune.source={tmp_path / 'dense'}", "prune.method=heads"]
    proc = invoke_ditk("prune", "digits-dit", *tiny, *common, "prune.heads_keep=2", "prune.heads_scope=global",
                       "run.name=narrow")
    assert proc.returncode == 0, proc.stderr[-2000:]
    from safetensors.torch import load_file

    from ditk.build import build_model
    from ditk.config import load_run_config
    from ditk.models.convert import load_initial_weights

    report = json.loads((tmp_path / "narrow" / "pruning.json").read_text())
    assert sum(report["block_heads"]) == 4 and report["params_after"] < report["params_before"]
    assert report["gflops_after"] < report["gflops_before"]
    cfg = load_run_config(tmp_path / "narrow")
    assert list(cfg.model.block_heads) == report["block_heads"] and cfg.model.num_heads == 4
    rebuilt = build_model(cfg).eval()  # config.yaml alone describes the smaller model
    rebuilt.load_state_dict(load_file(str(tmp_path / "narrow" / "checkpoints" / "step-000000" / "ema.safetensors")))
    source = build_model(load_run_config(tmp_path / "dense")).eval()
    load_initial_weights(source, tmp_path / "dense")
    expected = build_model(cfg).eval()  # the in-memory surgery on the source's weights, by the report's choice
    expected.load_state_dict(keep_heads(source.state_dict(), source, report["kept_heads"]))
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(2, 1, 8, 8, generator=g), torch.tensor([10.0, 500.0]), torch.tensor([1, 2])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x, t, y), expected(x, t, y), atol=1e-6, rtol=0)
    assert invoke_ditk("sample", tmp_path / "narrow", "--num", 2, "--steps", 2, "--no-progress").returncode == 0
    bad = invoke_ditk("prune", "digits-dit", *tiny, *common, "prune.heads_keep=4", "run.name=bad")
    assert bad.returncode == 2 and "heads_keep" in bad.stderr and not (tmp_path / "bad").exists()
