"""`evaluate-fid --run`: sample a trained run, and take the run's own data set as the reference.

Sampling goes through `ditk.generate.generate` (the preset's solver and guidance, classes uniform as in DiT's
FID protocol, one PNG per image so an interrupted evaluation resumes where it stopped). The reference is the
data set the run was trained on, as stored: images in [-1, 1] turned into uint8 exactly as samples are
(`ditk.io.to_uint8`), without training-time random flips.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import DitkError
from .inputs import Images, array_images


def sample(run_dir: str, num: int, *, seed: int = 0, batch_size: int = 64, out_dir: Optional[str] = None,
           overrides: Sequence[str] = (), progress: bool = True) -> Path:
    """Generate `num` images from the run; returns the samples' .npz (arr_0, uint8 NHWC)."""
    from ..generate import generate

    # Uniform classes first, so that the user's overrides (which come after) win.
    return generate(str(run_dir), num, seed=seed, batch_size=batch_size, out_dir=out_dir,
                    overrides=["sample.class_labels=uniform", *overrides], progress=progress)


def data_name(run_dir: str) -> str:
    from ..config import load_run_config

    return str(load_run_config(run_dir).data.name)


class DatasetImages:
    """A data set seen as a sequence of uint8 (H, W, C) images, converted one at a time as they are embedded
    (a data set the size of ImageNet does not fit in memory as one array)."""

    def __init__(self, dataset):
        self.dataset = dataset
        # `load(i)` is the item without a random flip; `dataset[i]` is the fallback for data sets without it.
        self._get = dataset.load if hasattr(dataset, "load") else dataset.__getitem__

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> np.ndarray:
        from ..io import to_uint8

        return to_uint8(self._get(int(i))[0][None])[0]


def dataset_images(run_dir: str, role: str = "ref") -> Images:
    """The run's training data set as a set of images (read only if its statistics are not cached)."""
    from omegaconf import OmegaConf

    from ..build import build_dataset
    from ..config import load_run_config

    cfg = load_run_config(run_dir)
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    if cfg.data.name == "latents":
        raise DitkError(f"run {run_dir} was trained on precomputed latents, not images: pass a reference "
                        f"(a folder, an .npz batch or statistics) after --run")
    dataset = build_dataset(cfg)
    if getattr(dataset, "modality", "image") == "caption":
        raise DitkError(f"run {run_dir} is a captioning run (it makes captions, not images): score it with "
                        "`ditk sample RUN` (report.json's captioning section)")
    channels, height, width = (int(s) for s in dataset.shape)
    if channels not in (1, 3):
        raise DitkError(f"run {run_dir}'s data set yields {channels}-channel items, not images: pass a reference")

    split = data_cfg.get("split")
    name = f"{cfg.data.name}-{split}" if split else str(cfg.data.name)
    return array_images((len(dataset), height, width, channels), np.uint8, role=role,
                        source=f"{run_dir} (data: {name})", kind="dataset", name=name,
                        cache_key="dataset:" + json.dumps(data_cfg, sort_keys=True),
                        load_array=lambda: DatasetImages(dataset))
