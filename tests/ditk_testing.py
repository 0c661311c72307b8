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


