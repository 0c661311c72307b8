"""Pre-encoded latents (fast-DiT style): run the VAE once over the data set, then train from one file.

DiT encodes every batch with the VAE during training; fast-DiT showed that encoding once up front makes
training several times faster. fast-DiT freezes a single random flip and a single posterior draw per image.
ditk keeps DiT's augmentation instead: with flips, each image is encoded unflipped *and* mirrored, and the
data set picks one of the two per (index, epoch) with the same deterministic rule as the image datasets.

File: one .safetensors, written atomically and streamed batch by batch (memory stays one batch even for
ImageNet), readable by any safetensors loader:
    latents          (N, C, h, w)  float16 or float32 (or bfloat16)   scaled latents, autoencoder.encode(x)
    latents_flipped  (N, C, h, w)  same                              encode(x.flip(-1)); only with flips
    labels           (N,)          int64
    __metadata__     format, autoencoder, autoencoder_path, scale_factor, shift_factor, sample_posterior,
                     image_size, image_shape, count, num_classes, class_names (JSON), flips, seed, dtype
"""

from __future__ import annotations

import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..atomic import atomic_path
from ..errors import ConfigError
from ..registry import DATASETS
from .sampler import flip_decision, split_index

FORMAT = "ditk-latents/1"
ST_DTYPES = {"float16": (torch.float16, "F16"), "float32": (torch.float32, "F32"), "bfloat16": (torch.bfloat16, "BF16")}


