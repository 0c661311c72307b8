"""A folder of images, one sub-folder per class (torchvision ImageFolder layout), prepared as DiT does.

    path/
      cat/ 0001.jpg, ...      -> class 0 (class folders sorted by name)
      dog/ a/b.png, ...       -> class 1 (images found recursively inside a class folder)

A folder holding images and no sub-folders is one class. Files that are not images (by extension) and
hidden entries are skipped. Each image is converted to RGB, resized and center-cropped with ADM's
`center_crop_arr` (which DiT uses), and mapped to [-1, 1] like ToTensor + Normalize(0.5, 0.5).

Horizontal flips (DiT trains with them) are a deterministic function of (flip_seed, index, epoch), see
`ditk.data.sampler.flip_decision`, so a resumed or multi-process run sees the same flips.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError
from ..registry import DATASETS
from .sampler import flip_decision, split_index

# torchvision's IMG_EXTENSIONS
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
LAYOUT = "expected path/<class name>/<image files> (or images directly in path for one class)"


@dataclass
class ImageFolderConfig:
    path: str = ""  # required: the folder of class sub-folders
    image_size: int = 256
    hflip: bool = True
    flip_seed: int = 0


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM's resize-and-crop (guided-diffusion image_datasets.py, used by DiT's train.py).

    Halve with BOX filtering while the short side is at least twice the target (cheap, alias-free), then
    one BICUBIC resize so the short side equals `image_size`, then crop the center square.
    """
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size])


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _images_under(folder: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.join(root, f) for f in sorted(files) if _is_image(f))
    return found


def find_images(path: str) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, [(file, class index)]) for the layout above; ConfigError for anything unusable."""
    root = Path(path).expanduser()
    if not str(path) or not root.is_dir():
        raise ConfigError(f"data.path '{path}' is not a folder: {LAYOUT}")
    with os.scandir(root) as it:
        entries = sorted(it, key=lambda e: e.name)
    classes = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    if classes:
        samples = []
        for index, name in enumerate(classes):
            files = _images_under(str(root / name))
            if not files:
                raise ConfigError(
                    f"class folder '{root / name}' holds no images ({', '.join(IMAGE_EXTENSIONS)}): add some or remove it"
                )
            samples.extend((f, index) for f in files)
        return classes, samples
    files = [str(root / e.name) for e in entries if e.is_file() and _is_image(e.name)]
    if not files:
        raise ConfigError(f"data.path '{path}' holds no images ({', '.join(IMAGE_EXTENSIONS)}): {LAYOUT}")
    return [root.name], [(f, 0) for f in files]


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """uint8 HWC RGB -> float (3, H, W) in [-1, 1] (ToTensor then Normalize(mean=0.5, std=0.5))."""
    arr = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return arr.float() / 127.5 - 1.0


class ImageFolder(torch.utils.data.Dataset):
    def __init__(self, path: str, image_size: int = 256, hflip: bool = True, flip_seed: int = 0):
        if image_size <= 0:
            raise ConfigError(f"data.image_size must be positive, got {image_size}")
        self.path = str(path)
        self.class_names, self.samples = find_images(self.path)
        self.targets = [y for _, y in self.samples]
        self.num_classes = len(self.class_names)
        self.image_size = int(image_size)
        self.shape = (3, self.image_size, self.image_size)
        self.hflip = bool(hflip)
        self.flip_seed = int(flip_seed)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Epoch used by bare-integer indices (see ResumableBatchSampler(with_epoch=True) for workers)."""
        self.epoch = int(epoch)

    def is_flipped(self, index: int, epoch: int) -> bool:
        return self.hflip and flip_decision(self.flip_seed, index, epoch)

    def load(self, index: int, flip: bool = False):
        """(image, label) of item `index`, mirrored iff `flip`; no randomness."""
        file, label = self.samples[index]
        with Image.open(file) as image:
            image = center_crop_arr(image.convert("RGB"), self.image_size)
        x = pil_to_tensor(image)
        return (x.flip(-1) if flip else x), label

    def __getitem__(self, item):
        index, epoch = split_index(item, self.epoch)
        return self.load(index, self.is_flipped(index, epoch))


@DATASETS.register("image-folder", config=ImageFolderConfig)
def build_image_folder(cfg) -> ImageFolder:
    """Images in class sub-folders (ImageFolder layout), ADM center crop, deterministic flips."""
    return ImageFolder(str(cfg.path), int(cfg.image_size), bool(cfg.hflip), int(cfg.flip_seed))
