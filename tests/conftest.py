"""Shared fixtures."""

import pytest
import torch

from ditk_testing import TINY, invoke_ditk


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The in-process tests run thousands of tiny ops: on a busy 2-core machine intra-op threads only wait on each
    other (10-100x slower). Commands run through `run_ditk` are subprocesses with torch's default."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A tiny digits DiT trained for 6 steps (shared by sampling tests)."""
    root = tmp_path_factory.mktemp("runs")
    proc = invoke_ditk("train", "digits-dit", *TINY, "train.max_steps=6", f"run.dir={root}", "--no-progress", check=True)
    assert proc.stdout == f"{root / 'digits-dit'}\n"  # stdout carries the result only; logs go to stderr
    assert "[ditk]" in proc.stderr
    return root / "digits-dit"
