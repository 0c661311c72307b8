"""FID and KID between two sets, computed by clean-fid.

ditk adds what a cluster user needs around clean-fid and changes none of its arithmetic: the feature
pipeline is clean-fid's (`get_files_features` for folders; for arrays its `ResizeDataset` reading rows
instead of files, then `get_batch_features`), the Fréchet distance is `cleanfid.fid.frechet_distance` and
KID is `cleanfid.fid.kernel_distance`. What ditk adds: inputs checked up front, weights by path, reference
statistics cached and saved with their protocol, KID seeded and reported with its spread over subsets,
and stdout kept for the one JSON result (clean-fid prints to stdout; ditk sends that to stderr).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from .. import __version__
from ..errors import DitkError
from . import stats as stats_io
from .extractors import ExtractorHandle, FeatureExtractor
from .inputs import Images, Side, check_pair, load_side
from .stats import Stats


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), clean-fid's implementation."""
    from cleanfid.fid import frechet_distance as clean_fd

    try:
        with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # SciPy's notice about clean-fid's sqrtm(disp=)
            return float(clean_fd(mu1, sigma1, mu2, sigma2))
    except ValueError as e:  # "Imaginary component ...": (S1 S2)^1/2 is numerically not real
        raise DitkError(f"the Fréchet distance is numerically unstable here ({e}): use more images than the "
                        f"feature dimension ({len(np.atleast_1d(mu1))})") from None


def kernel_distance(feats1: np.ndarray, feats2: np.ndarray, subsets: int = 100, subset_size: int = 1000,
                    seed: int = 0) -> tuple[float, float]:
    """KID: mean and standard deviation over `subsets` random subsets, each scored by clean-fid.

    clean-fid's kernel_distance averages its subsets with the unseeded global NumPy RNG. Calling it once per
    subset under a seeded RNG gives the same estimator (its average is the mean returned here), repeatable,
    plus the spread that torch-fidelity reports as kid_std. The global RNG state is restored afterwards.
    """
    from cleanfid.fid import kernel_distance as clean_kd

    state = np.random.get_state()
    np.random.seed(seed)
    try:
        values = np.array([clean_kd(feats1, feats2, num_subsets=1, max_subset_size=subset_size)
                           for _ in range(subsets)])
    finally:
        np.random.set_state(state)
    return float(values.mean()), float(values.std())


def _auto_workers(count: int) -> int:
    # Worker processes pay off only when resizing dominates (thousands of images, 299x299 bicubic).
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if count < 1000 or cpus < 2 else min(8, cpus)


class ArrayResizeDataset(torch.utils.data.Dataset):
    """clean-fid's ResizeDataset over the rows of a uint8 (N, H, W, C) array instead of image files.

    Each row goes through the same steps as a file in ResizeDataset.__getitem__ after PIL's
    `convert('RGB')`: grayscale is replicated to RGB (what `convert('RGB')` does), then clean-fid's resizer,
    then the same tensor conversion. So an `.npz` batch and a folder of its PNGs give the same features.
    """

    def __init__(self, array: np.ndarray, mode: str, fn_resize=None):
        from cleanfid.utils import ResizeDataset

        self._base = ResizeDataset(files=[], mode=mode)
        if fn_resize is not None:
            self._base.fn_resize = fn_resize
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i):
        img_np = np.asarray(self.array[i])
        if img_np.shape[-1] == 1:
            img_np = np.repeat(img_np, 3, axis=-1)
        base = self._base
        img_resized = base.fn_resize(base.custom_image_tranform(img_np))
        if img_resized.dtype == np.uint8:
            return base.transforms(np.array(img_resized)) * 255
        return base.transforms(img_resized)


def compute_features(images: Images, extractor: FeatureExtractor, *, batch_size: int = 64,
                     num_workers: Optional[int] = None, progress: bool = True) -> np.ndarray:
    """(N, D) features of a set, through clean-fid's pipeline."""
    from cleanfid.fid import get_batch_features, get_files_features
    from tqdm import tqdm

    workers = _auto_workers(images.count) if num_workers is None else num_workers
    desc = f"{images.role} features"
    with contextlib.redirect_stdout(sys.stderr):
        if images.files is not None:
            return get_files_features(images.files, model=extractor.model, num_workers=workers,
                                      batch_size=batch_size, device=extractor.device, mode=extractor.mode,
                                      custom_fn_resize=extractor.fn_resize, description=desc, verbose=progress)
        dataset = ArrayResizeDataset(images.array(), extractor.mode, extractor.fn_resize)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False,
                                             num_workers=workers)
        batches = tqdm(loader, desc=desc, file=sys.stderr, disable=not progress)
        return np.concatenate([get_batch_features(batch, extractor.model, extractor.device) for batch in batches])


