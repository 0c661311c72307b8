"""scikit-learn's handwritten digits: 1797 grayscale 8x8 images in 10 classes, bundled with scikit-learn.

The whole data set is a few hundred kilobytes and needs no download, so it is ditk's CPU smoke-test data:
a DiT-S/2 learns it in minutes. Pixels are ink counts 0..16 (0 = paper), mapped linearly to [-1, 1]
(paper = -1). Larger `image_size` (16, 24, 32, ...) upsamples with bilinear interpolation
(align_corners=False), which gives smooth strokes that bigger patches can learn; nearest would only
repeat pixels in blocks. `labels: false` hides the labels (num_classes 0, every label -1): the unlabelled
data set that trains an unconditional model (model.num_classes=0).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..registry import DATASETS
from .sampler import split_index

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS = ("all", "train", "test")


@dataclass
class DigitsConfig:
    image_size: int = 8  # 8 = native; a multiple of 8 upsamples bilinearly
    split: str = "train"  # all | train | test (a fixed, class-stratified 90/10 split)
    hflip: bool = False  # must stay false: a mirrored 2 or 7 is not a digit
    labels: bool = True  # false: an unlabelled data set (num_classes 0, labels -1), for unconditional models


def split_indices(labels: np.ndarray, split: str) -> np.ndarray:
    """Indices of `split`: for each class, the first 10% (rounded) of its items in a seed-0 shuffle are test.

    NumPy's legacy RandomState is guaranteed to produce the same stream on every version, so the split
    never changes under the user.
    """
    if split == "all":
        return np.arange(len(labels))
    order = np.random.RandomState(0).permutation(len(labels))
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = order[labels[order] == c]
        test[members[: int(round(len(members) / 10))]] = True
    return np.flatnonzero(test if split == "test" else ~test)


@functools.lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target


class Digits(torch.utils.data.Dataset):
    num_classes = 10

    def __init__(self, image_size: int = 8, split: str = "train", labels: bool = True):
        if split not in SPLITS:
            raise ConfigError(f"data.split '{split}' is not one of {', '.join(SPLITS)}")
        if image_size < 8 or image_size % 8:
            raise ConfigError(f"data.image_size {image_size} must be 8 or a multiple of 8 (16, 24, 32, ...)")
        images, target = _load()
        keep = split_indices(target, split)
        x = torch.from_numpy(images[keep].astype(np.float32)).unsqueeze(1) / 8.0 - 1.0  # 0..16 -> -1..1
        if image_size != 8:
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
        self.images = x.contiguous()
        self.labels = torch.from_numpy(target[keep].astype(np.int64))
        if not labels:  # no label information at all: -1 = no class (ditk.data.latents then counts 0 classes)
            self.labels = torch.full_like(self.labels, -1)
        self.num_classes = len(CLASS_NAMES) if labels else 0
        self.indices = keep  # positions in scikit-learn's array, for provenance
        self.split = split
        self.class_names = list(CLASS_NAMES) if labels else []
        self.hflip = False
        self.shape = tuple(self.images.shape[1:])
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)  # nothing depends on it; kept so every dataset has the same interface

    def load(self, index: int, flip: bool = False):
        x = self.images[index]
        return (x.flip(-1) if flip else x.clone()), int(self.labels[index])

    def __getitem__(self, item):
        index, _ = split_index(item, self.epoch)
        return self.load(index)


@DATASETS.register("digits", config=DigitsConfig)
def build_digits(cfg) -> Digits:
    """scikit-learn handwritten digits (1797 gray 8x8 images, 10 classes), no download."""
    if cfg.hflip:
        raise ConfigError("data.hflip must be false for digits (a mirrored digit is not a digit): set data.hflip=false")
    return Digits(image_size=int(cfg.image_size), split=str(cfg.split), labels=bool(cfg.labels))
