"""Expert pruning keeps DiT-MoE's router consistent (top-k over the remaining experts, probabilities
renormalised over them); width pruning equals zeroing the removed MLP channels, and its Taylor importance equals
the autograd derivative of the loss with respect to channel scales."""

import json

import torch

from ditk.hooks import attach
from ditk.moe_stats import moe_layers
from ditk.prune.experts import activated_params, keep_experts
from ditk.prune.surgery import build_from_section
from ditk.prune.width import mlp_ratio_for, taylor_importance
from ditk_testing import TINY, invoke_ditk

MOE = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10,
           learn_sigma=False, num_experts=6, top_k=2, num_shared_experts=1)


def test_router_after_expert_pruning_is_top_k_over_the_remaining_experts():
    torch.manual_seed(0)
    model = build_from_section("dit-moe", MOE).eval()
    kept = [[0, 2, 3, 5], [1, 2, 4, 5]]
    names = [n for n, _ in moe_layers(model)]
    small = build_from_section("dit-moe", {**MOE, "num_experts": 4}).eval()
    small.load_state_dict(keep_experts(model.state_dict(), kept, names))
    tokens = torch.randn(50, 32)
    for (_, big), (_, little), keep in zip(moe_layers(model), moe_layers(small), kept):
        _, _, probs = big.gate(tokens)
        experts, weights, _ = little.gate(tokens)
        restricted = probs[:, keep] / probs[:, keep].sum(-1, keepdim=True)  # renormalised over the kept experts
        ref_w, ref_e = torch.topk(restricted, 2, dim=-1)
        assert torch.equal(experts, ref_e)
        torch.testing.assert_close(weights, ref_w, atol=1e-6, rtol=0)
        for j, e in enumerate(keep):  # the kept experts are the same functions, renumbered
            torch.testing.assert_close(little.experts[j](tokens), big.experts[e](tokens))
    per_expert = sum(p.numel() for p in model.blocks[0].mlp.experts[0].parameters())
    assert activated_params(model) == sum(p.numel() for p in model.parameters()) - 2 * 4 * per_expert
    assert activated_params(small) == activated_params(model) - 2 * 2 * 32  # the router rows of 2 experts x 2 layers


class Calib:
    """The two methods' view of calibration: a loss on a batch."""

    def __init__(self, x, t, y, target):
        self.data = (x, t, y, target)

    def loss(self, model, batch):
        x, t, y, target = self.data
        return ((model(x[batch], t[batch], y[batch]) - target[batch]) ** 2).mean()


