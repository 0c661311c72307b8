"""Training speed levers (ditk.speed): each changes the kernels, never the step."""

import copy
import json

import pytest
import torch

from ditk_testing import TINY
from ditk.config import resolve
from ditk.errors import ConfigError
from ditk.speed import apply_model_levers, build_optimizer, optimizer_flags, restore_optimizer_flags, update_ema


def _tiny_dit(extra=()):
    from ditk.build import build_model

    cfg = resolve("digits-dit", [*TINY, *extra])
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # adaLN-Zero starts at the identity: random weights so that every block matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return cfg, model


def test_foreach_ema_is_bit_identical_to_the_per_parameter_loop():
    _, model = _tiny_dit()
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(torch.randn_like(p))
    loop = copy.deepcopy(ema)
    for decay in (0.9999, 0.9, 0.5):
        update_ema(ema, model, decay)
        with torch.no_grad():
            for p_ema, p in zip(loop.parameters(), model.parameters()):  # the former per-parameter loop
                p_ema.lerp_(p.detach().to(p_ema.dtype), 1.0 - decay)
        for a, b in zip(ema.parameters(), loop.parameters()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("impl", ["foreach", "loop", "fused", "auto"])
def test_optimizer_impl_selects_the_kernels_and_keeps_the_update(impl):
    cfg, model = _tiny_dit()
    ref = copy.deepcopy(model)
    opt = build_optimizer(list(model.parameters()), resolve("digits-dit", [f"optim.impl={impl}"]).optim,
                          torch.device("cpu"))
    flags = optimizer_flags(impl, torch.device("cpu"))
    if impl == "auto":  # fused where this torch has it, else the CPU default (foreach measured slower)
        assert flags == {"foreach": False, "fused": "fused" in __import__("inspect").signature(torch.optim.AdamW).parameters}
    else:
        assert flags == {"foreach": impl == "foreach", "fused": impl == "fused"}
    assert {k: opt.param_groups[0][k] for k in flags} == flags
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                weight_decay=cfg.optim.weight_decay, eps=cfg.optim.eps)  # torch's CPU default
    for _ in range(3):  # the same gradients for both (Adam would amplify round-off in near-zero gradients)
        torch.manual_seed(1)
        ref(torch.randn(4, 1, 8, 8), torch.rand(4) * 999, torch.tensor([0, 1, 2, 3])).square().mean().backward()
        for p, q in zip(model.parameters(), ref.parameters()):
            p.grad = None if q.grad is None else q.grad.clone()
        for o in (opt, ref_opt):
            o.step()
            o.zero_grad()
    for a, b in zip(model.parameters(), ref.parameters()):  # loop/foreach: the same maths; fused: ~1 ulp apart
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # a checkpoint saved with other flags (or before optim.impl existed) resumes with the configured ones
    saved = ref_opt.state_dict()
    opt.load_state_dict(saved)
    restore_optimizer_flags(opt, flags)
    assert {k: opt.param_groups[0][k] for k in flags} == flags
    for p in model.parameters():  # and it steps from the loaded state
        p.grad = torch.ones_like(p) if p.requires_grad else None
    opt.step()
    assert all(s["step"].item() == 4 for s in opt.state.values())


def test_bad_lever_values_are_one_line_errors():
    with pytest.raises(ConfigError, match="optim.impl"):
        optimizer_flags("fast", torch.device("cpu"))
    cfg, model = _tiny_dit(["train.compile=everything"])
    with pytest.raises(ConfigError, match="train.compile"):
        apply_model_levers(model, cfg.train)
    cfg, model = _tiny_dit(["train.compile=false"])  # a boolean reads as none (true: full)
    assert apply_model_levers(model, cfg.train) == []


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    cfg, model = _tiny_dit(["train.activation_checkpointing=true"])
    ckpt = copy.deepcopy(model)
    assert apply_model_levers(ckpt, cfg.train) == ["activation checkpointing per block"]
    assert type(ckpt.blocks[0]).__name__.startswith("Checkpointed")
    assert ckpt.state_dict().keys() == model.state_dict().keys()  # checkpoints and EMA see the same names
    assert type(copy.deepcopy(ckpt).blocks[1]) is type(ckpt.blocks[1])
    torch.manual_seed(2)
    x, t, y = torch.randn(6, 1, 8, 8), torch.rand(6) * 999, torch.tensor([0, 1, 2, 3, 4, 10])
    losses = []
    for m in (model, ckpt):
        loss = m(x, t, y).square().mean()
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=0)
    for (name, a), b in zip(model.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-9, msg=name)
    # the recomputation really happens: checkpointing saves the blocks' activations
    counts = []
    for m in (model, ckpt):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            m(x, t, y).square().mean()
        counts.append(sum(saved))
    assert counts[1] < counts[0]


