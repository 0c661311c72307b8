"""`train.precompute_latents`: the data set's VAE posteriors, encoded once, sharded over the processes.

Layout (`train.latents_dir`, default <run>/latents):
    <latents_dir>/<key[:16]>/shard-<start>-<stop>.safetensors   items start..stop (ditk.data.latents.encode_moments)
    <latents_dir>/<key[:16]>/shard-<start>-<stop>.json          its size and checksum, written after it
    <latents_dir>/<key[:16]>/manifest.json                      the shards, written once all of them exist
`key` hashes what the stored moments depend on: the VAE's weights and config, ditk's autoencoder settings,
the data set (its config, class, items and their order, image shape, flips) and the storage dtype. A cache
made with anything else lives under another key, so a stale cache is never read; a complete one is reused
(on resume, or by another run pointing `train.latents_dir` at the same folder).

Each of W processes encodes its 1/W of the items (contiguous ranges), batched, under no_grad, into its own
shard (temp file, then rename), logging its progress on stderr. No collective waits on the encode: a process
that has finished writes a marker file and polls for the others' markers, so the process group's timeout
(accelerate's InitProcessGroupKwargs; 10-30 minutes by default) cannot fire however long or unbalanced the
encode is; under torchrun a process that fails stops the others. Rank 0 then writes the manifest, and every
process reads all the shards (memory-mapped: the sampler's rows are what it touches).

On each start, every shard listed by the manifest is checked (size and checksum, as checkpoints are: the
processes share the work): a damaged or truncated one is reported in one line and encoded again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

from ..atomic import clean_temp, write_text
from ..errors import ConfigError

MANIFEST = "manifest.json"
ENCODE_BATCH = 32  # images per VAE forward (two forwards with flips)
SHARD_ITEMS = 50_000  # at most this many items per shard: a killed encode loses at most one shard per process


def log(msg: str) -> None:
    print(f"[ditk] {msg}", file=sys.stderr, flush=True)


def _weights_digest(module) -> str:
    """xxh3-128 over every tensor of `module`'s state dict (name, dtype, shape, bytes): 0.3 s for SD's VAE here."""
    import torch
    import xxhash

    h = xxhash.xxh3_128()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _dataset_items(dataset) -> Optional[list]:
    """The data set's item list where it keeps one (image folders: (file, label)), as strings."""
    for attr in ("samples", "files"):
        items = getattr(dataset, attr, None)
        if isinstance(items, (list, tuple)):
            return [str(x) for x in items]
    return None


