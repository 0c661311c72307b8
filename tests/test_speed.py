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
