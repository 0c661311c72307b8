"""`ditk prune` end to end on a tiny digits DiT: every depth method writes a run that rebuilds from its config.yaml
alone, samples, and resumes training; bad input is one line, exit 2, and nothing written."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ditk_testing import TINY, invoke_ditk

SMALL = [a for a in TINY if not a.startswith("model.depth")] + ["model.depth=4"]
PRUNE = ["prune.calib_batches=2", "prune.calib_batch_size=8", "prune.search_batch_size=8"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune")
    invoke_ditk("train", "digits-dit", *SMALL, "train.max_steps=3", f"run.dir={root}", "run.name=src",
                "--no-progress", check=True)
    return root


def prune(root, name, *overrides):
    return invoke_ditk("prune", "digits-dit", *SMALL, *PRUNE, f"prune.source={root / 'src'}", f"run.dir={root}",
                       f"run.name={name}", "--no-progress", *overrides)


@pytest.mark.parametrize("method", [["prune.method=score", "prune.criterion=bi", "prune.keep=2"],
                                    ["prune.method=score", "prune.criterion=oracle", "prune.pattern=1:2"],
                                    ["prune.method=random", "prune.keep=3"],
                                    ["prune.method=index", "prune.keep_indices=[0,3]"],
                                    ["prune.method=learnable", "prune.pattern=1:2", "prune.search_steps=2"]])
def test_every_depth_method_writes_a_smaller_run(source, method):
    name = "out-" + "-".join(m.split("=")[1] for m in method[:2]).replace(":", "").replace("[", "").replace("]", "").replace(",", "")
    proc = prune(source, name, *method)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = source / name
    assert proc.stdout.strip() == str(out)
    report = json.loads((out / "pruning.json").read_text())
    kept = report["kept_blocks"]
    assert report["depth_after"] == len(kept) < 4 and report["params_after"] < report["params_before"]
    assert report["gflops_after"] < report["gflops_before"]
    if "prune.keep_indices=[0,3]" in method:
        assert kept == [0, 3]
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["parent"] == str(source / "src")
    # config.yaml holds the real depth; the weights are the source's blocks renumbered
    from ditk.build import build_model
    from ditk.config import load_run_config

    cfg = load_run_config(out)
    assert cfg.model.depth == len(kept)
    model = build_model(cfg)
    weights = load_file(str(out / "checkpoints" / "step-000000" / "ema.safetensors"))
    model.load_state_dict(weights)
    src = load_file(str(source / "src" / "checkpoints" / "step-000003" / "ema.safetensors"))
    for j, i in enumerate(kept):
        assert torch.equal(weights[f"blocks.{j}.attn.qkv.weight"], src[f"blocks.{i}.attn.qkv.weight"])


def test_pruned_run_samples_and_resumes_training(source):
    assert prune(source, "chain", "prune.method=score", "prune.keep=2").returncode == 0
    out = source / "chain"
    proc = invoke_ditk("sample", out, "--num", 2, "--steps", 2, "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = invoke_ditk("train", out / "config.yaml", f"--run-dir={out}", "train.max_steps=1", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resuming" in proc.stderr and (out / "checkpoints" / "step-000001" / "ema.safetensors").is_file()


@pytest.mark.parametrize("bad, message", [
    (["prune.keep=4"], "keep between 1 and 3"),
    (["prune.keep=0"], "exactly one target"),
    (["prune.pattern=2:3"], "does not divide"),
    (["prune.keep=2", "prune.pattern=1:2"], "exactly one target"),
    (["prune.keep=2", "model.hidden_size=64"], "model.hidden_size"),
    (["prune.method=experts", "prune.experts_keep=2"], "mixture-of-experts"),
    (["prune.method=index", "prune.keep_indices=[0,7]"], "blocks 0..3"),
    (["prune.keep=2", "prune.method=magic"], "unknown prune.method"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(source, bad, message):
    proc = prune(source, "bad", *bad)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and message in proc.stderr
    assert not (source / "bad").exists()


def test_missing_source_is_refused(source):
    proc = invoke_ditk("prune", "digits-dit", *SMALL, "prune.keep=2", f"run.dir={source}", "run.name=nosrc")
    assert proc.returncode == 2 and "prune.source" in proc.stderr and not (source / "nosrc").exists()


def test_recovery_fine_tunes_with_kd_from_the_source_at_a_scaled_lr(source):
    proc = prune(source, "rec", "prune.method=score", "prune.keep=2", "prune.recover_steps=2",
                 "prune.lr_reference_batch=32")  # TINY's global batch is 16: lr halves
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = source / "rec"
    assert "linear LR scaling" in proc.stderr
    from ditk.config import load_run_config

    cfg = load_run_config(out)
    assert cfg.distill.method == "kd" and cfg.distill.teacher == str((source / "src").resolve())
    report = json.loads((out / "pruning.json").read_text())
    assert list(cfg.distill.block_map) == report["kept_blocks"]
    assert cfg.optim.lr == pytest.approx(1e-3 * 16 / 32)
    before = load_file(str(out / "checkpoints" / "step-000000" / "model.safetensors"))
    after = load_file(str(out / "checkpoints" / "step-000002" / "model.safetensors"))
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000002"
    assert not torch.equal(before["blocks.0.attn.qkv.weight"], after["blocks.0.attn.qkv.weight"])


def test_recovery_from_a_bare_weights_file_uses_it_as_the_teacher(source, tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes((source / "src" / "checkpoints" / "step-000003" / "ema.safetensors").read_bytes())
    proc = invoke_ditk("prune", "digits-dit", *SMALL, *PRUNE, f"prune.source={weights}", "prune.keep=2",
                       "prune.recover_steps=2", f"run.dir={source}", "run.name=bare", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = source / "bare"
    from ditk.config import load_run_config
    from ditk.distill.base import load_teacher

    cfg = load_run_config(out)
    assert cfg.distill.teacher == str((out / "teacher").resolve())
    teacher, _ = load_teacher(cfg.distill.teacher)  # the weights file, as a run: exactly its tensors
    src = load_file(str(weights))
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in src.items())
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000002"
    assert json.loads((out / "teacher" / "lineage.json").read_text())["parent"] == str(weights)


def test_ditk_distill_kd_accepts_a_pruned_run_as_student(source):
    assert prune(source, "student", "prune.method=index", "prune.keep_indices=[0,2]").returncode == 0
    proc = invoke_ditk("distill", "digits-dit", *SMALL, "distill.method=kd", f"distill.teacher={source / 'src'}",
                       f"distill.student={source / 'student'}", "distill.block_map=[0,2]", "train.max_steps=1",
                       f"run.dir={source}", "run.name=student-kd", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    from ditk.config import load_run_config

    assert load_run_config(source / "student-kd").model.depth == 2
