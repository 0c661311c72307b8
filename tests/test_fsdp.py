"""train.distributed=fsdp (ditk.fsdp): two CPU processes (gloo) against DDP, exact resume from sharded
checkpoints, single-file weights that `ditk sample` reads, one-line configuration errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ditk_testing import TINY, invoke_ditk, torchrun
from ditk.config import resolve
from ditk.errors import ConfigError
from ditk.runs import verify_checkpoint

FSDP = "train.distributed=fsdp,train.ckpt_every=2"


def _losses(run: Path) -> list:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run: Path, which: str, step: int = 4) -> dict:
    return load_file(run / "checkpoints" / f"step-{step:06d}" / f"{which}.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One torchrun launch of 2 processes: DDP, FSDP (full and hybrid sharding) for 4 steps, and an FSDP run
    stopped at its step-2 checkpoint then resumed to step 4."""
    root = tmp_path_factory.mktemp("fsdp")
    specs = ["ddp:4:train.ckpt_every=2", f"fsdp:4:{FSDP}", f"part:2:{FSDP}", f"part:4:{FSDP}",
             f"hybrid:4:{FSDP},train.fsdp_sharding=hybrid,train.fsdp_shard_size=1"]
    stderr = torchrun(Path(__file__).parent / "distributed_runs.py", root, *specs)
    assert "FSDP (full sharding)" in stderr and "FSDP (hybrid sharding)" in stderr
    return root


@pytest.mark.slow
def test_fsdp_computes_the_ddp_updates(runs):
    assert _losses(runs / "fsdp") == pytest.approx(_losses(runs / "ddp"), rel=1e-5)
    assert _losses(runs / "hybrid") == pytest.approx(_losses(runs / "ddp"), rel=1e-5)
    for which in ("model", "ema"):
        ddp = _weights(runs / "ddp", which)
        for name in ("fsdp", "hybrid"):
            sharded = _weights(runs / name, which)
            assert sharded.keys() == ddp.keys()
            for k in ddp:
                torch.testing.assert_close(sharded[k], ddp[k], rtol=1e-4, atol=1e-6)
    # 4 steps moved the weights (the comparison is not between two copies of the initial weights)
    first = load_file(runs / "ddp" / "checkpoints" / "step-000002" / "model.safetensors")
    assert any(not torch.allclose(first[k], ddp[k]) for k in first)


@pytest.mark.slow
def test_resumed_fsdp_run_equals_the_uninterrupted_one(runs):
    assert _losses(runs / "part") == _losses(runs / "fsdp")
    for which in ("model", "ema"):  # bitwise: model, EMA and Adam moments came back from the shards exactly
        a, b = _weights(runs / "part", which), _weights(runs / "fsdp", which)
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sharded_checkpoint_layout_and_manifest(runs):
    ckpt = runs / "fsdp" / "checkpoints" / "step-000004"
    shards = sorted(p.name for p in (ckpt / "sharded").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # one shard file per process
    assert "optimizer" not in torch.load(ckpt / "state.pt", weights_only=True)  # Adam's state is in the shards
    listed = json.loads((ckpt / "manifest.json").read_text())["files"]
    assert {"sharded/.metadata", "sharded/__0_0.distcp", "sharded/__1_0.distcp", "ema.safetensors"} <= set(listed)
    assert verify_checkpoint(ckpt) is None
    assert not list((runs / "fsdp" / "checkpoints").glob(".*.tmp"))  # the staging folder was moved in
    assert (runs / "fsdp" / "samples" / "step-000004.png").is_file()  # the grid, sampled by both processes


@pytest.mark.slow
def test_a_damaged_shard_fails_verification(runs, tmp_path):
    import shutil

    ckpt = tmp_path / "step-000004"
    shutil.copytree(runs / "fsdp" / "checkpoints" / "step-000004", ckpt)
    with open(ckpt / "sharded" / "__1_0.distcp", "r+b") as f:
        f.seek(10)
        byte = f.read(1)
        f.seek(10)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert "sharded/__1_0.distcp" in verify_checkpoint(ckpt)


@pytest.mark.slow
def test_ditk_sample_reads_an_fsdp_run(runs, tmp_path):
    out = tmp_path / "out"
    invoke_ditk("sample", runs / "fsdp", "--num", 1, "--steps", 2, "--out", out, "--no-progress", check=True)
    assert len(list((out / "images").glob("*.png"))) == 1


def test_fsdp_needs_several_processes(tmp_path):
    from accelerate.state import AcceleratorState

    from ditk.train import prepare_run_dir, train

    AcceleratorState._reset_state(reset_partial_state=True)
    cfg = resolve("digits-dit", [*TINY, "train.max_steps=2", "train.distributed=fsdp"])
    cfg = prepare_run_dir(cfg, tmp_path / "one", None)
    with pytest.raises(ConfigError, match="torchrun --nproc_per_node"):
        train(cfg, tmp_path / "one", progress=False)


@pytest.mark.parametrize("override, message", [
    ("train.distributed=zero3", "not one of ddp, fsdp"),
    ("train.fsdp_sharding=partial", "not one of full, hybrid"),
    ("train.fsdp_param_dtype=fp8", "not one of auto, fp32, bf16"),
    ("train.mixed_precision=fp16", "use train.mixed_precision=bf16"),
    ("train.compile=full", "use train.compile=regional"),
])
def test_fsdp_settings_are_checked_in_one_line(override, message):
    from ditk.fsdp import check_config

    cfg = resolve("digits-dit", ["train.distributed=fsdp", override])
    with pytest.raises(ConfigError, match=message):
        check_config(cfg.train)


def test_memory_table_shards_the_paper_sized_model(tmp_path):
    """benchmarks/fsdp_memory.py: DiT-XL/2 built on the meta device has the paper's 675M parameters, and
    fully_shard over 8 (fake) ranks gives rank 0 an eighth of them plus first-dimension padding. (A subprocess:
    sharding in this process would leave autograd state that breaks the fork-based tests that follow.)"""
    out = tmp_path / "mem.json"
    script = Path(__file__).parents[1] / "benchmarks" / "fsdp_memory.py"
    proc = subprocess.run([sys.executable, str(script), "--presets", "dit-xl-2", "--gpus", "8", "--json", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads(out.read_text())
    assert row["params"] == 675_129_632 and row["blocks"] == 28
    assert row["params"] / 8 < row["local_params"] < row["params"] / 8 * 1.01
    assert row["ddp_gb"] / row["sharded_gb"] == pytest.approx(8, rel=0.01)
    assert "| dit-xl-2 | 0.68B |" in proc.stdout
