"""DyDiT (dynamic tokens, heads and MLP channels): open gates == a dense DiT, the sliced/gathered inference == a
dense masked float64 reference, analytic FLOPs == torch's FlopCounterMode (and DiT-XL/2's published 118.6 GFLOPs),
the FLOPs loss on hand-built gates, dense initialisation, both objectives, hook points, and the tiny preset
through the CLI."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ditk.errors import ConfigError
from ditk.models.dit import DiT, DiTBlock
from ditk.models.dydit import (DyDiT, DyDiTConfig, block_flops, build_dydit, dit_flops,
                               logistic_noise, straight_through_gate)
from ditk.models.layers import modulate
from ditk.train import auxiliary_loss
from ditk_testing import TINY, invoke_ditk


SMALL = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=3, num_heads=4, num_classes=10)


def randomise(module, seed, std=0.2, skip=()):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not any(s in name for s in skip):
                p.normal_(0, std)
    return module


def inputs(n=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g, dtype=dtype)
    t = torch.tensor([10.0, 500.0, 990.0, 250.0][:n], dtype=dtype)
    y = torch.tensor([1, 7, 10, 3][:n])
    return x, t, y


def routing_model(seed=1, **kw):
    """A float64 DyDiT with random weights whose routers keep some tokens / heads / channel groups and skip others."""
    model = randomise(DyDiT(**SMALL, gumbel_noise=False, **kw), seed).double()
    with torch.no_grad():
        for block in model.blocks:
            block.token_selection.mlp_head[2].bias.zero_()
            if block.attn_rate is not None:
                block.attn_rate.router.bias.zero_()
                block.mlp_rate.router.bias.zero_()
    return model


ROUTERS = [f"blocks.{i}.{name}.{w}" for i in range(3)
           for name in ("token_selection.mlp_head.0", "token_selection.mlp_head.2", "attn_rate.router", "mlp_rate.router")
           for w in ("weight", "bias")]


#################################################################################
#                      (1) every gate open == a dense DiT                       #
#################################################################################


def test_all_gates_open_equals_dense_dit_with_the_same_weights():
    dense = randomise(DiT(**SMALL), 0).double()
    model = DyDiT(**SMALL).double()  # official init: router biases 35 / 15 -> every token, head, channel is on
    result = model.load_state_dict(dense.state_dict(), strict=False)
    assert sorted(result.missing_keys) == sorted(ROUTERS + ["router_step"])
    assert not result.unexpected_keys
    assert isinstance(model, DiT) and all(isinstance(b, DiTBlock) for b in model.blocks)
    x, t, y = inputs(dtype=torch.float64)
    want = dense.eval()(x, t, y)
    assert torch.equal(model.eval()(x, t, y), want)  # eval: the all-kept path is DiT's own expression
    assert all(bool(b.token_mask.all() and b.head_mask.all() and b.group_mask.all()) for b in model.blocks)
    # training (Gumbel noise on): hard gates are exactly 1, hard - sg(soft) + soft == 1 in floating point too
    torch.testing.assert_close(model.train()(x, t, y), dense.train()(x, t, y), rtol=0, atol=1e-12)
    assert all(torch.equal(m, torch.ones_like(m)) for b in model.blocks for m in (b.token_mask, b.head_mask, b.group_mask))


def test_init_from_a_dense_run_or_weights_file(tmp_path):
    from safetensors.torch import save_file

    from ditk.models.convert import load_initial_weights
    from ditk.runs import RunDir, save_checkpoint

    dense = randomise(DiT(**SMALL), 3)
    x, t, y = inputs()
    want = dense.eval()(x, t, y)
    cfg = DyDiTConfig(**SMALL)
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(tmp_path / "dense.safetensors"))
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.config.write_text("model: {name: dit}\n")
    other = randomise(DiT(**SMALL), 4)
    save_checkpoint(run, 5, other.state_dict(), dense.state_dict(), {"step": 5})  # EMA weights are the ones used
    for source in (tmp_path / "dense.safetensors", run.path, run.path / "checkpoints" / "step-000005"):
        model = load_initial_weights(build_dydit(cfg), source).eval()
        assert torch.equal(model(x, t, y), want), source
        assert model.blocks[0].token_selection.mlp_head[2].bias.item() == 35.0
    with pytest.raises(ConfigError, match="does not exist"):
        load_initial_weights(build_dydit(cfg), tmp_path / "missing.pt")
    cfg.hidden_size = 64
    with pytest.raises(ConfigError, match="hidden_size=32"):
        load_initial_weights(build_dydit(cfg), tmp_path / "dense.safetensors")


def test_train_init_from_starts_a_fresh_run_from_a_dense_run(tmp_path):
    """`train.init_from`: with lr 0 the DyDiT run's weights stay exactly the dense run's EMA weights."""
    from ditk.runs import RunDir, load_weights

    common = [*TINY, "train.max_steps=1", "train.ckpt_every=1", f"run.dir={tmp_path}", "--no-progress"]
    invoke_ditk("train", "digits-dit", *common, "run.name=dense", check=True)
    invoke_ditk("train", "digits-dydit", *common, "run.name=dy", "optim.lr=0", f"train.init_from={tmp_path / 'dense'}",
                check=True)
    dense = load_weights(RunDir(tmp_path / "dense").latest_checkpoint(), "ema")
    dy = load_weights(RunDir(tmp_path / "dy").latest_checkpoint(), "model")
    assert all(torch.equal(dy[k], v) for k, v in dense.items())
    assert any(".token_selection." in k for k in dy)


#################################################################################
#             (2) gathered sparse inference == dense masked reference           #
#################################################################################


def masked_dense_reference(model, x, t, y):
    """DiT's forward written out, with every head and MLP channel computed for every token, then multiplied by the
    hard 0/1 masks: head outputs before proj, fc1 channel groups before GELU, MLP outputs per token."""
    h = model.x_embedder(x) + model.pos_embed
    t_emb = model.t_embedder(t)
    c = t_emb + model.y_embedder(y)
    n, tokens, d = h.shape
    masks = []
    for block in model.blocks:
        heads = block.attn.num_heads
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.adaLN_modulation(c).chunk(6, dim=1)
        on = lambda router: torch.cat([torch.ones(n, 1, dtype=h.dtype),  # noqa: E731
                                       (torch.sigmoid(router.router(t_emb)) > 0.5).to(h.dtype)], dim=1)
        head_mask, group_mask = on(block.attn_rate), on(block.mlp_rate)
        a = modulate(block.norm1(h), shift_msa, scale_msa)
        q, k, v = block.attn.qkv(a).reshape(n, tokens, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        o = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1) @ v  # (n, heads, T, hd)
        o = (o * head_mask[:, :, None, None]).transpose(1, 2).reshape(n, tokens, d)
        h = h + gate_msa.unsqueeze(1) * block.attn.proj(o)
        keep = (torch.sigmoid(block.token_selection.mlp_head(h).squeeze(-1)) > 0.5).to(h.dtype)
        m = block.mlp.fc1(modulate(block.norm2(h), shift_mlp, scale_mlp))
        m = m * group_mask.repeat_interleave(m.shape[-1] // heads, dim=1)[:, None, :]
        out = block.mlp.fc2(F.gelu(m, approximate="tanh"))
        h = h + keep.unsqueeze(-1) * gate_mlp.unsqueeze(1) * out
        masks.append((keep, head_mask, group_mask))
    return model.unpatchify(model.final_layer(h, c)), masks


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_sliced_gathered_inference_equals_masked_dense_reference(dtype, tol):
    model = routing_model().to(dtype).eval()
    x, t, y = inputs(4, dtype=dtype)
    seen = []
    handles = [b.attn.q_hook.register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape))) for b in model.blocks]
    out = model(x, t, y)
    for handle in handles:
        handle.remove()
    want, masks = masked_dense_reference(model, x, t, y)
    torch.testing.assert_close(out, want, rtol=tol, atol=tol)
    kept = [int(m[0].sum()) for m in masks]
    assert any(0 < k < 4 * 16 for k in kept), kept  # the routing really is partial ...
    assert any(0 < int(m[1].sum()) < 4 * 4 for m in masks) and any(0 < int(m[2].sum()) < 4 * 4 for m in masks)
    assert any(len(torch.unique(m[1], dim=0)) > 1 for m in masks)  # ... and rows differ in their active heads
    for block, (keep, head_mask, group_mask) in zip(model.blocks, masks):
        assert torch.equal(block.token_mask, keep.bool()) and torch.equal(block.head_mask, head_mask.bool())
        assert torch.equal(block.group_mask, group_mask.bool())
    # the work really is skipped: q exists for the active heads of each group of rows only, and the usage the
    # FLOPs count reads (test below: == FlopCounterMode) is that of the masks
    assert sum(s[0] * s[1] for s in seen) == sum(int(m[1].sum()) for m in masks)
    for usage, (keep, head_mask, group_mask) in zip(model.last_usage, masks):
        assert [int(v) for v in usage] == [int(head_mask.sum()), int(keep.sum()),
                                           int((keep.sum(1) * group_mask.sum(1)).sum())]
    # a block that keeps nothing leaves its stream unchanged after the attention update
    block = model.blocks[0]
    with torch.no_grad():
        block.token_selection.mlp_head[2].bias.fill_(-1e4)
    h, c = torch.randn(2, 16, 32, dtype=dtype), torch.randn(2, 32, dtype=dtype)
    block.timestep_embedding = torch.randn(2, 32, dtype=dtype)
    attn_only = block(h, c)
    with torch.no_grad():
        block.token_selection.mlp_head[2].bias.fill_(1e4)
    assert not torch.allclose(block(h, c), attn_only)
    shift, scale, gate = block.adaLN_modulation(c).chunk(6, dim=1)[:3]
    torch.testing.assert_close(attn_only, h + gate.unsqueeze(1) * block.attn(modulate(block.norm1(h), shift, scale),
                                                                             block.head_mask))


def test_a_wrapped_mlp_runs_on_every_token_with_the_same_result():
    """A feature cache that caches `blocks.i.mlp` replaces its forward: the block then sends every token through the
    wrapper (stable shapes for the cache) and masks afterwards, with the same output; the FLOPs count follows."""
    model = routing_model().eval()
    x, t, y = inputs(4, dtype=torch.float64)
    want = model(x, t, y)
    shapes = []
    for block in model.blocks:
        original = block.mlp.forward
        block.mlp.forward = lambda *a, f=original: shapes.append(tuple(a[0].shape)) or f(*a)
    torch.testing.assert_close(model(x, t, y), want, rtol=1e-12, atol=1e-12)
    assert shapes and all(s == (4, 16, 32) for s in shapes)
    total = counted(model.float(), x.float(), t.float(), y)
    assert model.flops(4, model.last_usage) == total


#################################################################################
#                    (3) analytic FLOPs == FlopCounterMode                      #
#################################################################################


def counted(model, *args):
    """FlopCounterMode's count; SDPA's math backend so the counter sees the two attention matmuls (its CPU
    fused kernel has no FLOP formula registered)."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(*args)
    return counter.get_total_flops()


