"""Pre-encoded latents (fast-DiT style): run the VAE once over the data set, then train from stored tensors.

DiT encodes every batch with the VAE during training; fast-DiT showed that encoding once up front makes
training several times faster. fast-DiT freezes a single random flip and a single posterior draw per image.
ditk keeps both of DiT's random draws instead:
  - flips: each image is encoded unflipped *and* mirrored, and the data set picks one of the two per
    (index, epoch) with the same deterministic rule as the image data sets;
  - the posterior: what `train.precompute_latents` stores is the VAE posterior's moments (mean and std of
    its diagonal Gaussian), and `PosteriorDraw` makes a fresh z = (mean + std * eps - shift) * scale at every
    step, eps drawn from the step's generator exactly where encoding the pixels would draw it. So a step
    from the cache is the step that encodes the pixels (the official train.py's
    `vae.encode(x).latent_dist.sample().mul_(0.18215)`), given the same eps, up to the encoder's float
    rounding for another batch composition (tests/test_latent_cache.py).

Files: .safetensors, written atomically and streamed batch by batch (memory stays one batch even for
ImageNet), readable by any safetensors loader. Two kinds:
  ditk-latents/1 (`encode_dataset`, one posterior draw per image, kept for existing files):
    latents          (N, C, h, w)  float16 or float32 (or bfloat16)   scaled latents, autoencoder.encode(x)
    latents_flipped  (N, C, h, w)  same                              encode(x.flip(-1)); only with flips
  ditk-latent-moments/1 (`encode_moments`, one shard of items start..stop of the data set):
    moments          (n, 2C, h, w) float32 (or float16 / bfloat16)   cat(mean, std), unscaled
    moments_flipped  (n, 2C, h, w) same                              of x.flip(-1); only with flips
and in both
    labels           (N,)          int64
    __metadata__     format, autoencoder, autoencoder_path, scale_factor, shift_factor, sample_posterior,
                     image_size, image_shape, count, num_classes, class_names (JSON), flips, dtype (+ seed,
                     start, stop, key)
`Latents` reads one file, or a manifest.json listing shards (ditk.data.latent_cache writes them).
"""

from __future__ import annotations

import bisect
import json
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..atomic import atomic_path
from ..errors import ConfigError
from ..registry import DATASETS
from .sampler import flip_decision, split_index

FORMAT = "ditk-latents/1"
MOMENTS_FORMAT = "ditk-latent-moments/1"
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


class _Writer:
    """Streams items of equal shape, batch by batch, into an open .safetensors file: the header (sized for `n`
    items per view, then `labels`) when the first batch arrives, each view's rows at their offsets."""

    def __init__(self, f, n: int, st_dtype: str, metadata: dict):
        self.f, self.n, self.st_dtype, self.metadata = f, n, st_dtype, metadata
        self.offsets, self.item_bytes, self.data_start, self.done = None, 0, 0, 0
        self.labels = torch.empty(n, dtype=torch.long)

    def add(self, views: dict, labels) -> None:
        if self.offsets is None:  # the item shape is known now: write the header, then stream the data
            first = next(iter(views.values()))
            self.item_bytes = first[0].numel() * first.element_size()
            entries = [(name, self.st_dtype, [self.n] + list(first.shape[1:]), self.n * self.item_bytes) for name in views]
            entries.append(("labels", "I64", [self.n], self.n * 8))
            head, self.offsets = _header(entries, self.metadata)
            self.f.write(head)
            self.data_start = len(head)
        for name, z in views.items():
            self.f.seek(self.data_start + self.offsets[name] + self.done * self.item_bytes)
            self.f.write(_bytes(z))
        self.labels[self.done : self.done + len(labels)] = torch.as_tensor(labels, dtype=torch.long)
        self.done += len(labels)

    def finish(self) -> None:
        if self.done != self.n:
            raise RuntimeError(f"the dataset yielded {self.done} items, expected {self.n}")
        self.f.seek(self.data_start + self.offsets["labels"])
        self.f.write(_bytes(self.labels))


