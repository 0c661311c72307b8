"""Fault injection with real processes and real files: kill -9 (at random moments and inside the checkpoint
write), Ctrl-C, damaged or deleted files, concurrent trainers, bad input. Each case checks the exit code, the
message, and that nothing is lost: where the run can go on, its checkpoints and metrics end up identical to an
uninterrupted reference run.

Killed trainers are forked children of the test process (torch is already imported there, so a child costs
its training steps, not an interpreter start; `ditk` subprocesses where CUDA is initialised); `DITK_TEST_KILL=<point>@<step>` (ditk.runs._kill_point) makes a
child SIGKILL itself at a chosen point of a checkpoint write.
"""

import json
import multiprocessing
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ditk_testing import TINY, invoke_ditk

# Logging every 4 steps and checkpointing every 3 puts checkpoints in the middle of a logging window, so the
# running loss after a resume is only right if the window is restored too.
ARGS = ["digits-dit", *TINY, "train.log_every=4", "train.ckpt_every=3", "--no-progress"]
CKPTS = ["step-000003", "step-000006", "step-000009"]


def train(run: Path, steps: int, *extra):
    return invoke_ditk("train", *ARGS, f"train.max_steps={steps}", f"run.dir={run.parent}", f"run.name={run.name}",
                       *extra)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """ref: uninterrupted to step 9 (checkpoints 3, 6, 9). run6: ref as it was just after writing step-000006."""
    from ditk.runs import RunDir

    root = tmp_path_factory.mktemp("faults")
    proc = train(root / "ref", 9)
    assert proc.returncode == 0, proc.stderr
    run6 = root / "run6"
    shutil.copytree(root / "ref", run6)
    shutil.rmtree(run6 / "checkpoints" / "step-000009")
    shutil.rmtree(run6 / "samples")
    (run6 / "checkpoints" / "latest").write_text("step-000006\n")
    RunDir(run6).truncate_metrics(6)
    return root


def copy_run6(runs, tmp_path, name="run") -> Path:
    dst = tmp_path / name
    shutil.copytree(runs / "run6", dst)
    return dst


def metrics(run: Path) -> list:
    """The records without their wall-clock fields (the only ones that may differ between equal runs)."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in ("images_per_sec", "data_wait_s")} for line in lines]


def digests(run: Path) -> dict:
    """checkpoint -> {file: checksum} of its safetensors, from its manifest (the files are verified against it)."""
    out = {}
    for ckpt in sorted((run / "checkpoints").glob("step-*")):
        files = json.loads((ckpt / "manifest.json").read_text())["files"]
        out[ckpt.name] = {k: v["checksum"] for k, v in files.items() if k.endswith(".safetensors")}
    return out


def assert_equal_states(a, b, where="state"):
    """state.pt contents equal (its bytes are not: torch.save writes a fresh serialization id each time)."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_equal_states(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_states(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def assert_same_as_reference(run: Path, ref: Path):
    from ditk.runs import RunDir, verify_checkpoint

    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", *CKPTS]
    assert all(verify_checkpoint(run / "checkpoints" / c) is None for c in CKPTS)
    # weights and EMA byte for byte; optimizer, schedule, the global RNG and the running-loss window (state.pt)
    # equal to the uninterrupted run's
    assert digests(run) == digests(ref)
    from ditk.runs import load_state

    for c in CKPTS:
        assert_equal_states(load_state(run / "checkpoints" / c), load_state(ref / "checkpoints" / c), c)
    assert metrics(run) == metrics(ref)
    assert RunDir(run).latest_checkpoint().name == "step-000009"
    assert not [p for p in run.rglob(".*.tmp")], "temporary leftovers"