def test_reported_flops_equal_flop_counter_mode():
    x, t, y = inputs(3)
    for dynamic_width in (True, False):
        model = routing_model(dynamic_width=dynamic_width).float().eval()
        total = counted(model, x, t, y)
        assert any(0 < int(b.token_mask.sum()) < 3 * 16 for b in model.blocks)
        if dynamic_width:
            assert any(0 < int(b.head_mask.sum()) < 3 * 4 for b in model.blocks)
        assert model.flops(3, model.last_usage) == total  # exact: both count 2 x multiply-adds of matmuls / convs
    first = model.last_usage
    dense = DiT(**SMALL).eval()
    assert counted(dense, x, t, y) == model.dense_flops(3) == dit_flops(3, 16, 32, 128, 3, 2, 1, 2)
    # a block skipped by a feature cache (it does not run) costs nothing
    model.blocks[1].forward = lambda h, c: h
    total = counted(model, x, t, y)
    assert model.last_usage[1] is None and model.flops(3, model.last_usage) == total
    report = model.sampling_report()  # both forwards (the time did not go up: one run of two calls)
    assert report["model_calls"] == 2 and report["flops_total"] == model.flops(3, first) + total
    assert report["heads_active_fraction_per_block"] == [1.0, 1.0, 1.0]  # without dynamic width