def _common_metadata(dataset, autoencoder, image_shape, n, flips, dtype) -> dict:
    class_names = getattr(dataset, "class_names", None)
    return {
        "autoencoder": str(getattr(autoencoder, "name", type(autoencoder).__name__)),
        "autoencoder_path": str(getattr(autoencoder, "path", "")),
        "scale_factor": repr(float(getattr(autoencoder, "scale_factor", 1.0))),
        "shift_factor": repr(float(getattr(autoencoder, "shift_factor", 0.0))),
        "sample_posterior": json.dumps(bool(getattr(autoencoder, "sample_posterior", False))),
        "image_size": str(image_shape[-1]),
        "image_shape": json.dumps(list(image_shape)),
        "count": str(n),
        "num_classes": str(int(getattr(dataset, "num_classes", 0))),
        "class_names": json.dumps(list(class_names) if class_names is not None else None),
        "flips": json.dumps(flips),
        "dtype": dtype,
    }


def _check_flips(dataset, flips: Optional[bool]) -> bool:
    flips = bool(getattr(dataset, "hflip", False)) if flips is None else bool(flips)
    if getattr(dataset, "hflip", False) and not hasattr(dataset, "load"):
        raise ValueError("encoding needs unflipped images: pass a dataset with hflip off or a load(i, flip) method")
    return flips


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
    """Encode every item of `dataset` (in index order) with `autoencoder` into one .safetensors file, one
    posterior draw per image (ditk-latents/1; training uses `encode_moments` instead).

    flips: also store the encoding of each mirrored image (None: iff the dataset has hflip on).
    The posterior draws come from one CPU generator seeded with `seed`, consumed batch by batch (first the
    images, then their mirrors), so the file depends only on (data, autoencoder, seed, batch_size), not on
    the device.
    """
    if dtype not in ST_DTYPES:
        raise ConfigError(f"latent dtype '{dtype}' is not one of {', '.join(ST_DTYPES)}")
    flips = _check_flips(dataset, flips)
    n = len(dataset)
    if n == 0:
        raise ConfigError("the dataset is empty: nothing to encode")
    torch_dtype, st_dtype = ST_DTYPES[dtype]
    autoencoder.to(device)
    generator = torch.Generator().manual_seed(int(seed))
    loader = torch.utils.data.DataLoader(_Unflipped(dataset), batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, drop_last=False)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc="encoding", unit="img", file=sys.stderr)
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp, open(tmp, "wb") as f:
        writer = None
        for x, y in loader:
            x = x.to(device)
            views = {"latents": autoencoder.encode(x, generator=generator)}
            if flips:
                views["latents_flipped"] = autoencoder.encode(x.flip(-1), generator=generator)
            views = {k: v.to("cpu", torch_dtype) for k, v in views.items()}
            if writer is None:
                image_shape = list(getattr(dataset, "shape", ())) or list(x.shape[1:])
                metadata = {"format": FORMAT, **_common_metadata(dataset, autoencoder, image_shape, n, flips, dtype),
                            "seed": str(int(seed))}
                metadata.update({str(k): str(v) for k, v in (extra_metadata or {}).items()})
                writer = _Writer(f, n, st_dtype, metadata)
            writer.add(views, y)
            if bar is not None:
                bar.update(len(y))
        writer.finish()
    if bar is not None:
        bar.close()
    return out_path


@torch.no_grad()
def encode_moments(
    dataset,
    autoencoder,
    out_path,
    start: int = 0,
    stop: Optional[int] = None,
    batch_size: int = 32,
    device="cpu",
    *,
    dtype: str = "float32",
    flips: Optional[bool] = None,
    num_workers: int = 0,
    log=None,
    log_every: float = 60.0,
    extra_metadata: Optional[dict] = None,
) -> Path:
    """Encode items start..stop of `dataset` into one ditk-latent-moments/1 shard: the posterior's mean and
    std (autoencoder.posterior), no random draw, so the shard depends only on the data and the VAE.

    dtype float32 keeps a VAE's float32 moments exactly; float16 / bfloat16 halve the file. `log(msg)`, if
    given, is called every `log_every` seconds and at the end with the progress (images, images/s).
    """
    if dtype not in ST_DTYPES:
        raise ConfigError(f"latent dtype '{dtype}' is not one of {', '.join(ST_DTYPES)}")
    if not hasattr(autoencoder, "posterior"):
        raise ConfigError(f"autoencoder '{getattr(autoencoder, 'name', autoencoder)}' has no posterior to store: "
                          "set train.precompute_latents=false")
    flips = _check_flips(dataset, flips)
    stop = len(dataset) if stop is None else int(stop)
    n = stop - int(start)
    if n <= 0:
        raise ConfigError("the dataset is empty: nothing to encode")
    torch_dtype, st_dtype = ST_DTYPES[dtype]
    autoencoder.to(device)
    subset = torch.utils.data.Subset(_Unflipped(dataset), range(int(start), stop))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         drop_last=False)
    out_path = Path(out_path)
    t0 = last = time.perf_counter()
    with atomic_path(out_path) as tmp, open(tmp, "wb") as f:
        writer = None
        for x, y in loader:
            x = x.to(device)
            views = {"moments": torch.cat(autoencoder.posterior(x), dim=1)}
            if flips:
                views["moments_flipped"] = torch.cat(autoencoder.posterior(x.flip(-1)), dim=1)
            views = {k: v.to("cpu", torch_dtype) for k, v in views.items()}
            if writer is None:
                image_shape = list(getattr(dataset, "shape", ())) or list(x.shape[1:])
                metadata = {"format": MOMENTS_FORMAT,
                            **_common_metadata(dataset, autoencoder, image_shape, len(dataset), flips, dtype),
                            "vae_dtype": str(getattr(autoencoder, "dtype", torch.float32)).replace("torch.", ""),
                            "start": str(int(start)), "stop": str(stop)}
                metadata.update({str(k): str(v) for k, v in (extra_metadata or {}).items()})
                writer = _Writer(f, n, st_dtype, metadata)
            writer.add(views, y)
            now = time.perf_counter()
            if log is not None and (now - last >= log_every or writer.done == n):
                last = now
                log(f"{writer.done}/{n} images ({writer.done / max(now - t0, 1e-9):.1f}/s)")
        writer.finish()
    return out_path


