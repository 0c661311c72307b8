"""DiT-MoE: routing (top-k, capacity) and balance loss against float64 references and closed forms, the
one-expert block against a dense DiT block, parameter counts against the paper's Table 1, both objectives,
and the tiny preset through `ditk train` / `ditk sample --moe-stats`."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ditk.errors import ConfigError
from ditk.models.dit import DiT, DiTBlock
from ditk.models.dit_moe import (DiTMoEConfig, SparseMoE, SwiGLU, balance_loss, build_dit_moe,
                                 dit_moe_size_config)
from ditk.moe_stats import ExpertUsageRecorder
from ditk.train import auxiliary_loss
from ditk_testing import TINY, run_ditk



def official_param_count(depth, d, heads, experts, top_k=2, qk_norm=False, p=2, in_channels=4, num_classes=1000,
                         input_size=32):
    """(total, activated) of feizc/DiT-MoE models.py from its layer shapes (learn_sigma, 2 shared experts)."""
    linear = lambda i, o, bias=True: i * o + (o if bias else 0)  # noqa: E731
    swiglu = lambda width: 3 * d * width  # noqa: E731  gate/up/down projections, no bias
    tokens = (input_size // p) ** 2
    embed = in_channels * p * p * d + d + linear(256, d) + linear(d, d) + (num_classes + 1) * d + tokens * d
    attn = linear(d, 3 * d) + linear(d, d) + (4 * (d // heads) if qk_norm else 0)  # + affine q/k LayerNorms
    block = attn + linear(d, 6 * d) + experts * d + experts * swiglu(4 * d) + swiglu(2 * d)  # router, routed, shared
    final = linear(d, 2 * d) + linear(d, p * p * 2 * in_channels)
    total = embed + depth * block + final
    return total, total - depth * (experts - top_k) * swiglu(4 * d)


# Paper Table 1 (total, activated parameters) of each preset; the paper rounds (or truncates) to 2-3 digits.
PAPER = {
    "dit-moe-s-2-8e2a": ("S", 8, False, 199e6, 71e6),
    "dit-moe-s-2-16e2a": ("S", 16, False, 369e6, 71e6),
    "dit-moe-b-2-8e2a": ("B", 8, False, 795e6, 286e6),
    "dit-moe-l-2-8e2a": ("L", 8, False, 2.8e9, 1.0e9),
    "dit-moe-xl-2-8e2a": ("XL", 8, True, 4.1e9, 1.5e9),
    "dit-moe-g-2-16e2a": ("G", 16, True, 16.5e9, 3.1e9),
}


@pytest.mark.parametrize("preset", list(PAPER))
def test_param_counts_match_official_code_and_paper(preset):
    from ditk.build import build_model
    from ditk.config import resolve

    size, experts, qk_norm, paper_total, paper_active = PAPER[preset]
    cfg = resolve(preset, allow_missing=("data", "autoencoder"))
    want = dit_moe_size_config(size, experts, qk_norm=qk_norm)
    assert {k: cfg.model[k] for k in ("depth", "hidden_size", "num_heads", "patch_size", "num_experts", "top_k",
                                      "num_shared_experts", "qk_norm")} == {
        k: getattr(want, k) for k in ("depth", "hidden_size", "num_heads", "patch_size", "num_experts", "top_k",
                                      "num_shared_experts", "qk_norm")}
    with torch.device("meta"):  # shapes only
        model = build_model(cfg)
    report = model.parameter_report()
    depth, d, heads = cfg.model.depth, cfg.model.hidden_size, cfg.model.num_heads
    assert (report["total"], report["activated"]) == official_param_count(depth, d, heads, experts, qk_norm=qk_norm)
    assert report["total"] - report["trainable"] == 256 * d  # the frozen position embedding
    assert abs(report["total"] / paper_total - 1) < 0.02
    assert abs(report["activated"] / paper_active - 1) < 0.03


def test_presets_show_reports_activated_parameters():
    from click.testing import CliRunner

    from ditk.cli import cli

    result = CliRunner().invoke(cli, ["presets", "show", "dit-moe-s-2-8e2a"])
    assert result.exit_code == 0, result.output
    assert "# parameters: 199,307,552 (199,209,248 trainable)" in result.output
    assert "# activated parameters: 71,905,568 (36.1% of total)" in result.output


#################################################################################
#                        Routing, capacity and balance loss                     #
#################################################################################


def make_moe(dim=16, experts=8, top_k=2, shared=2, seed=0, **kw):
    torch.manual_seed(seed)
    moe = SparseMoE(dim, num_experts=experts, top_k=top_k, num_shared_experts=shared, **kw).double()
    with torch.no_grad():  # a router with some spread, so top-k is well separated
        moe.gate.weight.normal_(0, 1.0)
    return moe


def dense_reference(moe, x, keep=None):
    """float64: every expert on every token, combined with the top-k softmax weights (computed here)."""
    tokens = x.reshape(-1, x.shape[-1])
    probs = torch.softmax(tokens @ moe.gate.weight.t(), dim=-1)
    top = probs.argsort(dim=-1, descending=True)[:, : moe.top_k]
    all_out = torch.stack([expert(tokens) for expert in moe.experts], dim=1)  # (M, E, D)
    out = torch.zeros_like(tokens)
    for m in range(tokens.shape[0]):
        for j in range(moe.top_k):
            if keep is None or keep[m][j]:
                e = int(top[m, j])
                out[m] += probs[m, e] * all_out[m, e]
    if moe.shared_experts is not None:
        out += moe.shared_experts(tokens)
    return out.reshape(x.shape), top, probs


@pytest.mark.parametrize("training", [True, False])
def test_routing_respects_top_k_and_matches_dense_reference(training):
    moe = make_moe().train(training)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    chosen = {}
    moe.gate.register_forward_hook(lambda m, a, out: chosen.update(experts=out[0], weights=out[1]))
    out = moe(x)
    want, top, probs = dense_reference(moe, x)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    experts = chosen["experts"]
    assert experts.shape == (15, 2)
    assert all(len(set(row.tolist())) == 2 for row in experts)  # k distinct experts per token
    assert torch.equal(experts, top)  # the k most probable, first choice first
    # weights are the softmax probabilities themselves, not renormalised over the k choices
    torch.testing.assert_close(chosen["weights"], probs.gather(1, top))
    assert (chosen["weights"].sum(-1) < 1).all()


def test_capacity_drops_overflow_in_priority_order():
    moe = make_moe(experts=4, top_k=2, capacity_factor=0.5)
    with torch.no_grad():  # push most tokens to experts 0 and 1 so that capacity binds
        moe.gate.weight[0] += 2.0 * moe.gate.weight[0].sign()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    m = 12
    capacity = math.ceil(0.5 * m * 2 / 4)
    assert moe.capacity(m) == capacity == 3
    _, top, _ = dense_reference(moe, x)
    # GShard priority: every first choice (token order) before any second choice
    keep, used = [[False, False] for _ in range(m)], [0] * 4
    for j in range(2):
        for t in range(m):
            e = int(top[t, j])
            if used[e] < capacity:
                used[e] += 1
                keep[t][j] = True
    assert sum(not k for row in keep for k in row) > 0  # the test routing really overflows
    assert max(used) <= capacity
    want, _, _ = dense_reference(moe, x, keep)
    torch.testing.assert_close(moe(x), want, rtol=1e-10, atol=1e-12)
    moe.capacity_factor = 0.0  # no capacity: nothing dropped
    torch.testing.assert_close(moe(x), dense_reference(moe, x)[0], rtol=1e-10, atol=1e-12)


def one_hot_routing(logits):
    """A router whose logits for token m are exactly logits[m]: tokens are the unit vectors e_m."""
    m, e = logits.shape
    moe = SparseMoE(m, num_experts=e, top_k=2, num_shared_experts=0, aux_loss_alpha=0.01).double().train()
    with torch.no_grad():
        moe.gate.weight.copy_(torch.as_tensor(logits, dtype=torch.float64).t())
    return moe, torch.eye(m, dtype=torch.float64)[None]


def test_balance_loss_equals_its_formula_on_hand_built_routing():
    alpha = 0.01
    # Balanced: token m prefers experts m and m+1 (mod 4): every expert gets 2 of the 8 slots, f_i = 1, so the
    # loss is alpha * sum_i P_i = alpha whatever the probabilities.
    logits = np.full((4, 4), -1.0)
    for m in range(4):
        logits[m, m], logits[m, (m + 1) % 4] = 2.0 + 0.5 * m, 1.0
    moe, x = one_hot_routing(logits)
    moe(x)
    assert moe.aux_loss.item() == pytest.approx(alpha, rel=1e-12)
    # Collapsed: every token picks experts 0 and 1: f = (2, 2, 0, 0), loss = 2 alpha (P_0 + P_1).
    logits = np.array([[3.0, 2.0, 0.0, -1.0], [2.5, 2.6, 1.0, 0.0], [4.0, 1.0, 0.5, 0.0], [1.0, 3.0, -2.0, 0.5]])
    moe, x = one_hot_routing(logits)
    moe(x)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    want = alpha * 2 * (p[:, 0].mean() + p[:, 1].mean())
    assert moe.aux_loss.item() == pytest.approx(want, rel=1e-12)
    # the same from the generic function; gradients reach the router through P
    moe.aux_loss.backward()
    assert moe.gate.weight.grad.abs().sum() > 0
    probs = torch.softmax(torch.as_tensor(logits), -1)
    experts = torch.tensor([[0, 1]] * 4)
    assert balance_loss(probs, experts, 4, alpha).item() == pytest.approx(want, rel=1e-12)


def test_aux_loss_is_set_in_training_only_and_summed_by_the_train_loop():
    torch.manual_seed(0)
    model = build_dit_moe(DiTMoEConfig(input_size=8, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                                       num_classes=10, num_experts=4))
    x, t, y = torch.randn(3, 1, 8, 8), torch.rand(3), torch.tensor([1, 2, 10])
    model.train()(x, t, y)
    terms = [layer.aux_loss for _, layer in model.moe_layers()]
    assert all(term is not None and term.requires_grad for term in terms)
    torch.testing.assert_close(auxiliary_loss(model), sum(terms))
    model.eval()(x, t, y)
    assert auxiliary_loss(model) is None
    model.train()
    model.blocks[0].mlp.aux_loss_alpha = model.blocks[1].mlp.aux_loss_alpha = 0.0
    model(x, t, y)
    assert auxiliary_loss(model) is None  # alpha 0 switches the loss off


#################################################################################
#                    One expert, no routing == a dense DiT block                #
#################################################################################


def randomise(module, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.2)
    return module


@pytest.mark.parametrize("expert_type", ["gelu", "swiglu"])
def test_one_expert_block_equals_dense_dit_block(expert_type):
    d, heads = 24, 3
    mlp = None if expert_type == "gelu" else SwiGLU(d, 4 * d)
    dense = randomise(DiTBlock(d, heads, mlp_ratio=4.0, mlp=mlp), 1).double()  # the stock GELU MLP for gelu
    moe = SparseMoE(d, num_experts=1, top_k=1, num_shared_experts=0, expert_type=expert_type)
    sparse = DiTBlock(d, heads, mlp=moe).double()
    state = {k.replace("mlp.", "mlp.experts.0.") if k.startswith("mlp.") else k: v
             for k, v in dense.state_dict().items()}
    state["mlp.gate.weight"] = torch.randn(1, d, dtype=torch.float64)  # a single expert always gets weight 1
    sparse.load_state_dict(state)
    x, c = torch.randn(2, 7, d, dtype=torch.float64), torch.randn(2, d, dtype=torch.float64)
    for training in (True, False):
        torch.testing.assert_close(sparse.train(training)(x, c), dense(x, c), rtol=1e-12, atol=1e-12)


def test_moe_model_reuses_dit_and_matches_official_init():
    torch.manual_seed(0)
    cfg = DiTMoEConfig(input_size=8, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10,
                       num_experts=4, qk_norm=True)
    model = build_dit_moe(cfg)
    assert isinstance(model, DiT) and all(isinstance(b, DiTBlock) for b in model.blocks)
    keys = set(model.state_dict())
    assert {"blocks.0.mlp.gate.weight", "blocks.0.mlp.experts.3.down_proj.weight",
            "blocks.0.mlp.shared_experts.up_proj.weight", "blocks.1.attn.q_norm.weight"} <= keys
    assert model.blocks[0].mlp.shared_experts.up_proj.weight.shape == (2 * 32, 32)  # 2 shared experts of width D
    assert model.x_embedder.proj.bias.abs().sum() == 0  # zeroed as in the official initialize_weights
    assert all(b.adaLN_modulation[-1].weight.abs().sum() == 0 for b in model.blocks)  # adaLN-Zero
    out = model(torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([0, 10]))
    assert out.shape == (2, 2, 8, 8) and out.abs().sum() == 0  # zero-initialised output layer
    with pytest.raises(ConfigError, match="top_k"):
        build_dit_moe(DiTMoEConfig(hidden_size=32, depth=1, num_heads=2, num_experts=2, top_k=3))
    with pytest.raises(ConfigError, match="expert_type"):
        build_dit_moe(DiTMoEConfig(hidden_size=32, depth=1, num_heads=2, expert_type="relu"))


def test_qk_norm_attention_matches_float64_formula_and_keeps_hook_points():
    from ditk.hooks import attach, hook_points
    from ditk.models.dit_moe import QKNormAttention

    attn = randomise(QKNormAttention(24, 3), 2).double()
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    q, k, v = (attn.qkv(x).reshape(2, 5, 3, 3, 8).permute(2, 0, 3, 1, 4))
    q, k = F.layer_norm(q, (8,), attn.q_norm.weight, attn.q_norm.bias, 1e-6), \
        F.layer_norm(k, (8,), attn.k_norm.weight, attn.k_norm.bias, 1e-6)
    want = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1) @ v
    want = attn.proj(want.transpose(1, 2).reshape(2, 5, 24))
    torch.testing.assert_close(attn(x), want, rtol=1e-10, atol=1e-12)
    model = build_dit_moe(DiTMoEConfig(input_size=8, in_channels=1, hidden_size=24, depth=2, num_heads=3,
                                       num_classes=10, num_experts=4, qk_norm=True)).double()
    assert {"blocks.1.attn.q_hook", "blocks.1.attn.v_hook", "blocks.1.attn.out_hook"} <= set(hook_points(model))
    model.blocks[1].attn = attn
    with attach(model, {"blocks.1.attn.v_hook": lambda m, a, out: torch.zeros_like(out)}):
        torch.testing.assert_close(attn(x), attn.proj.bias.expand(2, 5, 24))  # v replaced by zeros


def test_official_checkpoint_names_convert():
    torch.manual_seed(0)
    cfg = DiTMoEConfig(input_size=8, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10,
                       num_experts=4, qk_norm=True)
    model = randomise(build_dit_moe(cfg), 3)
    official = {}  # the names feizc/DiT-MoE models.py gives the same tensors
    for key, value in model.state_dict().items():
        key = key.replace(".mlp.", ".moe.").replace(".attn.qkv.", ".attn.Wqkv.").replace(".attn.proj.", ".attn.out_proj.")
        official[key] = value
    assert "blocks.0.moe.experts.0.gate_proj.weight" in official and "blocks.0.attn.Wqkv.weight" in official
    loaded = build_dit_moe(cfg)
    loaded.load_state_dict(loaded.convert_state_dict(official), strict=True)
    assert loaded.convert_state_dict(model.state_dict()).keys() == model.state_dict().keys()  # ditk names pass
    x, t, y = torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([3, 10])
    torch.testing.assert_close(loaded.eval()(x, t, y), model.eval()(x, t, y))


#################################################################################
#                      Objectives, CLI, expert-usage report                     #
#################################################################################


@pytest.mark.parametrize("objective", ["ddpm", "rectified-flow"])
def test_trains_and_samples_with_both_objectives(objective):
    from ditk.registry import OBJECTIVES
    from ditk.sampling import sample

    torch.manual_seed(0)
    model = build_dit_moe(DiTMoEConfig(input_size=8, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                                       num_classes=10, num_experts=4))
    obj = OBJECTIVES.build(objective, OBJECTIVES.get(objective).config())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    x0, y = torch.randn(4, 1, 8, 8, generator=gen), torch.tensor([0, 1, 2, 3])
    for _ in range(2):
        t = obj.sample_time(4, gen)
        loss = obj.training_losses(model, x0, t, torch.randn(4, 1, 8, 8, generator=gen), {"y": y})["loss"].mean()
        (loss + auxiliary_loss(model)).backward()
        assert model.blocks[0].mlp.gate.weight.grad.abs().sum() > 0
        opt.step()
        opt.zero_grad()
    model.eval()
    solver = "ddpm" if objective == "ddpm" else "euler"
    out = sample(model, obj, torch.randn(2, 1, 8, 8, generator=gen), {"y": y[:2]}, {"y": torch.tensor([10, 10])},
                 solver=solver, steps=3, cfg_scale=2.0, generator=gen)
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()


def test_recorder_refuses_a_model_without_experts():
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    with pytest.raises(ConfigError, match="mixture-of-experts"):
        ExpertUsageRecorder(model)


def test_recorder_numbers_steps_and_images_and_skips_cached_calls(tmp_path):
    torch.manual_seed(0)
    model = build_dit_moe(DiTMoEConfig(input_size=4, in_channels=1, hidden_size=16, depth=2, num_heads=2,
                                       num_classes=3, num_experts=4)).eval()
    recorder = ExpertUsageRecorder(model, guided=True, image_indices=[5, 7, 9])
    x = torch.randn(4, 1, 4, 4)
    y = torch.tensor([0, 2, 3, 3])  # [cond; uncond]: images 5 and 7 of classes 0 and 2, then the null label
    with recorder.attached():
        for step, t in enumerate([0.9, 0.6, 0.3]):  # run 1: images 5, 7
            if step == 1:  # a cache skips block 1 at this step: its router does not run
                model.blocks[1].forward = lambda h, c: h
            model(x, torch.full((4,), t), y=y)
            model.blocks[1].__dict__.pop("forward", None)
        model(x[:2], torch.full((2,), 0.9), y=torch.tensor([1, 3]))  # run 2 (time goes up): image 9
    model(x, torch.full((4,), 0.1), y=y)  # detached: not recorded
    r = recorder.routing()
    assert recorder.incomplete == 1
    assert r["image"].tolist() == [5, 7, 5, 7, 9] and r["call"].tolist() == [0, 0, 2, 2, 0]
    assert r["label"].tolist() == [0, 2, 0, 2, 1] and r["experts"].shape == (5, 2, 4, 2)
    stats = recorder.summary(r)
    assert stats["times"] == [0.9, None, 0.3] and stats["incomplete_calls"] == 1
    assert np.asarray(stats["counts"]["timestep"])[:, 1].sum() == 0
    assert np.asarray(stats["counts"]["class"]).sum(axis=(1, 2)).tolist() == [5 * 4 * 2] * 2  # rows x tokens x k
    path = recorder.write(tmp_path)
    assert json.loads(path.read_text())["images"] == [5, 7, 9]


def test_tiny_preset_trains_and_samples_with_moe_stats(tmp_path):
    one_thread = {"OMP_NUM_THREADS": "1"}  # tiny models: threads only contend on a busy machine
    run = run_ditk("train", "digits-dit-moe", *TINY, "train.max_steps=3", f"run.dir={tmp_path}", "--no-progress",
                   env=one_thread, check=True).stdout.strip()
    metrics = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(math.isfinite(m["loss"]) for m in metrics)
    out = tmp_path / "gen"
    num, steps = 6, 4
    proc = run_ditk("sample", run, "--num", num, "--batch-size", 4, "--steps", steps, "--cfg-scale", 2,
                    "--out", out, "--no-progress", "--moe-stats", env=one_thread, check=True)
    assert proc.stdout.strip() == str(out)
    stats = json.loads((out / "moe_stats.json").read_text())
    assert (out / "moe_heatmap.png").stat().st_size > 0
    routing = dict(np.load(out / "moe_routing.npz"))
    depth, tokens, experts, k = 2, 16, 8, 2  # TINY depth, 8x8 digits / patch 2, the preset's experts
    assert stats["layers"] == ["blocks.0.mlp", "blocks.1.mlp"] and stats["guided"] is True
    # one row per (image, Euler step): only the conditional half of the CFG batch is recorded
    assert routing["experts"].shape == (num * steps, depth, tokens, k)
    assert sorted(set(routing["image"].tolist())) == stats["images"] == list(range(num))
    for i in range(num):
        rows = routing["image"] == i
        assert sorted(routing["call"][rows].tolist()) == list(range(steps))
        assert set(routing["label"][rows].tolist()) == {i % 10}  # --class-labels uniform: image i has class i mod 10
    np.testing.assert_allclose(stats["times"], [1.0, 0.75, 0.5, 0.25])  # Euler grid, model time = raw t
    # the aggregated counts against a plain loop over the raw decisions
    by_step = np.zeros((depth, steps, experts), int)
    by_class = np.zeros((depth, 10, experts), int)
    by_position = np.zeros((depth, tokens, experts), int)
    for r in range(len(routing["image"])):
        for layer in range(depth):
            for tok in range(tokens):
                for e in routing["experts"][r, layer, tok]:
                    by_step[layer, routing["call"][r], e] += 1
                    by_class[layer, routing["label"][r], e] += 1
                    by_position[layer, tok, e] += 1
    assert np.array_equal(stats["counts"]["timestep"], by_step)
    assert np.array_equal(stats["counts"]["class"], by_class)
    assert np.array_equal(stats["counts"]["position"], by_position)
    assert all((row[:, :] < experts).all() for row in routing["experts"])
    # the same folder again would sample nothing to record
    from ditk.generate import load_pipeline
    from ditk.moe_stats import expert_usage

    pipe = load_pipeline(run, overrides=[f"sample.num={num}"], device="cpu")
    with pytest.raises(ConfigError, match="pass a new --out"):
        with expert_usage(pipe, out):
            pass
