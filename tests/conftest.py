"""Shared fixtures."""

import sys

import pytest

from ditk_testing import TINY, run_ditk


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A tiny digits DiT trained for 6 steps (shared by sampling tests)."""
    root = tmp_path_factory.mktemp("runs")
    run_ditk("train", "digits-dit", *TINY, "train.max_steps=6", f"run.dir={root}", "--no-progress", check=True)
    return root / "digits-dit"


@pytest.fixture
def python():
    return sys.executable