def test_dense_dit_xl_2_flops_match_the_papers():
    """DiT-XL/2 at 256x256 (32x32x4 latents): 118.6 GFLOPs in the DiT paper (multiply-adds); 118.69 G in DyDiT's
    README (which also counts some elementwise work)."""
    macs = dit_flops(1, 256, 1152, 4608, 28, 2, 4, 8) / 2
    assert abs(macs / 118.6e9 - 1) < 1e-3 and abs(macs / 118.69e9 - 1) < 1.5e-3
    costs = block_flops(256, 1152, 4608)  # the per-block constants of the official loss.py (in G multiply-adds)
    assert costs["attn"] / 2 == 1.50994944e9 and costs["mlp"] / 2 == 2.717908992e9
    assert block_flops(256, 384, 1536)["attn"] / 2 == 0.201326592e9  # DiT-S/2


#################################################################################
#                      (4) the FLOPs loss and its gradient                      #
#################################################################################


def test_flops_loss_equals_its_formula_on_hand_built_gates():
    model = routing_model(token_budget=0.4, flops_loss_weight=2.0, budget_hold=0, budget_warmup=0).train()
    # hand-built logits: forward hooks on the routers add +-20 to their (scaled-down) outputs
    tokens = torch.full((3, 2, 16), -20.0, dtype=torch.float64)
    tokens[0, 0, :4] = tokens[0, 1, :12] = tokens[1, 0, :] = 20.0  # block 1 sample 1 and block 2 keep nothing ...
    tokens[2, 1, 5] = 20.0  # ... but one token
    heads = torch.tensor([[[20, 20, 20], [-20, 20, -20]], [[-20, -20, -20], [20, 20, 20]],
                          [[20, -20, 20], [20, 20, 20]]], dtype=torch.float64)  # heads 1..3 (head 0 is always on)
    groups = -heads.flip(-1)
    handles = []
    for i, b in enumerate(model.blocks):
        for module, pattern in ((b.token_selection, tokens[i]), (b.attn_rate, heads[i]), (b.mlp_rate, groups[i])):
            handles.append(module.register_forward_hook(lambda m, a, out, p=pattern: out * 1e-3 + p))
    x, t, y = inputs(2, dtype=torch.float64)
    model(x, t, y)
    for i, b in enumerate(model.blocks):
        assert torch.equal(b.token_mask, (tokens[i] > 0).double())
        assert torch.equal(b.head_mask[:, 1:], (heads[i] > 0).double()) and bool((b.head_mask[:, 0] == 1).all())
    kept = (tokens > 0).double().mean(-1)  # (block, sample)
    head_frac = (1 + (heads > 0).double().sum(-1)) / 4
    group_frac = (1 + (groups > 0).double().sum(-1)) / 4
    c = block_flops(16, 32, 128)
    a, m = float(c["attn"]), float(c["mlp"])
    r = (a * head_frac + m * group_frac * kept).sum(0) / (3 * (a + m))  # per sample
    want = 2.0 * (r.mean() - 0.4) ** 2
    assert model.aux_loss.item() == pytest.approx(want.item(), rel=1e-12)
    assert auxiliary_loss(model).item() == model.aux_loss.item()
    assert model.last_block_fraction.item() == pytest.approx(r.mean().item(), rel=1e-12)
    model.aux_loss.backward()
    for b in model.blocks:  # the straight-through gradient reaches every router; r is above the budget: push down
        assert b.token_selection.mlp_head[0].weight.grad.abs().sum() > 0
        assert b.token_selection.mlp_head[2].bias.grad.item() > 0
        assert (b.attn_rate.router.bias.grad > 0).all() and (b.mlp_rate.router.bias.grad > 0).all()
    for handle in handles:
        handle.remove()
    assert int(model.router_step) == 1
    model.eval()(x, t, y)
    assert model.aux_loss is None and auxiliary_loss(model) is None and int(model.router_step) == 1


