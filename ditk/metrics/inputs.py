"""GEN and REF: an image folder, an `.npz` batch (`arr_0`, uint8 NHWC) or a statistics file (`mu`, `sigma`).

Everything is checked before a single feature is computed, so a bad input costs a second, not an hour:
a set must hold at least 2 readable images of one resolution and one channel count. Policy, stated once:
- a folder is read exactly as clean-fid reads it: every file (recursively) with an image extension of
  `cleanfid.utils.EXTENSIONS`, sorted, opened with PIL and converted to RGB (alpha dropped, grayscale
  replicated); other files are skipped with a note on stderr; a file with an image extension that PIL
  cannot read is an error;
- mixed resolutions inside one set are an error (ditk resizes every image with the extractor's protocol,
  but a mixed folder almost always means two runs were mixed up); GEN and REF may differ in resolution
  (e.g. samples and a data set at another size): each is resized by the same protocol, with a note;
- grayscale (1 channel) and colour (3) images are never mixed, inside a set or between GEN and REF.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sys
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from ..errors import DitkError
from . import stats as stats_io

GRAYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


@dataclass
class Images:
    """A set of images to embed: the files of a folder, or the rows of a uint8 (N, H, W, C) array."""

    role: str  # "gen" or "ref", for messages
    source: str  # what the user named (a path, or a run's data set)
    kind: str  # folder | npz | dataset
    count: int
    height: int
    width: int
    channels: int  # 1 (grayscale) or 3 (colour)
    name: str  # short data set name, used in the stats cache's file names
    cache_key: str  # identifies the content (listing sizes and mtimes, or the data config)
    files: Optional[list[str]] = None
    # -> (N, H, W, C) uint8 with C in {1, 3} (or (N, H, W)); any sequence of HWC images with len() will do
    load_array: Optional[Callable[[], np.ndarray]] = None

    @property
    def resolution(self) -> str:
        return f"{self.height}x{self.width}"

    def array(self) -> np.ndarray:
        arr = self.load_array()
        return arr[..., None] if getattr(arr, "ndim", 4) == 3 else arr


Side = Union[Images, stats_io.Stats]


def load_side(path: str | os.PathLike, role: str) -> Side:
    path = Path(path)
    if not path.exists():
        raise DitkError(f"{role} '{path}' does not exist: pass a folder of images, an .npz batch (arr_0) "
                        f"or a statistics file (mu, sigma)")
    if path.is_dir():
        return folder_images(path, role)
    if path.suffix == ".npz":
        return npz_side(path, role)
    raise DitkError(f"{role} '{path}' is not a folder of images, an .npz batch (arr_0, uint8 NHWC) or a "
                    f"statistics file (.npz with mu, sigma)")


def folder_images(folder: Path, role: str) -> Images:
    from cleanfid.utils import EXTENSIONS

    # The listing of cleanfid.fid.get_folder_features, so ditk embeds exactly the files clean-fid would.
    root = glob.escape(str(folder))
    files = sorted(f for ext in EXTENSIONS for f in glob.glob(os.path.join(root, f"**/*.{ext}"), recursive=True))
    listed = set(files)
    others = sorted(str(p) for p in folder.rglob("*") if p.is_file() and str(p) not in listed
                    and not any(part.startswith(".") for part in p.relative_to(folder).parts))  # glob skips hidden
    if not files:
        found = f" (it holds {len(others)} other files, e.g. {Path(others[0]).name})" if others else ""
        raise DitkError(f"{role} folder {folder} holds no images{found}: expected "
                        f"{', '.join(sorted({e.lower() for e in EXTENSIONS}))} files")
    if others:
        print(f"[ditk] {role}: skipping {len(others)} non-image file(s) in {folder}, e.g. {Path(others[0]).name}",
              file=sys.stderr)
    _at_least_two(len(files), role, folder)

    sizes: Counter = Counter()
    channels: Counter = Counter()
    example: dict = {}
    digest = hashlib.sha256()
    for f in files:
        h, w, c = _probe(f, role)
        sizes[(h, w)] += 1
        channels[c] += 1
        example.setdefault((h, w), f)
        example.setdefault(c, f)
        st = os.stat(f)
        digest.update(f"{os.path.relpath(f, folder)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    if len(sizes) > 1:
        (common, n), (odd, m) = sizes.most_common(2)
        raise DitkError(f"{role} folder {folder} mixes resolutions: {common[0]}x{common[1]} ({n} images) and "
                        f"{odd[0]}x{odd[1]} ({m}, e.g. {Path(example[odd]).name}); one set must have one size: "
                        f"remove or resize the odd images")
    if len(channels) > 1:
        raise DitkError(f"{role} folder {folder} mixes grayscale and colour images (e.g. {Path(example[1]).name} "
                        f"and {Path(example[3]).name}): convert them to one kind")
    (h, w), = sizes
    c, = channels
    return Images(role=role, source=str(folder), kind="folder", count=len(files), height=h, width=w, channels=c,
                  name=folder.resolve().name, cache_key=f"folder:{folder.resolve()}:{digest.hexdigest()}", files=files)


def _probe(path: str, role: str) -> tuple[int, int, int]:
    """(height, width, channels) from the file header, without decoding the pixels."""
    if path.endswith(".npy"):  # clean-fid reads .npy files in folders as HWC images
        arr = np.load(path, mmap_mode="r")
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise DitkError(f"{role} image {path} is a {arr.dtype} array of shape {arr.shape}; .npy images must "
                            f"be uint8 HxWx3")
        return arr.shape[0], arr.shape[1], 3
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
            mode = im.mode
            # Read the whole file without decoding it: a PNG that is truncated or damaged fails here (chunk
            # CRCs), not an hour later inside clean-fid with a traceback.
            im.verify()
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ... for bad files
        reason = "truncated or damaged" if isinstance(e, (OSError, SyntaxError)) and "cannot identify" not in str(e) \
            else "not a readable image"
        raise DitkError(f"{role} file {path} is {reason} ({type(e).__name__}): remove or replace it") from None
    return h, w, 1 if mode in GRAYSCALE_MODES else 3


def _at_least_two(n: int, role: str, source) -> None:
    if n < 2:
        raise DitkError(f"{role} {source} has {n} image{'s' if n != 1 else ''}: FID needs at least 2 (it fits "
                        f"a covariance) and is only meaningful with thousands")


def npz_side(path: Path, role: str) -> Side:
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = list(f.files)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DitkError(f"{role} {path} is not a readable .npz file ({type(e).__name__})") from None
    if "mu" in keys and "sigma" in keys:
        return stats_io.load(path, role)
    if "arr_0" not in keys:
        raise DitkError(f"{role} {path} holds {', '.join(keys) or 'nothing'}: expected arr_0 (uint8 NHWC images) "
                        f"or mu and sigma (statistics)")
    shape, dtype = _npz_member_header(path, "arr_0")
    return array_images(shape, dtype, role=role, source=str(path), kind="npz", name=path.stem,
                        cache_key=f"npz:{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}",
                        load_array=lambda: np.load(path, allow_pickle=False)["arr_0"])


def _npz_member_header(path: Path, key: str) -> tuple[tuple, np.dtype]:
    """Shape and dtype of one array in an .npz without reading it (a 50k-image batch is gigabytes)."""
    with zipfile.ZipFile(path) as z, z.open(f"{key}.npy") as fh:
        version = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(fh)
    return shape, dtype


def array_images(shape: tuple, dtype, *, role: str, source: str, kind: str, name: str, cache_key: str,
                 load_array: Callable[[], np.ndarray]) -> Images:
    """Images held as one uint8 array: (N, H, W, C) with C in {1, 3}, or (N, H, W) for grayscale."""
    shape = tuple(int(s) for s in shape)
    if np.dtype(dtype) != np.uint8:
        raise DitkError(f"{role} {source}: images are {np.dtype(dtype)}, expected uint8 0..255 (the ADM/DiT "
                        f"convention): convert with ditk.io.to_uint8 or (x * 255).round().astype(uint8)")
    if len(shape) == 4 and shape[1] in (1, 3) and shape[3] not in (1, 3):
        raise DitkError(f"{role} {source}: array of shape {shape} looks like NCHW; ditk expects NHWC (the ADM/DiT "
                        f"convention): transpose it with arr.transpose(0, 2, 3, 1)")
    if len(shape) == 3:
        shape = shape + (1,)
    if len(shape) != 4 or shape[3] not in (1, 3):
        raise DitkError(f"{role} {source}: array of shape {shape} is not N x H x W x C with C = 1 (grayscale) "
                        f"or 3 (RGB)")
    _at_least_two(shape[0], role, source)
    return Images(role=role, source=source, kind=kind, count=shape[0], height=shape[1], width=shape[2],
                  channels=shape[3], name=name, cache_key=cache_key, load_array=load_array)


def check_pair(gen: Side, ref: Side) -> None:
    """GEN and REF must be comparable before anything is computed."""
    if isinstance(gen, Images) and isinstance(ref, Images):
        if gen.channels != ref.channels:
            kinds = {1: "grayscale (1 channel)", 3: "colour (3 channels)"}
            raise DitkError(f"gen images are {kinds[gen.channels]} but ref images are {kinds[ref.channels]}: "
                            f"compare like with like (convert one side)")
        if (gen.height, gen.width) != (ref.height, ref.width):
            print(f"[ditk] note: gen is {gen.resolution} and ref is {ref.resolution}; both are resized by the same "
                  f"protocol, so the FID also measures the resolution gap", file=sys.stderr)