def one_line(proc, code=2):
    assert proc.returncode == code, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("[ditk]")]
    assert len(errors) == 1 and errors[0].startswith("error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return errors[0]


# ---- forked trainers -----------------------------------------------------------------------------------------
def _child(args, env, log):
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = sys.stderr = open(fd, "w", buffering=1)
    from accelerate.state import AcceleratorState

    from ditk.cli import main

    AcceleratorState._reset_state(reset_partial_state=True)
    main([str(a) for a in args])


class _Spawned:
    """The forked child's interface over a `ditk` subprocess (used where CUDA is initialised: it does not survive
    a fork)."""

    def __init__(self, args, env, log):
        self.log, self._file = log, open(log, "w")
        self._proc = subprocess.Popen(["ditk", *map(str, args)], stdout=self._file, stderr=subprocess.STDOUT,
                                      env={**os.environ, **env})
        self.pid = self._proc.pid

    def is_alive(self):
        return self._proc.poll() is None

    def join(self, timeout=None):
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        self._file.flush()

    @property
    def exitcode(self):
        return self._proc.poll()


def fork_train(run: Path, steps: int, *extra, env=None):
    args = ["train", *ARGS, f"train.max_steps={steps}", f"run.dir={run.parent}", f"run.name={run.name}", *extra]
    log = run.parent / f"{run.name}-child.log"
    if torch.cuda.is_initialized():
        return _Spawned(args, env or {}, log)
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(args, env or {}, str(log)))
    proc.start()
    proc.log = log
    return proc


def wait_for_records(run: Path, n: int, proc, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.is_alive():
        path = run / "metrics.jsonl"
        if path.is_file() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"the child wrote fewer than {n} records: {proc.log.read_text()[-2000:]}")


# ---- kill -9 -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("point", ["model", "manifest", "renamed", "latest"])
def test_sigkill_inside_the_checkpoint_write_loses_nothing(runs, tmp_path, point):
    run = copy_run6(runs, tmp_path)
    child = fork_train(run, 9, env={"DITK_TEST_KILL": f"{point}@9"})
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    if point in ("model", "manifest"):  # killed inside the write: a half-written temporary folder is left
        assert [p.name for p in (run / "checkpoints").glob(".step-000009.*.tmp")]
        assert not (run / "checkpoints" / "step-000009").exists()
    proc = train(run, 9)  # the same command again
    assert proc.returncode == 0, proc.stderr
    if point in ("model", "manifest"):
        assert "removed 1 temporary leftover" in proc.stderr
    assert_same_as_reference(run, runs / "ref")


def test_sigkill_at_a_random_moment_loses_nothing(runs, tmp_path):
    rng = random.Random(0)
    run = copy_run6(runs, tmp_path)
    for attempt in range(3):  # bounded: each kill lands wherever the child happens to be
        child = fork_train(run, 9)
        time.sleep(rng.uniform(0.05, 0.6))
        os.kill(child.pid, signal.SIGKILL)
        child.join(60)
        assert child.exitcode in (-signal.SIGKILL, 0)
    proc = train(run, 9)
    assert proc.returncode == 0, proc.stderr
    assert_same_as_reference(run, runs / "ref")


def assert_consistent(run: Path):
    """What a run that was stopped must satisfy: every checkpoint verifies, `latest` names the newest, and
    metrics.jsonl holds each logged step once, in order."""
    from ditk.runs import RunDir, verify_checkpoint

    ckpts = RunDir(run).list_checkpoints()
    assert all(verify_checkpoint(c) is None for c in ckpts)
    # (`latest` may still name the one before the newest if the kill fell between the rename and its update)
    assert RunDir(run).latest_checkpoint() in ckpts[-2:]
    steps = [r["step"] for r in metrics(run)]
    assert steps == sorted(set(steps))
    return int(ckpts[-1].name.split("-")[1])


def test_ctrl_c_saves_a_checkpoint_and_exits_130(runs, tmp_path):
    run = copy_run6(runs, tmp_path)
    child = fork_train(run, 100_000)
    wait_for_records(run, 2, child)  # step 8 logged: the child is past step-000006
    os.kill(child.pid, signal.SIGINT)
    child.join(60)
    log = child.log.read_text()
    assert child.exitcode == 130, log[-2000:]
    assert "interrupted at step" in log and "checkpoint saved" in log and "Traceback" not in log
    stopped = assert_consistent(run)
    assert stopped >= 8 and f"interrupted at step {stopped}: checkpoint saved" in log