def test_budget_schedule_gate_and_noise_follow_the_official_code():
    model = DyDiT(**SMALL, token_budget=0.5, budget_warmup=1000, budget_hold=100)
    assert [model.budget_target(s) for s in (0, 99, 100, 500, 1000, 5000)] == [1.0, 1.0, 0.95, 0.75, 0.5, 0.5]
    # straight-through: forward value hard, gradient d sigmoid(z / tau)
    z = torch.tensor([-3.0, -0.1, 0.2, 4.0], requires_grad=True)
    gate = straight_through_gate(z, tau=5.0)
    assert gate.tolist() == [0.0, 0.0, 1.0, 1.0]
    gate.sum().backward()
    s = torch.sigmoid(z.detach() / 5)
    torch.testing.assert_close(z.grad, s * (1 - s) / 5)
    # g1 - g2 of two Gumbels is standard logistic: P(open) = sigmoid(logit); mean 0, variance pi^2 / 3
    noise = logistic_noise((200_000,), torch.Generator().manual_seed(0))
    assert abs(noise.mean()) < 0.02 and abs(noise.var() / (math.pi**2 / 3) - 1) < 0.02
    assert abs((noise > -1.0).double().mean() - torch.sigmoid(torch.tensor(1.0))) < 5e-3
    # the noise is a function of the training-pass counter: reproducible, and it changes every pass
    model = DyDiT(**SMALL, router_bias_init=0.0).train()
    x, t, y = inputs()
    gates = []
    for step in (0, 0, 1):
        model.router_step.fill_(step)
        model(x, t, y)
        gates.append(model.blocks[0].token_mask.detach())
    assert torch.equal(gates[0], gates[1]) and not torch.equal(gates[0], gates[2])
    with pytest.raises(ConfigError, match="token_budget"):
        DyDiT(**SMALL, token_budget=1.5)
    with pytest.raises(ConfigError, match="dynamic_width"):
        DyDiT(**{**SMALL, "num_heads": 1})


