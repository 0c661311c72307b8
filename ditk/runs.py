"""The run directory: what one `ditk train` writes and what every later command reads.

runs/<name>/
  config.yaml                 fully resolved config (enough to re-create the run)
  lineage.json                command line, ditk version, parent run
  metrics.jsonl               one JSON object per logged step
  checkpoints/step-NNNNNN/    model.safetensors, ema.safetensors, state.pt
  checkpoints/latest          text file naming the newest complete checkpoint
  samples/                    grids written during training

Checkpoints are written into a temporary folder and renamed, and `latest` is replaced atomically, so a job
killed at any moment leaves the previous checkpoint intact. `state.pt` holds only tensors and plain
Python values and is read with `weights_only=True`: loading never runs pickled code.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .atomic import atomic_dir, atomic_path, write_text
from .errors import ConfigError

CHECKPOINT_PREFIX = "step-"


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:06d}"


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    config = property(lambda self: self.path / "config.yaml")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    checkpoints = property(lambda self: self.path / "checkpoints")
    samples = property(lambda self: self.path / "samples")

    def latest_checkpoint(self) -> Optional[Path]:
        pointer = self.checkpoints / "latest"
        if not pointer.is_file():
            return None
        ckpt = self.checkpoints / pointer.read_text().strip()
        return ckpt if (ckpt / "state.pt").is_file() else None

    def list_checkpoints(self) -> list[Path]:
        if not self.checkpoints.is_dir():
            return []
        return sorted(p for p in self.checkpoints.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and not p.name.startswith("."))

    def write_lineage(self, parent: Optional[str] = None) -> None:
        info = {"command": sys.argv, "ditk_version": __version__, "parent": parent, "torch": torch.__version__}
        write_text(self.path / "lineage.json", json.dumps(info, indent=2) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """Drop metric lines logged after `step` (written by a run that was interrupted after it)."""
        if not self.metrics.is_file():
            return
        kept = [line for line in self.metrics.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        write_text(self.metrics, "".join(line + "\n" for line in kept))

    def append_metrics(self, record: dict) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")


def _contiguous(state_dict: dict) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}


def save_checkpoint(run: RunDir, step: int, model_sd: dict, ema_sd: dict, state: dict, keep_last: int = 0) -> Path:
    """Write checkpoints/step-NNNNNN atomically, then point `latest` at it, then prune old ones."""
    target = run.checkpoints / checkpoint_name(step)
    with atomic_dir(target) as tmp:
        save_file(_contiguous(model_sd), str(tmp / "model.safetensors"))
        save_file(_contiguous(ema_sd), str(tmp / "ema.safetensors"))
        torch.save(state, tmp / "state.pt")
    write_text(run.checkpoints / "latest", target.name + "\n")
    if keep_last > 0:
        for old in run.list_checkpoints()[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def load_state(ckpt: Path) -> dict:
    return torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)


def load_weights(ckpt: Path, which: str = "ema") -> dict:
    path = Path(ckpt) / f"{which}.safetensors"
    if not path.is_file():
        raise ConfigError(f"checkpoint file {path} is missing: the checkpoint is incomplete, pick another step")
    return load_file(str(path))


def resolve_checkpoint(source: str | Path) -> tuple[Path, Path]:
    """A run dir or a checkpoint dir -> (run dir, checkpoint dir)."""
    source = Path(source)
    if (source / "config.yaml").is_file():
        ckpt = RunDir(source).latest_checkpoint()
        if ckpt is None:
            raise ConfigError(f"run '{source}' has no complete checkpoint yet: train it first (ditk train ...)")
        return source, ckpt
    if (source / "state.pt").is_file() and (source.parent.parent / "config.yaml").is_file():
        return source.parent.parent, source
    raise ConfigError(f"'{source}' is neither a ditk run directory nor one of its checkpoints/step-NNNNNN folders")


def save_json(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