def cache_key(data_cfg: dict, autoencoder_cfg: dict, dataset, autoencoder, dtype: str, flips: bool) -> str:
    """sha256 of everything the stored moments depend on (not of the seed, world size or batch size)."""
    ae_cfg = {k: v for k, v in autoencoder_cfg.items() if k not in ("path", "subfolder")}  # the weights say it
    vae = getattr(autoencoder, "vae", None)
    description = {
        "format": "ditk-latent-moments/1",
        "autoencoder": ae_cfg,
        "vae_config": dict(vae.config) if vae is not None and hasattr(vae, "config") else None,
        "vae_weights": _weights_digest(vae) if vae is not None else None,
        "data": {k: v for k, v in data_cfg.items() if k != "flip_seed"},  # both flips are stored
        "dataset": type(dataset).__name__,
        "count": len(dataset),
        "shape": list(getattr(dataset, "shape", ())),
        "class_names": list(getattr(dataset, "class_names", None) or []),
        "items": _dataset_items(dataset),
        "dtype": dtype,
        "flips": bool(flips),
    }
    text = json.dumps(description, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def plan(n: int, world: int, shard_items: int = SHARD_ITEMS) -> list[list[tuple[int, int]]]:
    """Per process, its shards: W contiguous ranges covering 0..n (sizes differing by at most one), each cut
    into shards of at most `shard_items` items."""
    bounds = [n * r // world for r in range(world + 1)]
    out = []
    for r in range(world):
        a, b = bounds[r], bounds[r + 1]
        out.append([(i, min(i + shard_items, b)) for i in range(a, b, max(1, shard_items))])
    return out


def shard_name(start: int, stop: int) -> str:
    return f"shard-{start:09d}-{stop:09d}.safetensors"


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_manifest(folder: Path, key: str) -> Optional[dict]:
    """The folder's manifest if it is complete and made for `key`, else None."""
    info = _read_json(folder / MANIFEST)
    if not isinstance(info, dict) or info.get("key") != key or not isinstance(info.get("shards"), list):
        return None
    return info


def shard_problem(folder: Path, entry: dict) -> Optional[str]:
    """None when the shard file matches `entry` (its size and checksum), else what is wrong, in a few words."""
    from ..runs import _checksum

    path = folder / entry["file"]
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != int(entry["size"]):
        return f"has {size} bytes, {int(entry['size'])} expected: truncated or overwritten"
    if _checksum(path, str(entry.get("algorithm", "xxh3_128"))) != entry["checksum"]:
        return "does not match its checksum: damaged"
    return None


def _sidecar(folder: Path, start: int, stop: int, key: str) -> Optional[dict]:
    """The record a finished shard left beside it, if it was made for this key and range."""
    info = _read_json(folder / shard_name(start, stop).replace(".safetensors", ".json"))
    if isinstance(info, dict) and info.get("key") == key and (info.get("start"), info.get("stop")) == (start, stop):
        return info
    return None


def encode_shard(folder: Path, key: str, start: int, stop: int, dataset, autoencoder, *, device, dtype: str,
                 flips: bool, num_workers: int, rank: int) -> dict:
    """Encode items start..stop into their shard, then record its size and checksum beside it."""
    from ..runs import CHECKSUM, _checksum
    from .latents import encode_moments

    name = shard_name(start, stop)
    path = encode_moments(dataset, autoencoder, folder / name, start, stop, ENCODE_BATCH, device, dtype=dtype,
                          flips=flips, num_workers=num_workers, extra_metadata={"key": key},
                          log=lambda msg: log(f"rank {rank}: encoding {name}: {msg}"))
    entry = {"file": name, "start": start, "stop": stop, "key": key, "size": path.stat().st_size,
             "algorithm": CHECKSUM, "checksum": _checksum(path)}
    write_text(folder / name.replace(".safetensors", ".json"), json.dumps(entry) + "\n")
    return entry


def _wait_for_ranks(marks: Path, nonce: str, rank: int, world: int, poll: float = 1.0) -> None:
    """Mark this rank done, then wait (polling files, no collective: no timeout) until every rank is."""
    marks.mkdir(parents=True, exist_ok=True)
    (marks / f"{nonce}-{rank}").touch()
    last = time.monotonic()
    while True:
        waiting = [r for r in range(world) if not (marks / f"{nonce}-{r}").exists()]
        if not waiting:
            return
        if time.monotonic() - last > 60:
            last = time.monotonic()
            log(f"rank {rank}: waiting for rank(s) {', '.join(map(str, waiting))} to finish their latent shards")
        time.sleep(poll)


def prepare(root: Path, key: str, dataset, autoencoder, *, rank: int = 0, world: int = 1, device="cpu",
            dtype: str = "float32", flips: bool = False, num_workers: int = 0, nonce: str = "",
            barrier: Callable[[], None] = lambda: None, shard_items: int = SHARD_ITEMS) -> Path:
    """Make (or check and reuse) the cache for `key` under `root`; every process calls it. Returns the
    manifest's path. `nonce`: one string shared by the processes of this launch (rank 0's, broadcast);
    `barrier`: the process group's barrier (used only where no process has long work left)."""
    folder = Path(root) / key[:16]
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        # leftovers of a killed write; not a recent one, which may be another run's encode into a shared folder
        clean_temp(folder, older_than=600)
    barrier()
    listed = read_manifest(folder, key)
    if listed is not None:  # reuse: the processes check the listed shards between them
        entries = listed["shards"]
        mine = [e for i, e in enumerate(entries) if i % world == rank]
    else:  # a fresh encode: each process its own range (shards finished by an interrupted encode are kept)
        ranges = plan(len(dataset), world, shard_items)
        entries = [{"file": shard_name(a, b), "start": a, "stop": b} for share in ranges for a, b in share]
        mine = [{"file": shard_name(a, b), "start": a, "stop": b} for a, b in ranges[rank]]
    for entry in mine:
        expected = entry if "checksum" in entry else _sidecar(folder, entry["start"], entry["stop"], key)
        problem = shard_problem(folder, expected) if expected is not None else "missing"
        if problem is None:
            continue
        if problem != "missing":
            log(f"latent cache shard {folder / entry['file']} {problem}: encoding it again")
        elif listed is None and entry["start"] == 0:
            log(f"rank {rank}: encoding the data set's VAE posteriors once into {folder} ({len(dataset)} items over "
                f"{world} process(es)) for train.precompute_latents")
        encode_shard(folder, key, entry["start"], entry["stop"], dataset, autoencoder, device=device, dtype=dtype,
                     flips=flips, num_workers=num_workers, rank=rank)
    if world > 1:
        _wait_for_ranks(folder / ".ranks", nonce, rank, world)
    if rank == 0:
        shards = []
        for entry in entries:
            record = _sidecar(folder, entry["start"], entry["stop"], key) or (entry if "checksum" in entry else None)
            if record is None:
                raise ConfigError(f"latent cache shard {folder / entry['file']} has no record beside it after the "
                                  "encode: check that train.latents_dir is one folder shared by every process")
            shards.append({k: record[k] for k in ("file", "start", "stop", "size", "algorithm", "checksum")})
        from safetensors import safe_open

        with safe_open(str(folder / shards[0]["file"]), framework="pt") as f:
            metadata = {k: v for k, v in (f.metadata() or {}).items() if k not in ("start", "stop")}
        manifest = {"format": "ditk-latent-cache/1", "key": key, "count": len(dataset), "shards": shards,
                    "metadata": metadata}
        if listed != manifest:
            write_text(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        keep = {MANIFEST, ".ranks"} | {s["file"] for s in shards} | {s["file"].replace(".safetensors", ".json") for s in shards}
        for p in folder.iterdir():  # shards of an interrupted encode with another process count
            if p.name not in keep and p.name.startswith("shard-"):
                p.unlink()
    barrier()
    if rank == 0 and world > 1:
        shutil.rmtree(folder / ".ranks", ignore_errors=True)
    return folder / MANIFEST


def launch_nonce() -> str:
    """A fresh string for this launch, made by rank 0 and sent to every process (one object broadcast)."""
    import torch.distributed as dist

    nonce = [uuid.uuid4().hex]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(nonce, src=0)
    return nonce[0]


def cache_folder(cfg, run_path: Path) -> Path:
    """train.latents_dir, or <run>/latents."""
    return Path(os.path.expanduser(str(cfg.train.latents_dir))) if cfg.train.latents_dir else Path(run_path) / "latents"