# ---- damaged and deleted files -------------------------------------------------------------------------------
def test_deleted_latest_falls_back_to_the_newest_checkpoint(runs, tmp_path):
    run = copy_run6(runs, tmp_path)
    (run / "checkpoints" / "latest").unlink()
    proc = invoke_ditk("sample", run, "--num", "2", "--out", tmp_path / "s", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "checkpoints/latest is missing: using step-000006" in proc.stderr
    proc = train(run, 9)
    assert proc.returncode == 0 and "checkpoints/latest is missing: using step-000006" in proc.stderr
    assert "resuming" in proc.stderr and "from step-000006" in proc.stderr
    assert_same_as_reference(run, runs / "ref")


def test_garbage_in_latest_falls_back(runs, tmp_path, capsys):
    from ditk.runs import RunDir

    run = copy_run6(runs, tmp_path)
    (run / "checkpoints" / "latest").write_bytes(b"\x00\xffgarbage")
    assert RunDir(run).latest_checkpoint().name == "step-000006"
    assert "not a checkpoint of this run: using step-000006" in capsys.readouterr().err
    (run / "checkpoints" / "latest").write_text("step-000012\n")
    assert RunDir(run).latest_checkpoint().name == "step-000006"
    assert "names step-000012, which does not exist" in capsys.readouterr().err


def test_truncated_weights_fall_back_to_the_previous_checkpoint(runs, tmp_path):
    run = copy_run6(runs, tmp_path)
    weights = run / "checkpoints" / "step-000006" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    proc = train(run, 9)
    assert proc.returncode == 0, proc.stderr
    assert "names step-000006, which is damaged (model.safetensors has 1000 bytes" in proc.stderr
    assert "using step-000003" in proc.stderr
    assert_same_as_reference(run, runs / "ref")  # steps 4-6 retrained identically, then 7-9


def test_bit_flipped_weights_are_detected(runs, tmp_path):
    run = copy_run6(runs, tmp_path)
    ema = run / "checkpoints" / "step-000006" / "ema.safetensors"
    data = bytearray(ema.read_bytes())
    data[len(data) // 2] ^= 0x40  # inside the tensor data: safetensors itself would not notice
    ema.write_bytes(bytes(data))
    good = invoke_ditk("sample", runs / "run6" / "checkpoints" / "step-000003", "--num", "2", "--out",
                       tmp_path / "good", "--no-progress")
    assert good.returncode == 0, good.stderr
    proc = invoke_ditk("sample", run, "--num", "2", "--out", tmp_path / "s", "--no-progress")
    assert proc.returncode == 0 and "ema.safetensors does not match its checksum: damaged" in proc.stderr
    assert "using step-000003" in proc.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "s" / "samples.npz")["arr_0"],
                                  np.load(tmp_path / "good" / "samples.npz")["arr_0"])
    # Asked for explicitly, the damaged checkpoint is refused rather than replaced.
    line = one_line(invoke_ditk("sample", run / "checkpoints" / "step-000006", "--num", "2", "--out", tmp_path / "x"))
    assert "step-000006 is damaged (ema.safetensors does not match its checksum" in line
    assert not (tmp_path / "x").exists()


def test_no_verifying_checkpoint_is_an_error_not_a_fresh_start(runs, tmp_path):
    run = copy_run6(runs, tmp_path)
    for step, name in (("step-000003", "state.pt"), ("step-000006", "model.safetensors")):
        path = run / "checkpoints" / step / name
        path.write_bytes(path.read_bytes()[:-7])
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    line = one_line(train(run, 9))
    assert "has 2 checkpoint(s) but none verifies" in line and "model.safetensors has" in line
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == before
    # Sampling reads only ema.safetensors, which is intact in step-000006: it goes on.
    proc = invoke_ditk("sample", run, "--num", "2", "--out", tmp_path / "s", "--no-progress")
    assert proc.returncode == 0 and "using" not in proc.stderr, proc.stderr
    proc = invoke_ditk("sample", run, "--weights", "model", "--num", "2", "--out", tmp_path / "m", "--no-progress")
    assert proc.returncode == 0 and "using step-000003" in proc.stderr  # its model.safetensors is intact


