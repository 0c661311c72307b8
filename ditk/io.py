"""Images out of and into ditk: uint8 conversion, PNG grids and folders, ADM-style .npz sample batches.

Every file is written atomically (ditk.atomic): a pre-empted job leaves the old file or the new one.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from .atomic import atomic_path
from .errors import ConfigError

ArrayLike = Union[torch.Tensor, np.ndarray]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) float in [-1, 1] -> uint8 (N, H, W, C), exactly DiT's sample_ddp.py conversion.

    `clamp(127.5 x + 128, 0, 255)` then truncation: [-1, 1] maps onto 0..255 in equal-width bins.
    """
    if x.ndim != 4:
        raise ValueError(f"expected (N, C, H, W) images, got shape {tuple(x.shape)}")
    x = torch.clamp(127.5 * x.detach().float() + 128.0, 0, 255)
    return x.permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()


def _as_uint8_nhwc(images: ArrayLike) -> np.ndarray:
    """Float NCHW tensors in [-1, 1] are converted with to_uint8; uint8 NHWC arrays pass through."""
    if isinstance(images, torch.Tensor) and images.dtype != torch.uint8:
        return to_uint8(images)
    arr = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise ValueError(f"expected float (N, C, H, W) in [-1, 1] or uint8 (N, H, W, C), got {arr.dtype} {arr.shape}")
    return arr


def _upscale(arr: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour integer upscaling of NHWC images, so 8x8 digits are visible."""
    if scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    return arr if scale == 1 else arr.repeat(scale, axis=1).repeat(scale, axis=2)


def _pil(arr_hwc: np.ndarray) -> Image.Image:
    channels = arr_hwc.shape[-1]
    if channels == 1:
        return Image.fromarray(np.ascontiguousarray(arr_hwc[..., 0]))  # 2-D uint8 -> mode "L"
    if channels == 3:
        return Image.fromarray(np.ascontiguousarray(arr_hwc))  # (H, W, 3) uint8 -> "RGB"
    raise ValueError(f"only 1- or 3-channel images can be saved, got {channels} channels (decode latents first)")


def _save_image(image: Image.Image, path: Union[str, os.PathLike]) -> None:
    path = Path(path)
    # the temporary name ends in .tmp, so the format comes from the real name
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt)


def make_grid(images: ArrayLike, nrow: Optional[int] = None, padding: int = 2, pad_value: int = 0,
              scale: int = 1) -> np.ndarray:
    """Tile N images into one uint8 (H', W', C) array, row by row, `nrow` images a row (torchvision layout).

    nrow defaults to ceil(sqrt(N)); every image is first upscaled `scale` times (nearest); `padding`
    pixels of `pad_value` surround every tile.
    """
    arr = _upscale(_as_uint8_nhwc(images), scale)
    n, h, w, c = arr.shape
    if n == 0:
        raise ValueError("no images to tile")
    ncol = min(nrow or math.ceil(math.sqrt(n)), n)
    nrows = math.ceil(n / ncol)
    grid = np.full((nrows * (h + padding) + padding, ncol * (w + padding) + padding, c), pad_value, np.uint8)
    for i in range(n):
        r, k = divmod(i, ncol)
        y, x = padding + r * (h + padding), padding + k * (w + padding)
        grid[y : y + h, x : x + w] = arr[i]
    return grid


def save_grid(images: ArrayLike, path: Union[str, os.PathLike], nrow: Optional[int] = None, padding: int = 2,
              pad_value: int = 0, scale: int = 1) -> Path:
    """Save a grid of images (float NCHW in [-1, 1] or uint8 NHWC) as one PNG; gray stays gray."""
    _save_image(_pil(make_grid(images, nrow, padding, pad_value, scale)), path)
    return Path(path)


def save_pngs(images: ArrayLike, folder: Union[str, os.PathLike], start_index: int = 0, scale: int = 1) -> list[Path]:
    """Save each image as folder/{start_index + i:06d}.png (the layout FID tools read); returns the paths."""
    arr = _upscale(_as_uint8_nhwc(images), scale)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(arr):
        path = folder / f"{start_index + i:06d}.png"
        _save_image(_pil(img), path)
        paths.append(path)
    return paths


def save_npz(images: ArrayLike, path: Union[str, os.PathLike]) -> Path:
    """Save uint8 (N, H, W, C) samples as `arr_0` of an .npz, the layout ADM's evaluator and DiT use."""
    arr = _as_uint8_nhwc(images)
    with atomic_path(path) as tmp:
        # a file object, because np.savez appends ".npz" to a file name that lacks it (ours ends in .tmp)
        with open(tmp, "wb") as f:
            np.savez(f, arr_0=arr)
    return Path(path)


def load_npz(path: Union[str, os.PathLike]) -> np.ndarray:
    """`arr_0` of an .npz written by save_npz (or by ADM/DiT): uint8 (N, H, W, C)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sample file '{path}' does not exist: give the path of an .npz written by `ditk sample`")
    try:
        with np.load(path) as data:
            if "arr_0" not in data:
                raise ConfigError(f"'{path}' has no array 'arr_0' (keys: {', '.join(data.files)}): not a samples .npz")
            arr = data["arr_0"]
    except (ValueError, OSError) as e:
        raise ConfigError(f"'{path}' is not a readable .npz file ({type(e).__name__}: {e})") from e
    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise ConfigError(f"'{path}' arr_0 is {arr.dtype} {arr.shape}, expected uint8 (N, H, W, C)")
    return arr


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def list_input_files(items: Sequence[str], suffixes: Sequence[str] = IMAGE_SUFFIXES, noun: str = "image") -> list[Path]:
    """Command-line inputs -> files: a folder gives its files with one of `suffixes`, sorted; a file must exist
    and have one of them. Anything else is a one-line ConfigError naming the item (and the `noun` of the inputs)."""
    names = "/".join(suffixes)
    files: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in suffixes)
            if not found:
                raise ConfigError(f"folder '{item}' holds no {names} files: pass {noun} files or another folder")
            files += found
        elif p.is_file():
            if p.suffix.lower() not in suffixes:
                raise ConfigError(f"'{item}' is not one of {names}: pass such files or a folder of them")
            files.append(p)
        else:
            raise ConfigError(f"input '{item}' does not exist: pass {noun} files or folders of them")
    if not files:
        raise ConfigError(f"no inputs given: pass {noun} files or folders of them")
    return files
