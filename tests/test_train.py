"""The training loop: run-dir layout, exact resume, pre-emption, atomic checkpoints, DDP equivalence."""

import json
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from ditk_testing import TINY, run_ditk, torchrun
from ditk.config import resolve
from ditk.errors import EXIT_PREEMPTED, ConfigError
from ditk.runs import RunDir, load_state
from ditk.train import prepare_run_dir, train


def _train(tmp_path, name, steps, extra=()):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # a fresh process would start with none
    cfg = resolve("digits-dit", [*TINY, f"train.max_steps={steps}", f"run.name={name}", *extra])
    path = tmp_path / name
    cfg = prepare_run_dir(cfg, path, None)
    assert train(cfg, path, progress=False) == 0
    return path


def _losses(run_path):
    return [json.loads(l)["loss"] for l in (run_path / "metrics.jsonl").read_text().splitlines()]


def test_run_directory_layout(tmp_path):
    run = _train(tmp_path, "layout", 6)
    assert (run / "config.yaml").is_file() and (run / "lineage.json").is_file()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000006"
    for step in ("step-000003", "step-000006"):
        files = {p.name for p in (run / "checkpoints" / step).iterdir()}
        assert files == {"model.safetensors", "ema.safetensors", "state.pt", "manifest.json", "run-config.yaml"}
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert {"step", "loss", "lr", "grad_norm", "images_per_sec"} <= set(records[0])
    assert (run / "samples" / "step-000006.png").is_file()
    # state.pt holds no pickled code: it loads with weights_only=True
    state = torch.load(run / "checkpoints" / "step-000006" / "state.pt", weights_only=True)
    assert state["step"] == 6
    # EMA differs from the raw weights (it was updated with decay < 1 but is not a copy)
    model = load_file(run / "checkpoints" / "step-000006" / "model.safetensors")
    ema = load_file(run / "checkpoints" / "step-000006" / "ema.safetensors")
    assert model.keys() == ema.keys()
    assert any(not torch.equal(model[k], ema[k]) for k in model)


def test_resume_reproduces_an_uninterrupted_run_exactly(tmp_path):
    full = _train(tmp_path, "full", 6)
    part = _train(tmp_path, "part", 3)  # stops at step 3 ...
    part = _train(tmp_path, "part", 6)  # ... and is resumed to step 6 (max_steps may grow on resume)
    assert _losses(part) == _losses(full)
    a = load_file(full / "checkpoints" / "step-000006" / "model.safetensors")
    b = load_file(part / "checkpoints" / "step-000006" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_changed_config(tmp_path):
    _train(tmp_path, "changed", 3)
    cfg = resolve("digits-dit", [*TINY, "train.max_steps=6", "run.name=changed", "model.depth=3"])
    with pytest.raises(ConfigError, match=r"created with model.depth=2"):
        prepare_run_dir(cfg, tmp_path / "changed", None)
    with pytest.raises(ConfigError, match="already exists"):
        prepare_run_dir(cfg, tmp_path / "changed", False)


def test_config_yaml_alone_recreates_the_run(tmp_path):
    run = _train(tmp_path, "orig", 3)
    again = resolve(str(run / "config.yaml"), ["run.name=copy"])
    path = prepare_run_dir(again, tmp_path / "copy", None) and tmp_path / "copy"
    assert train(again, path, progress=False) == 0
    assert _losses(path) == _losses(run)


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    from ditk import runs

    run = _train(tmp_path, "atomic", 3)

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(runs.torch, "save", broken_save)
    with pytest.raises(OSError):
        runs.save_checkpoint(RunDir(run), 4, {"w": torch.ones(1)}, {"w": torch.ones(1)}, {"step": 4})
    assert RunDir(run).latest_checkpoint().name == "step-000003"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-000003"]


def test_sigterm_saves_a_checkpoint_and_the_resumed_run_matches(tmp_path):
    args = ["train", "digits-dit", *TINY, "train.ckpt_every=1000", f"run.dir={tmp_path}", "--no-progress"]
    proc = subprocess.Popen(["ditk", *args, "train.max_steps=100000"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "digits-dit" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.is_file() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err
    assert "pre-empted" in err and "Traceback" not in err
    ckpt = RunDir(tmp_path / "digits-dit").latest_checkpoint()
    stopped = load_state(ckpt)["step"]
    assert stopped >= 3
    # Resume to stopped+3 and compare with an uninterrupted run of the same length.
    run_ditk(*args, f"train.max_steps={stopped + 3}", check=True)
    reference = _train(tmp_path / "ref", "digits-dit", stopped + 3, ["train.ckpt_every=1000"])
    assert _losses(tmp_path / "digits-dit") == _losses(reference)


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    """DDP over 2 CPU processes (gloo) computes the same updates as 1 process."""
    common = [*TINY, "train.max_steps=3", "train.sample_every=0", "--no-progress"]
    run_ditk("train", "digits-dit", *common, f"run.dir={tmp_path / 'one'}", check=True)
    stderr = torchrun("-m", "ditk", "train", "digits-dit", *common, f"run.dir={tmp_path / 'two'}", timeout=300)
    assert "2 process(es)" in stderr
    a = load_file(tmp_path / "one" / "digits-dit" / "checkpoints" / "step-000003" / "model.safetensors")
    b = load_file(tmp_path / "two" / "digits-dit" / "checkpoints" / "step-000003" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    la, lb = _losses(tmp_path / "one" / "digits-dit"), _losses(tmp_path / "two" / "digits-dit")
    assert la == pytest.approx(lb, rel=1e-4)


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    a = _train(tmp_path, "acc1", 3)
    b = _train(tmp_path, "acc2", 3, ["train.grad_accum_steps=2"])
    assert _losses(a) == pytest.approx(_losses(b), rel=1e-5)
    wa = load_file(a / "checkpoints" / "step-000003" / "model.safetensors")
    wb = load_file(b / "checkpoints" / "step-000003" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)


def test_rectified_flow_objective_trains_through_the_same_loop(tmp_path):
    run = _train(tmp_path, "flow", 3, ["objective.name=rectified-flow", "model.learn_sigma=false",
                                       "sample.solver=euler"])
    assert len(_losses(run)) == 3 and all(l == l for l in _losses(run))


def test_ema_update_is_the_dit_formula():
    from ditk.train import update_ema

    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in ema.parameters()]
    update_ema(ema, model, 0.9)
    for b, p, e in zip(before, model.parameters(), ema.parameters()):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * p.detach())


def test_label_dropout_uses_the_null_condition():
    from ditk.train import mix_conditions

    cond, uncond = {"y": torch.tensor([1, 2, 3])}, {"y": torch.tensor([10, 10, 10])}
    assert mix_conditions(cond, uncond, torch.tensor([False, True, False]))["y"].tolist() == [1, 10, 3]


def test_bf16_mixed_precision_path_runs(tmp_path):
    run = _train(tmp_path, "bf16", 2, ["train.mixed_precision=bf16"])
    assert all(l == l and l < 10 for l in _losses(run))