def test_metrics_report_the_time_spent_waiting_for_data(tmp_path, capfd):
    from accelerate.state import AcceleratorState

    from ditk.train import prepare_run_dir, train

    AcceleratorState._reset_state(reset_partial_state=True)
    cfg = resolve("digits-dit", [*TINY, "train.max_steps=3", "run.name=wait", "train.num_workers=0",
                                 "train.activation_checkpointing=true", "optim.impl=foreach"])
    path = tmp_path / "wait"
    cfg = prepare_run_dir(cfg, path, None)
    assert train(cfg, path, progress=False) == 0
    assert "[ditk] activation checkpointing per block" in capfd.readouterr().err  # the loop applies the lever
    records = [json.loads(l) for l in (path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3
    for r in records:  # one step per window: the wait is positive and below the window's whole time
        assert 0.0 < r["data_wait_s"] < cfg.train.global_batch_size / r["images_per_sec"]


def test_runtime_threads_sets_torch_threads_only_when_given():
    from ditk.speed import set_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        set_threads(resolve("digits-dit"))  # runtime.threads=0: torch's default stays
        assert torch.get_num_threads() == 2
        set_threads(resolve("digits-dit", ["runtime.threads=1"]))
        assert torch.get_num_threads() == 1
        with pytest.raises(ConfigError, match="runtime.threads"):
            set_threads(resolve("digits-dit", ["runtime.threads=-1"]))
    finally:
        torch.set_num_threads(before)


# -- precision levers: bf16 autocast (train.mixed_precision) and runtime.matmul_precision ---------------------------

bf16_units = pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                                reason="this CPU has no bf16 support in oneDNN (AVX512-BF16 / AMX)")


def _train_recording_linears(tmp_path, name, extra):
    """Three steps of the training loop; returns (losses, set of (output dtype, autocast on) seen at every
    nn.Linear during them, torch's fp32 matmul precision afterwards)."""
    from accelerate.state import AcceleratorState

    from ditk.train import prepare_run_dir, train

    AcceleratorState._reset_state(reset_partial_state=True)
    cfg = resolve("digits-dit", [*TINY, "train.max_steps=3", f"run.name={name}", "train.num_workers=0", *extra])
    path = tmp_path / name
    cfg = prepare_run_dir(cfg, path, None)
    seen = set()

    def record(module, args, out):
        if isinstance(module, torch.nn.Linear) and torch.is_grad_enabled():  # training forwards, not the sample grid
            seen.add((out.dtype, torch.is_autocast_enabled("cpu")))

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        assert train(cfg, path, progress=False) == 0
    finally:
        handle.remove()
        precision = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
    from ditk.runs import load_weights

    losses = [json.loads(l)["loss"] for l in (path / "metrics.jsonl").read_text().splitlines()]
    return losses, seen, precision, load_weights(path / "checkpoints" / "step-000003", "model")


def test_bf16_autocast_takes_effect_on_cpu_and_fp32_stays_fp32(tmp_path):
    from ditk.build import build_model

    fp32, seen32, precision, w32 = _train_recording_linears(tmp_path, "fp32", [])
    # off (the default): every linear layer computed in fp32, no autocast, fp32 matmuls at torch's default
    # precision, i.e. the same kernels as before these levers existed
    assert seen32 == {(torch.float32, False)} and precision == "highest"
    bf16, seen16, _, w16 = _train_recording_linears(tmp_path, "bf16", ["train.mixed_precision=bf16"])
    assert seen16 == {(torch.bfloat16, True)}  # accelerate autocasts the model's forward on CPU too
    # The same run to bf16 accuracy. The first losses barely see the model (adaLN-Zero starts at the identity and
    # Adam's first steps are ~lr * sign(gradient)), so the weights' updates tell bf16 from fp32 apart.
    torch.testing.assert_close(torch.tensor(bf16), torch.tensor(fp32), rtol=2e-2, atol=0)
    cfg = resolve("digits-dit", TINY)
    torch.manual_seed(cfg.run.seed)  # the loop's initial weights
    w0 = build_model(cfg).state_dict()
    d32 = torch.cat([(w32[k] - w0[k]).flatten() for k in w0 if w0[k].is_floating_point()])
    d16 = torch.cat([(w16[k] - w0[k]).flatten() for k in w0 if w0[k].is_floating_point()])
    rel = ((d16 - d32).norm() / d32.norm()).item()
    assert 0 < rel < 0.05  # measured 0.004


def test_matmul_precision_is_applied_and_logged_by_the_training_loop(tmp_path, capfd):
    _, _, precision, _ = _train_recording_linears(tmp_path, "medium", ["runtime.matmul_precision=medium"])
    assert precision == "medium"  # (the helper restores torch's default afterwards)
    assert "[ditk] fp32 matmul precision: medium" in capfd.readouterr().err


@bf16_units
def test_matmul_precision_medium_uses_bf16_inside_fp32_matmuls():
    from ditk.speed import set_matmul_precision

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 256, generator=g), torch.randn(128, 256, generator=g)
    exact = (x.double() @ w.double().T)
    try:
        assert set_matmul_precision(resolve("digits-dit")) == "highest"  # the default: torch's
        highest = torch.nn.functional.linear(x, w)
        assert set_matmul_precision(resolve("digits-dit", ["runtime.matmul_precision=medium"])) == "medium"
        medium = torch.nn.functional.linear(x, w)
        assert medium.dtype == torch.float32  # fp32 in and out; bf16 products inside
        err = lambda y: ((y.double() - exact).norm() / exact.norm()).item()
        assert err(highest) < 1e-6 and 1e-4 < err(medium) < 1e-2  # bf16 rounding of the inputs: ~2^-9
        with pytest.raises(ConfigError, match="runtime.matmul_precision"):
            set_matmul_precision(resolve("digits-dit", ["runtime.matmul_precision=low"]))
    finally:
        torch.set_float32_matmul_precision("highest")


def test_mixed_precision_no_on_the_command_line_reads_as_no():
    # key=value overrides are YAML: a bare `no` is false, which accelerate would refuse with a traceback
    assert resolve("digits-dit", ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert resolve("digits-dit", ["train.mixed_precision=bf16"]).train.mixed_precision == "bf16"
    with pytest.raises(ConfigError, match="train.mixed_precision"):
        resolve("digits-dit", ["train.mixed_precision=fp8"])