def _protocol(extractor: FeatureExtractor, images: Images) -> dict:
    return {"extractor": extractor.name, "mode": extractor.mode, "weights_sha256": extractor.weights_sha256,
            "resize": extractor.resize, "feature_dim": extractor.dim, "resolution": images.resolution,
            "channels": images.channels, "source": images.source, "ditk_version": __version__}


def _check_stats(stats: Stats, handle: ExtractorHandle, role: str) -> None:
    """A statistics file is only comparable under the protocol it was computed with."""
    if stats.layout == "ditk":
        got = (stats.meta.get("extractor"), stats.meta.get("mode"))
        if got != (handle.name, handle.mode):
            raise DitkError(f"{role} statistics {stats.source} were computed with --extractor {got[0]} --mode "
                            f"{got[1]}, not --extractor {handle.name} --mode {handle.mode}: pass the same options "
                            f"or recompute them")
    elif stats.layout == "adm":
        if (handle.name, handle.mode) != ("inception", "legacy_tensorflow"):
            raise DitkError(f"{role} {stats.source} is an ADM reference batch: its mu/sigma come from TensorFlow's "
                            f"Inception, so only --extractor inception --mode legacy_tensorflow gives comparable "
                            f"(DiT-paper) numbers")
    else:
        print(f"[ditk] note: {role} statistics {stats.source} carry no protocol record; they must come from "
              f"--extractor {handle.name} --mode {handle.mode} for the FID to mean anything", file=sys.stderr)


def _check_weights(files: list[tuple[Stats, str]], handle: ExtractorHandle) -> None:
    """Statistics recorded with other weights or dimensions than the extractor's (or than each other's) do
    not compare. Run before any image is embedded, so a mismatch costs nothing."""
    expected = handle.get().weights_sha256 if handle.built else None
    for stats, role in files:
        found = stats.meta.get("weights_sha256")
        expected = expected or found
        if found and expected != found:
            raise DitkError(f"{role} statistics {stats.source} were computed with other {handle.name} weights "
                            f"(sha256 {found[:12]}..., not {expected[:12]}...): recompute them")
        if handle.built and stats.dim != handle.get().dim:
            raise DitkError(f"{role} statistics {stats.source} are {stats.dim}-d but --extractor {handle.name} "
                            f"gives {handle.get().dim}-d features")


def side_stats(side: Side, handle: ExtractorHandle, *, cache_root: Optional[Path] = None, batch_size: int = 64,
               num_workers: Optional[int] = None, progress: bool = True) -> tuple[Stats, dict]:
    """Statistics of one side, and how they were obtained ({"cache": path or None, "cache_hit": bool})."""
    if isinstance(side, Stats):
        return side, {"cache": None, "cache_hit": False}
    extractor = handle.get()
    path = None
    if cache_root is not None:
        path = stats_io.cache_path(cache_root, side.name, side.resolution, side.cache_key, extractor)
    if path is not None and path.is_file():
        cached = stats_io.load(path, "cached")
        if cached.n == side.count:
            print(f"[ditk] {side.role}: reusing cached statistics {path}", file=sys.stderr)
            return cached, {"cache": str(path), "cache_hit": True}
    feats = compute_features(side, extractor, batch_size=batch_size, num_workers=num_workers, progress=progress)
    if feats.shape != (side.count, extractor.dim):
        raise DitkError(f"feature extractor '{extractor.name}' returned features of shape {feats.shape} for "
                        f"{side.count} images, expected ({side.count}, {extractor.dim})")
    stats = stats_io.from_features(feats, _protocol(extractor, side), source=side.source)
    if path is not None:
        stats_io.save(stats, path)
    return stats, {"cache": str(path) if path else None, "cache_hit": False}


def _warn_rank(stats: Stats, role: str) -> None:
    n = stats.n
    if n is not None and n <= stats.dim:
        print(f"[ditk] note: {role} has {n} images for {stats.dim}-d features: its covariance is singular, so the "
              f"FID is biased upwards and noisy (FID-50K uses 50,000 images)", file=sys.stderr)