#################################################################################
#                       Objectives, hook points, CLI                            #
#################################################################################


@pytest.mark.parametrize("objective", ["ddpm", "rectified-flow"])
def test_trains_and_samples_with_both_objectives_and_hook_points(objective):
    from ditk.hooks import attach, hook_points
    from ditk.registry import OBJECTIVES
    from ditk.sampling import sample

    torch.manual_seed(0)
    model = build_dydit(DyDiTConfig(**SMALL, router_bias_init=1.0, budget_hold=0, budget_warmup=0))
    obj = OBJECTIVES.build(objective, OBJECTIVES.get(objective).config())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    x0, y = torch.randn(4, 1, 8, 8, generator=gen), torch.tensor([0, 1, 2, 3])
    for _ in range(2):
        t = obj.sample_time(4, gen)
        loss = obj.training_losses(model, x0, t, torch.randn(4, 1, 8, 8, generator=gen), {"y": y})["loss"].mean()
        (loss + auxiliary_loss(model)).backward()
        assert model.blocks[0].token_selection.mlp_head[2].bias.grad.abs() > 0
        opt.step()
        opt.zero_grad()
    model.eval()
    assert {"blocks.0.attn.q_hook", "blocks.2.attn.out_hook"} <= set(hook_points(model))
    seen = []
    solver = "ddpm" if objective == "ddpm" else "euler"
    with attach(model, {"blocks.*.attn.v_hook": lambda m, a, out: seen.append(out.shape)}):
        out = sample(model, obj, torch.randn(2, 1, 8, 8, generator=gen), {"y": y[:2]}, {"y": torch.tensor([10, 10])},
                     solver=solver, steps=3, cfg_scale=2.0, generator=gen)
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
    assert seen and all(s == (4, 4, 16, 8) for s in seen)  # every token and head: (N, heads, T, hd)
    report = model.sampling_report()
    assert report["model_calls"] == 3 and len(report["flops_per_step"]) == 3