class PosteriorDraw:
    """The loop's encoder for a moments cache: items are cat(mean, std) and every step draws a fresh latent
    (mean + std * eps - shift) * scale, as `autoencoder.encode` of the pixels does.

    eps is drawn for the *global* batch from the step's generator and this process takes its rows
    [rank::world], the positions the sampler gave it: so W processes draw what 1 process draws for the same
    global batch, and with 1 process the draw is encode's own (autoencoder.posterior_noise)."""

    downsample = 1

    def __init__(self, autoencoder, rank: int = 0, world: int = 1, sample_posterior: Optional[bool] = None):
        self.autoencoder = autoencoder
        self.name = f"posterior of {getattr(autoencoder, 'name', 'autoencoder')}"
        self.rank, self.world = int(rank), int(world)
        self.sample_posterior = bool(getattr(autoencoder, "sample_posterior", True)
                                     if sample_posterior is None else sample_posterior)

    def latent_channels(self, in_channels: int) -> int:
        return in_channels // 2

    def to(self, device) -> "PosteriorDraw":
        return self

    @torch.no_grad()
    def encode(self, moments: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        ae = self.autoencoder
        dtype = getattr(ae, "dtype", torch.float32)  # the VAE's own dtype: its moments were stored exactly
        mean, std = (m.to(dtype) for m in moments.chunk(2, dim=1))
        if not self.sample_posterior:
            return ae.from_posterior(mean, std, None)
        eps = ae.posterior_noise((len(moments) * self.world, *mean.shape[1:]), generator)[self.rank :: self.world]
        return ae.from_posterior(mean, std, eps)


class EncodeAndDraw:
    """The loop's encoder without a cache: encode the pixels of every batch, then draw as PosteriorDraw does
    (the global batch's eps, this process's rows). With one process this is `autoencoder.encode` bit for bit;
    with several it keeps their draws independent and equal to one process's (each process drawing its own
    local batch from the shared step generator would give every process the same eps)."""

    def __init__(self, autoencoder, rank: int = 0, world: int = 1):
        self.autoencoder = autoencoder
        self.draw = PosteriorDraw(autoencoder, rank, world)
        self.name, self.downsample = autoencoder.name, autoencoder.downsample

    def latent_channels(self, in_channels: int) -> int:
        return self.autoencoder.latent_channels(in_channels)

    def to(self, device) -> "EncodeAndDraw":
        self.autoencoder.to(device)
        return self

    @torch.no_grad()
    def encode(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return self.draw.encode(torch.cat(self.autoencoder.posterior(x), dim=1), generator)


@dataclass
class LatentsConfig:
    path: str = ""  # an encode_dataset .safetensors, or a latent cache's manifest.json (train.precompute_latents)
    hflip: Optional[bool] = None  # None: use the mirrored latents iff the file has them
    flip_seed: int = 0


def _read_manifest(path: Path) -> tuple[list, dict]:
    """A latent cache's manifest.json -> ([(file, start, stop)], metadata). ConfigError if unreadable."""
    try:
        info = json.loads(path.read_text())
        shards = [(path.parent / str(e["file"]), int(e["start"]), int(e["stop"])) for e in info["shards"]]
        metadata = {str(k): str(v) for k, v in dict(info.get("metadata", {})).items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"'{path}' is not a readable latent cache manifest ({type(e).__name__}): delete its "
                          "folder and train again to re-encode") from None
    return shards, metadata


class Latents(torch.utils.data.Dataset):
    """Items of an encode_dataset file or of a latent cache (manifest.json + shards), read lazily
    (memory-mapped): (latent (C, h, w), label) for ditk-latents/1, (cat(mean, std) (2C, h, w), label) for
    moments (PosteriorDraw turns them into latents), float32 either way."""

    def __init__(self, path: str, hflip: Optional[bool] = None, flip_seed: int = 0):
        from safetensors import safe_open

        self.path = str(path)
        p = Path(self.path).expanduser()
        if p.is_dir():
            p = p / "manifest.json"
        if not self.path or not p.is_file():
            raise ConfigError(
                f"data.path '{self.path}' is not a latents file: train once with train.precompute_latents=true, which writes a latent cache (its manifest.json)"
            )
        if p.suffix == ".json":
            shards, self.metadata = _read_manifest(p)
        else:
            shards, self.metadata = [(p, 0, None)], None
        self.files, self.starts, labels, keys = [], [], [], None
        for file, first, _ in shards:
            try:
                with safe_open(str(file), framework="pt") as f:
                    names = set(f.keys())
                    if self.metadata is None:
                        self.metadata = dict(f.metadata() or {})
                    kind = "moments" if "moments" in names else "latents"
                    if kind not in names or "labels" not in names:
                        raise ConfigError(f"'{file}' has no 'latents' (or 'moments') and 'labels' tensors: not a ditk latents file")
                    if keys not in (None, names):
                        raise ConfigError(f"'{file}' holds other tensors than the cache's first shard: re-encode the cache")
                    keys = names
                    labels.append(f.get_tensor("labels").long())
                    self.shape = tuple(f.get_slice(kind).get_shape()[1:])
            except ConfigError:
                raise
            except Exception as e:  # safetensors raises its own error types for corrupt files
                raise ConfigError(f"'{file}' is not a readable .safetensors file ({type(e).__name__}: {e})") from e
            self.files.append(str(file))
            self.starts.append(first)
        self.kind = kind
        self.labels = torch.cat(labels)
        stored_flips = f"{kind}_flipped" in keys
        self.stored_flips = stored_flips
        if hflip and not stored_flips:
            raise ConfigError(
                f"'{self.path}' was encoded without mirrored latents: re-encode with flips or set data.hflip=false"
            )
        self.hflip = stored_flips if hflip is None else bool(hflip)
        self.flip_seed = int(flip_seed)
        self.file = self.files[0]
        num_classes = int(self.metadata.get("num_classes", 0) or 0)
        self.num_classes = num_classes or (int(self.labels.max()) + 1 if len(self.labels) else 0)
        names = json.loads(self.metadata.get("class_names", "null") or "null")
        self.class_names = names
        self.scale_factor = float(self.metadata.get("scale_factor", 1.0))
        self.autoencoder = self.metadata.get("autoencoder", "")
        self.epoch = 0
        self._handles = {}

    def __getstate__(self):  # DataLoader workers re-open the files themselves
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def _slice(self, shard: int, name: str):
        handle = self._handles.get(shard)
        if handle is None:
            from safetensors import safe_open

            handle = self._handles[shard] = safe_open(self.files[shard], framework="pt")
        return handle.get_slice(name)

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
        shard = bisect.bisect_right(self.starts, index) - 1
        row = index - self.starts[shard]
        z = self._slice(shard, f"{self.kind}_flipped" if flip else self.kind)[row : row + 1][0]
        return z.float(), int(self.labels[index])

    def __getitem__(self, item):
        index, epoch = split_index(item, self.epoch)
        return self.load(index, self.is_flipped(index, epoch))


@DATASETS.register("latents", config=LatentsConfig)
def build_latents(cfg) -> Latents:
    """Pre-encoded latents: one .safetensors file, or a latent cache's manifest.json (`train.precompute_latents`), with stored flips."""
    return Latents(str(cfg.path), cfg.hflip, int(cfg.flip_seed))
