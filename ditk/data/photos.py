"""Natural-image crops from the photographs bundled with scikit-image and scikit-learn (no download).

The restoration prior of `ditk restore`: 8x8 digits are too small to show super-resolution or deblurring, so
this data set cuts 32x32 (or other) RGB crops out of seven colour photographs that ship inside the two
packages' wheels: scikit-image's astronaut, chelsea (a cat), coffee, rocket and motorcycle_left, and
scikit-learn's china and flower.

Each photograph is first shrunk (area averaging, PIL BOX) so its shorter side is `photo_size` pixels: a
32-pixel crop of the full-size photograph would mostly hold flat colour. Then the photograph is cut in two
along its width: the right-most `test_width` columns are the held-out part, the rest minus a `gap` of columns
(so no training crop touches a test crop) is the training part.

- split "train": every crop_size x crop_size window of the training part at a stride of `stride` pixels
  (plus random horizontal flips in training, decided per (seed, index, epoch) as every ditk data set does);
- split "test": the non-overlapping crops of the held-out strip (top to bottom), the evaluation set of the
  restoration benchmark. No pixel of a test crop is in any training crop.

Pixels are mapped from 0..255 to [-1, 1]. Unlabelled (num_classes 0): the prior is unconditional.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError
from ..registry import DATASETS
from .sampler import flip_decision, split_index

SPLITS = ("train", "test", "all")
# (package, name): the colour photographs bundled with the installed wheels.
PHOTOS = (
    ("skimage", "astronaut.png"), ("skimage", "chelsea.png"), ("skimage", "coffee.png"), ("skimage", "rocket.jpg"),
    ("skimage", "motorcycle_left.png"), ("sklearn", "china.jpg"), ("sklearn", "flower.jpg"),
)


@dataclass
class PhotosConfig:
    image_size: int = 32  # crop size
    photo_size: int = 128  # shorter side of each photograph after shrinking
    stride: int = 4  # training crops: window stride in pixels
    test_width: int = 32  # width of the held-out strip at the right of each photograph
    gap: int = 8  # columns between the training part and the held-out strip
    split: str = "train"  # train | test | all (all = train + test)
    hflip: bool = True
    flip_seed: int = 0


def _read(package: str, name: str) -> np.ndarray:
    import importlib.util
    from pathlib import Path

    from PIL import Image

    # The files inside the installed packages (skimage.data's fetchers would reach for the network for some).
    spec = importlib.util.find_spec("skimage" if package == "skimage" else "sklearn")
    if spec is None:
        raise ConfigError("the photos data set needs scikit-image and scikit-learn: pip install scikit-image scikit-learn")
    root = Path(spec.origin).parent
    path = root / "data" / name if package == "skimage" else root / "datasets" / "images" / name
    return np.asarray(Image.open(path).convert("RGB"))


@functools.lru_cache(maxsize=4)
def shrunk_photos(photo_size: int) -> tuple[np.ndarray, ...]:
    """The photographs as uint8 HWC arrays, shorter side = photo_size (PIL BOX: the mean over each area)."""
    from PIL import Image

    out = []
    for package, name in PHOTOS:
        arr = _read(package, name)
        h, w = arr.shape[:2]
        scale = photo_size / min(h, w)
        size = (max(photo_size, round(w * scale)), max(photo_size, round(h * scale)))
        out.append(np.asarray(Image.fromarray(arr).resize(size, Image.BOX)))
    return tuple(out)


def crop_windows(photo_size: int, size: int, stride: int, test_width: int, gap: int, split: str) -> list:
    """(photo index, top, left) of every crop of `split` (see the module docstring)."""
    windows = []
    for p, arr in enumerate(shrunk_photos(photo_size)):
        h, w = arr.shape[:2]
        test_left = w - test_width
        if split in ("train", "all"):
            right = test_left - gap  # training crops end at or before this column
            for top in range(0, h - size + 1, stride):
                for left in range(0, right - size + 1, stride):
                    windows.append((p, top, left))
        if split in ("test", "all"):
            for top in range(0, h - size + 1, size):
                for left in range(test_left, w - size + 1, size):
                    windows.append((p, top, left))
    return windows


class Photos(torch.utils.data.Dataset):
    num_classes = 0

    def __init__(self, cfg: PhotosConfig):
        if cfg.split not in SPLITS:
            raise ConfigError(f"data.split '{cfg.split}' is not one of {', '.join(SPLITS)}")
        if not 8 <= cfg.image_size <= cfg.test_width <= cfg.photo_size // 2:
            raise ConfigError("photos needs 8 <= data.image_size <= data.test_width <= data.photo_size / 2: "
                              f"got {cfg.image_size}, {cfg.test_width}, {cfg.photo_size}")
        if cfg.stride < 1 or cfg.gap < 0:
            raise ConfigError("data.stride must be >= 1 and data.gap >= 0")
        self.cfg = cfg
        photos = shrunk_photos(int(cfg.photo_size))
        self.windows = crop_windows(int(cfg.photo_size), int(cfg.image_size), int(cfg.stride), int(cfg.test_width),
                                    int(cfg.gap), cfg.split)
        s = int(cfg.image_size)
        crops = np.stack([photos[p][t:t + s, l:l + s] for p, t, l in self.windows])
        self.images = torch.from_numpy(crops).permute(0, 3, 1, 2).float().div(127.5).sub(1).contiguous()
        self.labels = torch.full((len(self.windows),), -1, dtype=torch.long)
        self.class_names: list = []
        self.hflip = bool(cfg.hflip) and cfg.split == "train"
        self.flip_seed = int(cfg.flip_seed)
        self.shape = tuple(self.images.shape[1:])
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.windows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def load(self, index: int, flip: bool = False):
        x = self.images[index]
        return (x.flip(-1) if flip else x.clone()), -1

    def __getitem__(self, item):
        index, epoch = split_index(item, self.epoch)
        return self.load(index, self.hflip and flip_decision(self.flip_seed, index, epoch))


@DATASETS.register("photos", config=PhotosConfig)
def build_photos(cfg) -> Photos:
    """32x32 crops of the photographs bundled with scikit-image / scikit-learn (held-out test strip), no download."""
    return Photos(PhotosConfig(**{k: getattr(cfg, k) for k in PhotosConfig.__dataclass_fields__}))