def test_taylor_importance_is_the_derivative_wrt_channel_scales_and_width_pruning_equals_zeroed_channels():
    section = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=16, depth=2, num_heads=2, num_classes=10,
                   learn_sigma=False, mlp_ratio=2.0)
    torch.manual_seed(0)
    model = build_from_section("dit", section).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.2)
    x, t = torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64), torch.rand(6, generator=g, dtype=torch.float64) * 999
    y, target = torch.randint(10, (6,), generator=g), torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64)
    calib = Calib(x, t, y, target)
    batches = [slice(0, 3), slice(3, 6)]
    scores = taylor_importance(model, calib, batches)
    # oracle: scale fc1's row c (and bias) by m1_c and fc2's column c by m2_c; I_c = |dL/dm1_c + dL/dm2_c| at m = 1
    m1 = [torch.ones(32, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    m2 = [torch.ones(32, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    hooks = {}
    for i in range(2):
        hooks[f"blocks.{i}.mlp.fc1"] = lambda mod, a, out, i=i: out * m1[i]
        hooks[f"blocks.{i}.mlp.act"] = lambda mod, a, out, i=i: out * m2[i]
    with attach(model, hooks):
        total = sum(calib.loss(model, b) for b in batches)
    grads = torch.autograd.grad(total, m1 + m2)
    for i in range(2):
        torch.testing.assert_close(scores[i], (grads[i] + grads[2 + i]).abs(), atol=1e-10, rtol=1e-8)

    # the smaller model (mlp_ratio from the kept count) equals the source with the other channels zeroed
    keep = [sorted(torch.argsort(s, descending=True)[:20].tolist()) for s in scores]
    small = build_from_section("dit", {**section, "mlp_ratio": mlp_ratio_for(16, 20)}).double()
    sd = model.state_dict()
    zeroed = {k: v.clone() for k, v in sd.items()}
    for i, k in enumerate(keep):
        idx = torch.tensor(k)
        sd[f"blocks.{i}.mlp.fc1.weight"], sd[f"blocks.{i}.mlp.fc1.bias"] = sd[f"blocks.{i}.mlp.fc1.weight"][idx], sd[f"blocks.{i}.mlp.fc1.bias"][idx]
        sd[f"blocks.{i}.mlp.fc2.weight"] = sd[f"blocks.{i}.mlp.fc2.weight"][:, idx]
        drop = [c for c in range(32) if c not in k]
        zeroed[f"blocks.{i}.mlp.fc2.weight"][:, drop] = 0
    small.load_state_dict(sd)
    model.load_state_dict(zeroed)
    with torch.no_grad():
        torch.testing.assert_close(small(x, t, y), model(x, t, y), atol=1e-10, rtol=0)


def test_mlp_ratio_for_gives_the_exact_channel_count():
    for hidden in (16, 96, 1152):
        for c in range(1, 4 * hidden, 7):
            assert int(hidden * mlp_ratio_for(hidden, c)) == c


def test_experts_and_width_through_the_cli(tmp_path):
    tiny = [a for a in TINY if not a.startswith("model.")] + ["model.hidden_size=32", "model.depth=2",
                                                                "model.num_heads=2"]
    moe = tiny + ["model.num_experts=4", "model.num_shared_experts=1"]
    invoke_ditk("train", "digits-dit-moe", *moe, "train.max_steps=1", f"run.dir={tmp_path}", "run.name=moe",
                "--no-progress", check=True)
    common = ["prune.calib_batches=1", "prune.calib_batch_size=4", f"run.dir={tmp_path}", "--no-progress"]
    proc = invoke_ditk("prune", "digits-dit-moe", *moe, *common, f"prune.source={tmp_path / 'moe'}",
                       "prune.method=experts", "prune.experts_keep=3", "run.name=moe3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "moe3" / "pruning.json").read_text())
    assert report["experts_after"] == 3 and all(len(k) == 3 for k in report["kept_experts"])
    assert report["activated_params_after"] < report["activated_params_before"]
    assert report["params_after"] < report["params_before"]
    assert invoke_ditk("sample", tmp_path / "moe3", "--num", 2, "--steps", 2, "--no-progress").returncode == 0
    proc = invoke_ditk("prune", "digits-dit-moe", *moe, *common, f"prune.source={tmp_path / 'moe'}",
                       "prune.method=experts", "prune.experts_keep=3", "prune.experts_merge=true", "run.name=moe3m")
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged = json.loads((tmp_path / "moe3m" / "pruning.json").read_text())
    assert merged["merge"] and merged["params_after"] == report["params_after"]
    for groups, kept in zip(merged["merged_groups"], merged["kept_experts"]):  # every expert lands in one group
        assert [g[0] for g in groups] == kept and sorted(e for g in groups for e in g) == list(range(4))
    bad = invoke_ditk("prune", "digits-dit-moe", *moe, *common, f"prune.source={tmp_path / 'moe'}",
                      "prune.method=experts", "prune.experts_keep=1", "run.name=moe1")
    assert bad.returncode == 2 and "top_k" in bad.stderr and not (tmp_path / "moe1").exists()

    invoke_ditk("train", "digits-dit", *tiny, "train.max_steps=1", f"run.dir={tmp_path}", "run.name=dense",
                "--no-progress", check=True)
    proc = invoke_ditk("prune", "digits-dit", *tiny, *common, f"prune.source={tmp_path / 'dense'}",
                       "prune.method=width", "prune.mlp_keep=64", "run.name=narrow")
    assert proc.returncode == 0, proc.stderr[-2000:]
    from ditk.config import load_run_config

    cfg = load_run_config(tmp_path / "narrow")
    assert int(cfg.model.hidden_size * cfg.model.mlp_ratio) == 64
    assert json.loads((tmp_path / "narrow" / "pruning.json").read_text())["gflops_after"] < \
        json.loads((tmp_path / "narrow" / "pruning.json").read_text())["gflops_before"]