def evaluate(gen: Union[str, os.PathLike, Side], ref: Union[str, os.PathLike, Side], handle: ExtractorHandle, *,
             cache_dir: Optional[str] = None, use_cache: bool = True, save_stats: Optional[str] = None,
             kid: bool = True, kid_subsets: int = 100, kid_subset_size: int = 1000, seed: int = 0,
             batch_size: int = 64, num_workers: Optional[int] = None, progress: bool = True) -> dict:
    """FID (and KID when both sides have features) of GEN against REF. Returns the JSON-ready result."""
    start = time.perf_counter()
    gen = gen if isinstance(gen, (Images, Stats)) else load_side(gen, "gen")
    ref = ref if isinstance(ref, (Images, Stats)) else load_side(ref, "ref")
    check_pair(gen, ref)
    files = [(side, role) for side, role in ((gen, "gen"), (ref, "ref")) if isinstance(side, Stats)]
    for stats, role in files:
        _check_stats(stats, handle, role)
    if len(files) < 2:
        handle.get()  # images will be embedded: read and check the weights now
    _check_weights(files, handle)
    common = dict(batch_size=batch_size, num_workers=num_workers, progress=progress)
    gen_stats, _ = side_stats(gen, handle, **common)
    ref_stats, ref_info = side_stats(ref, handle, cache_root=stats_io.cache_root(cache_dir) if use_cache else None,
                                     **common)
    if gen_stats.dim != ref_stats.dim:
        raise DitkError(f"gen features are {gen_stats.dim}-d but ref features are {ref_stats.dim}-d: the two sides "
                        f"come from different feature extractors")
    for stats, role in ((gen_stats, "gen"), (ref_stats, "ref")):
        _warn_rank(stats, role)

    fid = frechet_distance(gen_stats.mu, gen_stats.sigma, ref_stats.mu, ref_stats.sigma)
    kid_mean = kid_std = None
    if kid and gen_stats.feats is not None and ref_stats.feats is not None:
        kid_mean, kid_std = kernel_distance(gen_stats.feats, ref_stats.feats, kid_subsets, kid_subset_size, seed)
    elif kid:
        print("[ditk] note: no KID: a statistics file without features (mu/sigma only) was given", file=sys.stderr)
    if save_stats:
        stats_io.save(ref_stats, save_stats)

    protocol = {
        "mode": handle.mode,
        "feature_extractor": handle.name,
        "feature_dim": gen_stats.dim,
        "weights_sha256": _weights_sha(handle, gen_stats, ref_stats),
        "resize": handle.get().resize if handle.built else (ref_stats.meta or gen_stats.meta).get("resize"),
    }
    return comparison_result("fid", fid, (kid_mean, kid_std), gen_stats, ref_stats, protocol,
                             gen=_describe(gen), ref=_describe(ref), ref_info=ref_info, save_stats=save_stats,
                             kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, seed=seed, start=start)


def comparison_result(name: str, distance: float, kid: tuple, gen_stats: Stats, ref_stats: Stats, protocol: dict, *,
                      gen: dict, ref: dict, ref_info: dict, save_stats: Optional[str], kid_subsets: int,
                      kid_subset_size: int, seed: int, start: float) -> dict:
    """The one JSON result of a comparison (image FID, audio FAD): the distance under `name`, KID (mean, std) or
    (None, None), the set sizes, then the feature protocol's own keys, then what both report alike."""
    kid_mean, kid_std = kid
    return {
        name: distance,
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "n_gen": gen_stats.n,
        "n_ref": ref_stats.n,
        **protocol,
        "gen": gen,
        "ref": ref,
        "ref_stats_cache": ref_info["cache"],
        "ref_stats_cache_hit": ref_info["cache_hit"],
        "saved_stats": str(save_stats) if save_stats else None,
        "kid_subsets": kid_subsets if kid_mean is not None else None,
        "kid_subset_size": min(kid_subset_size, gen_stats.n, ref_stats.n) if kid_mean is not None else None,
        "seed": seed,
        "seconds": round(time.perf_counter() - start, 3),
        "ditk_version": __version__,
        "clean_fid_version": _clean_fid_version(),
    }


def compute_stats(side: Union[str, os.PathLike, Side], handle: ExtractorHandle, out: str, *, batch_size: int = 64,
                  num_workers: Optional[int] = None, progress: bool = True) -> dict:
    """Statistics of one set, written to `out` (reference statistics to reuse on every evaluation)."""
    start = time.perf_counter()
    side = side if isinstance(side, (Images, Stats)) else load_side(side, "ref")
    if isinstance(side, Stats):
        _check_stats(side, handle, "ref")
        _check_weights([(side, "ref")], handle)
    stats, _ = side_stats(side, handle, batch_size=batch_size, num_workers=num_workers, progress=progress)
    stats_io.save(stats, out)
    return {"saved_stats": str(out), "n": stats.n, "mode": handle.mode, "feature_extractor": handle.name,
            "feature_dim": stats.dim, "weights_sha256": _weights_sha(handle, stats, stats), "source": _describe(side),
            "seconds": round(time.perf_counter() - start, 3), "ditk_version": __version__,
            "clean_fid_version": _clean_fid_version()}


def _weights_sha(handle: ExtractorHandle, *stats: Stats) -> Optional[str]:
    if handle.built:
        return handle.get().weights_sha256
    for s in stats:
        if s.meta.get("weights_sha256"):
            return s.meta["weights_sha256"]
    return None


def _describe(side: Side) -> dict:
    if isinstance(side, Stats):
        return {"path": side.source, "kind": f"stats ({side.layout})"}
    return {"path": side.source, "kind": side.kind, "resolution": side.resolution, "channels": side.channels}


def _clean_fid_version() -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("clean-fid")
    except PackageNotFoundError:
        return None