def test_torn_metrics_line_is_dropped(runs, tmp_path):
    run = copy_run6(runs, tmp_path)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "loss": 0.9')  # a write cut short (full disk, kill)
    proc = train(run, 9)
    assert proc.returncode == 0, proc.stderr
    assert "dropping its last line, which is not a complete record" in proc.stderr
    assert_same_as_reference(run, runs / "ref")


def test_pickled_code_in_state_is_refused_by_name(runs, tmp_path):
    from ditk.errors import ConfigError
    from ditk.runs import load_state, write_manifest

    run = copy_run6(runs, tmp_path)
    ckpt = run / "checkpoints" / "step-000006"
    torch.save({"step": 6, "evil": socket.socket}, ckpt / "state.pt")  # a global a safe loader must refuse
    write_manifest(ckpt, 6)
    with pytest.raises(ConfigError, match=r"contains a pickled socket\.socket, which ditk refuses"):
        load_state(ckpt)


# ---- damaged config ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage, words", [
    ("model: [1, 2\n", "is damaged (not valid YAML"),
    ("", "is damaged (empty)"),
    (None, "is damaged or truncated (no '"),  # the file cut in half
])
def test_damaged_config_is_one_line_naming_the_copy(runs, tmp_path, damage, words):
    run = copy_run6(runs, tmp_path)
    config = run / "config.yaml"
    text = config.read_text()
    config.write_text(text[: len(text) // 2].rsplit("\n", 1)[0] + "\n" if damage is None else damage)
    for proc in (invoke_ditk("sample", run, "--out", tmp_path / "s"), train(run, 9)):
        line = one_line(proc)
        assert f"{config} {words}" in line
        assert "restore it from the copy" in line and "step-000006/run-config.yaml" in line
    assert not (tmp_path / "s").exists()


def test_config_that_disagrees_with_the_weights(runs, tmp_path):
    run = copy_run6(runs, tmp_path)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("depth: 2", "depth: 3"))
    line = one_line(invoke_ditk("sample", run, "--out", tmp_path / "s"))
    assert "model.safetensors" in line or "ema.safetensors" in line
    assert "depth" in line


# ---- concurrent trainers -------------------------------------------------------------------------------------
def test_second_trainer_is_refused_and_a_killed_ones_lock_is_not_stale(runs, tmp_path):
    run = copy_run6(runs, tmp_path)
    child = fork_train(run, 100_000)
    try:
        wait_for_records(run, 2, child)
        before = (run / "metrics.jsonl").read_text()
        line = one_line(train(run, 100_000))
        assert f"is in use by ditk train (PID {child.pid} on host {socket.gethostname()}" in line
        assert (run / "metrics.jsonl").read_text().startswith(before)  # the refused one wrote nothing
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join(60)
    newest = assert_consistent(run)
    proc = train(run, newest + 2)  # the dead holder's lock went with it
    assert proc.returncode == 0 and f"resuming {run} from step-" in proc.stderr, proc.stderr
    assert assert_consistent(run) == newest + 2
    from ditk.runs import RunDir

    assert RunDir(run).latest_checkpoint().name == f"step-{newest + 2:06d}"


# ---- sample folders and images -------------------------------------------------------------------------------
def test_truncated_png_in_a_sample_folder_and_for_evaluate_fid(runs, tmp_path):
    run = runs / "run6"
    out = tmp_path / "s"
    args = ["sample", run, "--num", "4", "--out", out, "--no-progress"]
    assert invoke_ditk(*args).returncode == 0
    first = np.load(out / "samples.npz")["arr_0"]
    png = out / "images" / "000002.png"
    png.write_bytes(png.read_bytes()[:40])
    (out / "images" / ".000003.png.abc.tmp").write_bytes(b"half")  # a killed write's leftover
    os.utime(out / "images" / ".000003.png.abc.tmp", (time.time() - 3600,) * 2)

    line = one_line(invoke_ditk("evaluate-fid", out / "images", out / "samples.npz", "--extractor", "digits"))
    assert f"gen file {png} is " in line and "remove or replace it" in line
    line = one_line(invoke_ditk(*args))
    assert f"{png} is damaged" in line and "delete it and rerun" in line
    png.unlink()
    proc = invoke_ditk(*args)
    assert proc.returncode == 0 and "3 of 4 images already" in proc.stderr
    np.testing.assert_array_equal(np.load(out / "samples.npz")["arr_0"], first)
    assert not list((out / "images").glob(".*.tmp"))


def test_failed_sample_leaves_nothing_that_blocks(runs, tmp_path):
    run = copy_run6(runs, tmp_path)
    base = ["sample", run, "--num", "2", "--no-progress"]
    assert "11" in one_line(invoke_ditk(*base, "--class-labels", "11"))  # fails after choosing the folder
    three = invoke_ditk(*base, "--class-labels", "3")
    assert three.returncode == 0, three.stderr
    four = invoke_ditk(*base, "--class-labels", "4")  # only the labels differ: another default folder
    assert four.returncode == 0, four.stderr
    assert three.stdout != four.stdout and "labels-3-" in three.stdout and "labels-4-" in four.stdout
    for bad in (["--num", "0"], ["--num", "-1"], ["--batch-size", "0"]):
        line = one_line(invoke_ditk(*base, *bad))
        assert bad[0] in line and "see `ditk sample --help`" in line
    line = one_line(invoke_ditk("sample", run, "sample.num=0", "--no-progress"))
    assert "sample.num=0: it must be at least 1" in line


def test_failed_train_leaves_nothing_that_blocks(tmp_path):
    run = tmp_path / "r"
    bad = invoke_ditk("train", *ARGS, "train.max_steps=2", f"run.dir={tmp_path / 'runs'}", "run.name=r",
                      "data.name=image-folder", f"data.path={tmp_path / 'no-such-folder'}")
    assert "no-such-folder' is not a folder" in one_line(bad)
    assert not (tmp_path / "runs").exists()  # neither the run nor the runs/ folder it made
    # A start killed after its first steps but before its first checkpoint does not block a changed config.
    child = fork_train(run, 100_000, "train.log_every=1", "train.ckpt_every=1000")
    wait_for_records(run, 1, child)
    os.kill(child.pid, signal.SIGKILL)
    child.join(60)
    proc = invoke_ditk("train", *ARGS, "train.max_steps=2", f"run.dir={tmp_path}", "run.name=r", "optim.lr=2e-4")
    assert proc.returncode == 0, proc.stderr
    assert "has no checkpoint yet" in proc.stderr
    assert [r["step"] for r in metrics(run)] == [2]  # log_every=4: the final step only, nothing stale


# ---- non-finite loss -----------------------------------------------------------------------------------------
def test_non_finite_loss_stops_without_saving(tmp_path):
    run = tmp_path / "nan"
    common = ["train", *ARGS, "train.max_steps=9", f"run.dir={tmp_path}", "run.name=nan", "optim.lr=1e30",
              "optim.warmup_steps=0", "train.log_every=1"]
    line = one_line(invoke_ditk(*common), code=1)
    assert line.startswith("error: step 2: loss ") and "(not finite)" in line and "last checkpoint is none" in line
    assert not (run / "checkpoints").exists()  # nothing of the NaN weights was written
    proc = invoke_ditk(*common, "train.skip_nonfinite=3")
    assert "error: step 5:" in proc.stderr and proc.returncode == 1
    assert [r["skipped_steps"] for r in metrics(run)] == [0, 1, 2, 3]
    assert proc.stderr.count("step skipped") == 3
