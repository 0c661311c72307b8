"""Shared fixtures."""

import pytest

from ditk_testing import TINY, invoke_ditk


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A tiny digits DiT trained for 6 steps (shared by sampling tests)."""
    root = tmp_path_factory.mktemp("runs")
    proc = invoke_ditk("train", "digits-dit", *TINY, "train.max_steps=6", f"run.dir={root}", "--no-progress", check=True)
    assert proc.stdout == f"{root / 'digits-dit'}\n"  # stdout carries the result only; logs go to stderr
    assert "[ditk]" in proc.stderr
    return root / "digits-dit"