def test_tiny_preset_trains_toward_its_budget_and_sample_reports_flops(tmp_path):
    from safetensors.torch import load_file

    budget = ["model.token_budget=0.3", "model.budget_hold=0", "model.budget_warmup=0", "model.router_bias_init=1.0",
              "model.flops_loss_weight=20.0", "optim.warmup_steps=0", "optim.lr=3e-3", "train.max_steps=12"]
    run = invoke_ditk("train", "digits-dydit", *TINY, *budget, f"run.dir={tmp_path}", "--no-progress",
                      check=True).stdout.strip()

    cfg = DyDiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                      num_classes=10, token_budget=0.3)  # TINY's sizes
    x, t, y = inputs(4)

    def block_fraction(step):
        model = build_dydit(cfg).eval()
        model.load_state_dict(load_file(f"{run}/checkpoints/step-{step:06d}/model.safetensors"))
        with torch.no_grad():
            model(x, t, y)
        return model.block_flops_fraction().mean().item()

    first, last = block_fraction(3), block_fraction(12)
    assert last < first - 0.05 and last >= 0.3 - 0.15, (first, last)  # moved toward the 0.3 budget

    out = tmp_path / "gen"
    invoke_ditk("sample", run, "--num", 3, "--batch-size", 2, "--steps", 4, "--cfg-scale", 2, "--weights", "model",
                "--out", out, "--no-progress", check=True)
    report = json.loads((out / "report.json").read_text())["model"]
    # 2 batches (2 + 1 images) x 4 steps, guided: rows of 4 and 2 per call
    assert report["model_calls"] == 8 and len(report["flops_per_step"]) == 4
    dense_row = report["dense_flops_per_row"]
    assert dense_row == dit_flops(1, 16, 32, 128, 2, 2, 1, 2)
    assert report["dense_flops_total"] == dense_row * (4 + 2) * 4
    assert 0 < report["flops_fraction"] < 1 and report["flops_total"] < report["dense_flops_total"]
    assert report["flops_fraction"] == pytest.approx(report["flops_total"] / report["dense_flops_total"], abs=1e-6)
    per_step_total = sum(f * 6 for f in report["flops_per_step"])  # every step ran 6 rows
    assert per_step_total == pytest.approx(report["flops_total"], rel=1e-6)
    assert report["token_budget"] == 0.3 and len(report["tokens_kept_fraction_per_block"]) == 2
    assert len(report["heads_active_fraction_per_block"]) == 2


def test_paper_presets():
    from ditk.build import build_model
    from ditk.config import resolve

    for name, budget, steps in (("dydit-xl-2", 0.5, 200_000), ("dydit-xl-2-0.7", 0.7, 150_000)):
        cfg = resolve(name, allow_missing=("data", "autoencoder"))
        m = cfg.model
        assert (m.depth, m.hidden_size, m.num_heads, m.patch_size, m.input_size) == (28, 1152, 16, 2, 32)
        assert (m.token_budget, m.flops_loss_weight, m.router_bias_init, m.width_router_bias_init) == (budget, 2.0, 35.0, 15.0)
        assert m.dynamic_width and m.gate_tau == 5.0 and cfg.train.max_steps == steps and cfg.optim.lr == 1e-4
    with torch.device("meta"):
        model = build_model(cfg)
    dit_params = 675_129_632  # DiT-XL/2 (ditk's DiT test: the paper's 675M)
    d, r, h = 1152, 1152 // 16, 16
    routers = 28 * ((d * r + r) + (r + 1) + 2 * (d * (h - 1) + h - 1))
    assert sum(p.numel() for p in model.parameters()) == dit_params + routers


def test_resumed_run_continues_the_budget_schedule_and_noise_exactly(tmp_path):
    """The training-pass counter (budget schedule, Gumbel-noise seed) is saved with the weights: an interrupted
    and resumed run logs the same losses as an uninterrupted one."""
    args = [*TINY, "model.budget_hold=1", "model.budget_warmup=4", "model.router_bias_init=0.5", "--no-progress"]
    invoke_ditk("train", "digits-dydit", *args, "train.max_steps=6", f"run.dir={tmp_path}", "run.name=full", check=True)
    invoke_ditk("train", "digits-dydit", *args, "train.max_steps=3", f"run.dir={tmp_path}", "run.name=cut", check=True)
    invoke_ditk("train", "digits-dydit", *args, "train.max_steps=6", f"run.dir={tmp_path}", "run.name=cut", check=True)
    losses = [[json.loads(line)["loss"] for line in open(tmp_path / run / "metrics.jsonl")] for run in ("full", "cut")]
    assert len(losses[0]) == 6 and losses[0] == losses[1]
    from safetensors.torch import load_file

    assert int(load_file(str(tmp_path / "cut/checkpoints/step-000006/model.safetensors"))["router_step"]) == 6
