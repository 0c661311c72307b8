"""Feature statistics: the `.npz` files `--save-stats` writes and the cache of reference statistics.

A ditk statistics file holds `mu` (D,) and `sigma` (D, D) as clean-fid computes them (np.mean and
np.cov of the features), the features `feats` (N, D) (KID needs them), and `ditk_meta`, a JSON string
naming the extractor, mode, weights sha256, image count and resolution, so that a file is never
compared under another protocol by mistake. Foreign files with only `mu` and `sigma` are read too: the
ADM reference batches (`VIRTUAL_imagenet256_labeled.npz`, which also hold `mu_s`, `sigma_s` and `arr_0`)
and clean-fid or pytorch-fid statistics.

The cache lives in a ditk-managed folder ($DITK_CACHE_DIR/fid-stats, default ~/.cache/ditk/fid-stats),
never in site-packages (where clean-fid writes), one file per (data set, resolution, mode, extractor,
weights, content).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..atomic import atomic_path
from ..errors import DitkError

FORMAT = "ditk-fid-stats/1"
CACHE_ENV = "DITK_CACHE_DIR"
ADM_KEYS = ("mu_s", "sigma_s", "arr_0")  # what tells an ADM reference batch from plain mu/sigma files


@dataclass
class Stats:
    mu: np.ndarray  # (D,)
    sigma: np.ndarray  # (D, D)
    feats: Optional[np.ndarray]  # (N, D); None when the file has none (then no KID)
    source: str = ""
    meta: dict = field(default_factory=dict)  # empty for foreign files
    layout: str = "ditk"  # ditk | adm | plain

    @property
    def n(self) -> Optional[int]:
        if self.feats is not None:
            return int(len(self.feats))
        return self.meta.get("n")

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])


def from_features(feats: np.ndarray, meta: dict, source: str = "") -> Stats:
    # clean-fid's own estimate (fid.py: np.mean(axis=0), np.cov(rowvar=False)), dtypes included.
    return Stats(mu=np.mean(feats, axis=0), sigma=np.cov(feats, rowvar=False), feats=feats,
                 source=source, meta={"format": FORMAT, "n": int(len(feats)), **meta}, layout="ditk")


def save(stats: Stats, path: str | os.PathLike) -> Path:
    path = Path(path)
    arrays = {"mu": stats.mu, "sigma": stats.sigma, "ditk_meta": np.array(json.dumps(stats.meta, sort_keys=True))}
    if stats.feats is not None:
        arrays["feats"] = stats.feats
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
        np.savez(f, **arrays)
    return path


def load(path: str | os.PathLike, role: str = "stats") -> Stats:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = set(f.files)
            if not {"mu", "sigma"} <= keys:
                raise DitkError(f"{role} {path} is not a statistics file: it lacks mu and sigma")
            # dtypes as stored: clean-fid's mu of float32 features is float32, and a cached file must give
            # the very number a fresh computation gives
            mu, sigma = np.asarray(f["mu"]), np.asarray(f["sigma"])
            feats = np.asarray(f["feats"]) if "feats" in keys else None
            meta = json.loads(str(f["ditk_meta"])) if "ditk_meta" in keys else {}
    except (OSError, ValueError) as e:
        raise DitkError(f"{role} {path} is not a readable statistics file ({type(e).__name__}: {e})") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise DitkError(f"{role} {path}: mu has shape {mu.shape} and sigma {sigma.shape}; expected (D,) and (D, D)")
    if feats is not None and (feats.ndim != 2 or feats.shape[1] != mu.shape[0]):
        raise DitkError(f"{role} {path}: feats has shape {feats.shape}, expected (N, {mu.shape[0]})")
    layout = "ditk" if meta else ("adm" if keys & set(ADM_KEYS) else "plain")
    return Stats(mu=mu, sigma=sigma, feats=feats, source=str(path), meta=meta, layout=layout)


def cache_root(explicit: Optional[str | os.PathLike] = None) -> Path:
    """--cache-dir, else $DITK_CACHE_DIR/fid-stats, else ~/.cache/ditk/fid-stats."""
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get(CACHE_ENV)
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "ditk") / "fid-stats"


def cache_path(root: Path, name: str, resolution: str, content_key: str, extractor) -> Optional[Path]:
    """The cache file for a reference set, or None for an extractor without a weights checksum (a custom or
    random-weight extractor has no identity that could key a cache)."""
    if extractor.weights_sha256 is None:
        return None
    key = json.dumps([FORMAT, content_key, extractor.name, extractor.mode, extractor.weights_sha256, extractor.resize])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "data"
    return root / f"{slug}-{resolution}-{extractor.mode}-{extractor.name}-{digest}.npz"