class _Unflipped(torch.utils.data.Dataset):
    """Items of `dataset` without its random flips (encode_dataset adds the mirrored copy itself)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        if hasattr(self.dataset, "load"):
            return self.dataset.load(i, False)
        return self.dataset[i]


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()  # little-endian, as safetensors


def _header(entries: list[tuple[str, str, list[int], int]], metadata: dict) -> tuple[bytes, dict]:
    """safetensors header for tensors laid out back to back in `entries` order; returns (bytes, offsets)."""
    header, offsets, start = {"__metadata__": metadata}, {}, 0
    for name, st_dtype, shape, nbytes in entries:
        header[name] = {"dtype": st_dtype, "shape": shape, "data_offsets": [start, start + nbytes]}
        offsets[name] = start
        start += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # 8-byte aligned data, as safetensors itself writes
    return struct.pack("<Q", len(text)) + text, offsets


@torch.no_grad()
def encode_dataset(
    dataset,
    autoencoder,
    out_path,
    batch_size: int = 64,
    device="cpu",
    *,
    dtype: str = "float16",
    flips: Optional[bool] = None,
    seed: int = 0,
    num_workers: int = 0,
    progress: bool = False,
    extra_metadata: Optional[dict] = None,
) -> Path:
    """Encode every item of `dataset` (in index order) with `autoencoder` into one .safetensors file.

    flips: also store the encoding of each mirrored image (None: iff the dataset has hflip on).
    The posterior draws come from one CPU generator seeded with `seed`, consumed batch by batch (first the
    images, then their mirrors), so the file depends only on (data, autoencoder, seed, batch_size), not on
    the device.
    """
    if dtype not in ST_DTYPES:
        raise ConfigError(f"latent dtype '{dtype}' is not one of {', '.join(ST_DTYPES)}")
    flips = bool(getattr(dataset, "hflip", False)) if flips is None else bool(flips)
    if getattr(dataset, "hflip", False) and not hasattr(dataset, "load"):
        raise ValueError("encode_dataset needs unflipped images: pass a dataset with hflip off or a load(i, flip) method")
    n = len(dataset)
    if n == 0:
        raise ConfigError("the dataset is empty: nothing to encode")
    torch_dtype, st_dtype = ST_DTYPES[dtype]
    autoencoder.to(device)
    generator = torch.Generator().manual_seed(int(seed))
    loader = torch.utils.data.DataLoader(_Unflipped(dataset), batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, drop_last=False)
    image_shape = list(getattr(dataset, "shape", ()))
    class_names = getattr(dataset, "class_names", None)
    labels = torch.empty(n, dtype=torch.long)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc="encoding", unit="img", file=sys.stderr)
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp, open(tmp, "wb") as f:
        offsets, item_bytes, data_start, done = None, 0, 0, 0
        for x, y in loader:
            x = x.to(device)
            views = {"latents": autoencoder.encode(x, generator=generator)}
            if flips:
                views["latents_flipped"] = autoencoder.encode(x.flip(-1), generator=generator)
            views = {k: v.to("cpu", torch_dtype) for k, v in views.items()}
            if offsets is None:  # the latent shape is known now: write the header, then stream the data
                if not image_shape:
                    image_shape = list(x.shape[1:])
                latent_shape = list(views["latents"].shape[1:])
                item_bytes = views["latents"][0].numel() * views["latents"].element_size()
                metadata = {
                    "format": FORMAT,
                    "autoencoder": str(getattr(autoencoder, "name", type(autoencoder).__name__)),
                    "autoencoder_path": str(getattr(autoencoder, "path", "")),
                    "scale_factor": repr(float(getattr(autoencoder, "scale_factor", 1.0))),
                    "shift_factor": repr(float(getattr(autoencoder, "shift_factor", 0.0))),
                    "sample_posterior": json.dumps(bool(getattr(autoencoder, "sample_posterior", False))),
                    "image_size": str(image_shape[-1]),
                    "image_shape": json.dumps(image_shape),
                    "count": str(n),
                    "num_classes": str(int(getattr(dataset, "num_classes", 0))),
                    "class_names": json.dumps(list(class_names) if class_names is not None else None),
                    "flips": json.dumps(flips),
                    "seed": str(int(seed)),
                    "dtype": dtype,
                }
                metadata.update({str(k): str(v) for k, v in (extra_metadata or {}).items()})
                entries = [(name, st_dtype, [n] + latent_shape, n * item_bytes) for name in views]
                entries.append(("labels", "I64", [n], n * 8))
                head, offsets = _header(entries, metadata)
                f.write(head)
                data_start = len(head)
            for name, z in views.items():
                f.seek(data_start + offsets[name] + done * item_bytes)
                f.write(_bytes(z))
            labels[done : done + len(y)] = torch.as_tensor(y, dtype=torch.long)
            done += len(y)
            if bar is not None:
                bar.update(len(y))
        if done != n:
            raise RuntimeError(f"the dataset yielded {done} items, expected {n}")
        f.seek(data_start + offsets["labels"])
        f.write(_bytes(labels))
    if bar is not None:
        bar.close()
    return out_path


@dataclass
class LatentsConfig:
    path: str = ""  # a .safetensors written by encode_dataset (`train.precompute_latents=true` makes one)
    hflip: Optional[bool] = None  # None: use the mirrored latents iff the file has them
    flip_seed: int = 0


class Latents(torch.utils.data.Dataset):
    """Items (latent (C, h, w) float32, label) of an encode_dataset file, read lazily (memory-mapped)."""

    def __init__(self, path: str, hflip: Optional[bool] = None, flip_seed: int = 0):
        from safetensors import safe_open

        self.path = str(path)
        p = Path(self.path).expanduser()
        if not self.path or not p.is_file():
            raise ConfigError(
                f"data.path '{self.path}' is not a latents file: train once with train.precompute_latents=true, which writes runs/<name>/latents.safetensors"
            )
        try:
            with safe_open(str(p), framework="pt") as f:
                keys = set(f.keys())
                self.metadata = dict(f.metadata() or {})
                if "latents" not in keys or "labels" not in keys:
                    raise ConfigError(f"'{self.path}' has no 'latents' and 'labels' tensors: not a ditk latents file")
                self.labels = f.get_tensor("labels").long()
                self.shape = tuple(f.get_slice("latents").get_shape()[1:])
        except ConfigError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise ConfigError(f"'{self.path}' is not a readable .safetensors file ({type(e).__name__}: {e})") from e
        self.stored_flips = stored_flips = "latents_flipped" in keys
        if hflip and not stored_flips:
            raise ConfigError(
                f"'{self.path}' was encoded without mirrored latents: re-encode with flips or set data.hflip=false"
            )
        self.hflip = stored_flips if hflip is None else bool(hflip)
        self.flip_seed = int(flip_seed)
        self.file = str(p)
        num_classes = int(self.metadata.get("num_classes", 0) or 0)
        self.num_classes = num_classes or (int(self.labels.max()) + 1 if len(self.labels) else 0)
        names = json.loads(self.metadata.get("class_names", "null") or "null")
        self.class_names = names
        self.scale_factor = float(self.metadata.get("scale_factor", 1.0))
        self.autoencoder = self.metadata.get("autoencoder", "")
        self.epoch = 0
        self._handle = None

    def __getstate__(self):  # DataLoader workers re-open the file themselves
        state = dict(self.__dict__)
        state["_handle"] = None
        return state

    def _slice(self, name: str):
        if self._handle is None:
            from safetensors import safe_open

            self._handle = safe_open(self.file, framework="pt")
        return self._handle.get_slice(name)

    def __len__(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def is_flipped(self, index: int, epoch: int) -> bool:
        return self.hflip and flip_decision(self.flip_seed, index, epoch)

    def load(self, index: int, flip: bool = False):
        if not 0 <= index < len(self):
            raise IndexError(index)
        if flip and not self.stored_flips:
            raise ValueError(f"'{self.path}' holds no mirrored latents")
        z = self._slice("latents_flipped" if flip else "latents")[index : index + 1][0]
        return z.float(), int(self.labels[index])

    def __getitem__(self, item):
        index, epoch = split_index(item, self.epoch)
        return self.load(index, self.is_flipped(index, epoch))


@DATASETS.register("latents", config=LatentsConfig)
def build_latents(cfg) -> Latents:
    """Pre-encoded latents from one .safetensors file (written by `ditk train ... train.precompute_latents=true`), with stored flips."""
    return Latents(str(cfg.path), cfg.hflip, int(cfg.flip_seed))
