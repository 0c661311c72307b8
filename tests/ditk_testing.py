"""Helpers shared by the tests: tiny configs that train in seconds on a CPU, running the CLI."""

import os
import subprocess
import sys

# A DiT small enough that a few training steps take well under a second on a CPU.
TINY = [
    "model.hidden_size=32", "model.depth=2", "model.num_heads=2",
    "train.global_batch_size=16", "train.log_every=1", "train.ckpt_every=3", "train.sample_every=0",
    "sample.num=4", "sample.batch_size=4", "sample.steps=5", "sample.grid_scale=1",
]


def run_ditk(*args, cwd=None, env=None, timeout=300, check=False):
    """Run the installed `ditk` entry point; returns the CompletedProcess (text mode)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(["ditk", *map(str, args)], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"ditk {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def torchrun(*args, timeout=240):
    """`python -m torch.distributed.run --nproc_per_node 2 ARGS...` (gloo on the CPU) on a free port, one thread
    per process, tests/ importable (for tests/distributed_runs.py); asserts that it succeeded and returns its
    stderr. Its own process group, so that a timeout stops the workers too (killing torchrun alone would orphan
    them)."""
    import signal
    import socket
    from pathlib import Path

    with socket.socket() as sock:  # a free port, so parallel test runs do not meet
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    tests = Path(__file__).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           *map(str, args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        raise AssertionError(f"the two-process run did not finish in {timeout} s:\n{stderr[-3000:]}") from None
    assert proc.returncode == 0, stderr[-3000:]
    return stderr


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def invoke_ditk(*args, check=False):
    """Run the CLI in this process (same code path as the `ditk` script, minus the interpreter start-up,
    which costs seconds per call); returns an object like subprocess.CompletedProcess."""
    import contextlib
    import io

    from accelerate.state import AcceleratorState

    from ditk.cli import main

    AcceleratorState._reset_state(reset_partial_state=True)  # as in a fresh process
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    result = Result(code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"ditk {' '.join(map(str, args))} failed ({code}):\n{result.stderr[-3000:]}")
    return result


def random_audio_run(root, *overrides):
    """A tiny tones-fluxmusic run (1 training step) whose weights are then re-drawn at random (std 0.05, seed 0):
    a freshly initialised FluxMusic is the identity (adaLN-Zero), under which every block, guidance, features and
    inversion errors would be trivially zero. The checkpoint manifests are re-sealed after the edit."""
    import torch
    from safetensors.torch import load_file, save_file

    from ditk.runs import write_manifest

    invoke_ditk("train", "tones-fluxmusic", "model.hidden_size=32", "model.num_heads=1", "model.depth_double=1",
                "data.num_clips=8", "train.global_batch_size=4", "train.log_every=1", "sample.num=1", *overrides,
                "train.max_steps=1", "train.ckpt_every=1", f"run.dir={root}", "--no-progress", check=True)
    run = root / "tones-fluxmusic"
    g = torch.Generator().manual_seed(0)
    for ckpt in sorted((run / "checkpoints").glob("step-*")):
        for path in sorted(ckpt.glob("*.safetensors")):
            weights = load_file(str(path))
            save_file({k: torch.randn(v.shape, generator=g) * 0.05 if v.is_floating_point() else v
                       for k, v in weights.items()}, str(path))
        write_manifest(ckpt, int(ckpt.name.split("-")[1]))
    return run
