"""Refusals that need no model (and no torch): run before anything is loaded or written."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import ConfigError

MANIFEST = "quantization.json"
# Linear layers kept in high precision by default (see ditk.quantize.layers): embedders (DiT's *_embedder, FluxMusic's
# img_in/txt_in/time_in/vector_in), modulation (adaLN, FluxMusic's *_mod and modulation, Dimba's shared t_block),
# the final layer, routers (DyDiT, MoE)
DEFAULT_KEEP = ("*embedder*", "*_in", "*_in.*", "*adaLN_modulation*", "*modulation*", "*_mod.*", "t_block*",
                "final_layer*", "*router*", "*token_selection*")


@dataclass(frozen=True)
class CalibSettings:
    num: int = 32  # images sampled
    timesteps: int = 8  # points of each trajectory kept
    seed: int = 1  # not the evaluation seed 0: calibration images differ from the ones FID is measured on
    batch_size: int = 64

    def check(self) -> None:
        if self.num < 1:
            raise ConfigError(f"calibration size --calib-num {self.num}: calibration needs at least 1 image")
        if self.timesteps < 1:
            raise ConfigError(f"--calib-timesteps {self.timesteps}: keep at least 1 timestep of the trajectory")


def quantized_folder(path: str | Path) -> Optional[Path]:
    """The run folder if `path` is a `ditk quantize` output (or one of its checkpoints), else None."""
    path = Path(path)
    for folder in (path, path.parent.parent):
        if (folder / MANIFEST).is_file() and (folder / "config.yaml").is_file():
            return folder
    return None


def check_request(source: str, scheme: Optional[str], method: Optional[str], out: Optional[str], calib) -> None:
    if quantized_folder(source) is not None:
        raise ConfigError(f"'{source}' is already a `ditk quantize` output: quantize the run it came from "
                          f"(its lineage.json names it) instead")
    if (scheme is None) == (method is None):
        raise ConfigError("pass exactly one of --scheme (a real torchao model) or --simulate METHOD (a fake-quant study)")
    if method is not None:
        calib.check()
    if out is not None and Path(out).exists():
        raise ConfigError(f"--out {out} already exists: pass a new folder (nothing was written)")
