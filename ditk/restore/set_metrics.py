"""FID and KID of a restored set against its ground truth, through `ditk evaluate-fid`'s own pipeline.

The features are clean-fid's (ditk.metrics.fid.compute_features on the uint8 images the PNGs hold), the distances
clean-fid's Fréchet distance and KID (mean and spread over subsets, seeded). Which feature network: `auto` takes
the one made for the prior's data (`photos` for the photos crops, `digits` for the digits); Inception (`inception`,
weights by --weights-dir) for anything else, when the user has its weights.

FID on a few dozen images is biased upwards and noisy (the covariance of N images has rank N - 1 < the feature
dimension): compare values only at the same image count and extractor.

KID here is the unbiased MMD^2 U-statistic with KID's cubic kernel k(a, b) = (a.b / d + 1)^3 over the whole sets,
with the cross terms over pairs i != j only: restored image i and truth image i show the same scene, so they are
not independent draws, and clean-fid's estimator (cross terms over all pairs, i = j included) is biased downwards
for such paired sets (by 2/N times the mean excess similarity of the pairs; it went to -0.9 on 28 photos crops).
For independent sets the two estimators have the same expectation.
"""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import torch

AUTO = {"photos": "photos", "digits": "digits"}  # data set name -> the extractor made for it


def auto_extractor(data_name: Optional[str]) -> Optional[str]:
    return AUTO.get(str(data_name)) if data_name is not None else None


def features(images: torch.Tensor, extractor) -> np.ndarray:
    """(N, D) features of [-1, 1] images, quantised to uint8 as the PNGs are."""
    from ..io import to_uint8
    from ..metrics.fid import compute_features
    from ..metrics.inputs import Images

    arr = to_uint8(images)
    n, h, w, c = arr.shape
    side = Images(role="restored", source="restored images", kind="array", count=n, height=h, width=w, channels=c,
                  name="restored", cache_key="", load_array=lambda: arr)
    return compute_features(side, extractor, num_workers=0, progress=False)


@functools.lru_cache(maxsize=4)
def extractor_named(name: str, weights_dir: Optional[str] = None):
    from ..metrics.extractors import ExtractorHandle

    return ExtractorHandle(name, weights_dir=weights_dir).get()


def kid_paired(f1: np.ndarray, f2: np.ndarray) -> float:
    """MMD^2_u (Gretton et al. 2012, Eq. 3) of two equally long feature sets, KID's kernel, cross terms i != j."""
    n, d = f1.shape
    if n != len(f2) or n < 2:
        raise ValueError("kid_paired needs two sets of the same size >= 2")
    kxx, kyy, kxy = ((f1 @ f1.T / d + 1) ** 3, (f2 @ f2.T / d + 1) ** 3, (f1 @ f2.T / d + 1) ** 3)
    off = ~np.eye(n, dtype=bool)
    return float((kxx[off].sum() + kyy[off].sum() - kxy[off].sum() - kxy.T[off].sum()) / (n * (n - 1)))


def fid_of(fr: np.ndarray, ft: np.ndarray) -> Optional[float]:
    """clean-fid's Fréchet distance of two feature sets; None where (S1 S2)^1/2 is numerically not real."""
    from ..errors import DitkError
    from ..metrics.fid import frechet_distance

    try:
        return float(frechet_distance(fr.mean(0), np.cov(fr, rowvar=False), ft.mean(0), np.cov(ft, rowvar=False)))
    except DitkError:  # far fewer images than feature dimensions
        return None


def fid_kid(restored: torch.Tensor, truth: torch.Tensor, extractor_name: str, weights_dir: Optional[str] = None,
            truth_features: Optional[np.ndarray] = None, return_features: bool = False) -> dict:
    """FID and KID of `restored` against `truth` (same order: image i restores truth i), with the protocol."""
    extractor = extractor_named(extractor_name, weights_dir)
    fr = features(restored, extractor).astype(np.float64)
    ft = features(truth, extractor).astype(np.float64) if truth_features is None else truth_features
    fid = fid_of(fr, ft)
    kid = kid_paired(fr, ft) if len(fr) == len(ft) else None
    out = {"fid": None if fid is None else round(fid, 4), "kid": None if kid is None else round(kid, 6),
           "n": int(len(fr)), "extractor": extractor.name, "feature_dim": int(extractor.dim),
           "weights_sha256": extractor.weights_sha256, "reference": "the ground-truth images of this set"}
    if return_features:
        out["features"] = fr
    return out


def bootstrap_fid_difference(fa: np.ndarray, fb: np.ndarray, ft: np.ndarray, rounds: int = 100, seed: int = 0) -> dict:
    """Paired bootstrap over images of FID(a, truth) - FID(b, truth): the same resampled image indices for both
    sets and the truth. Returns the fraction of rounds where a's FID is lower and the 2.5 / 97.5 % quantiles."""
    rng = np.random.RandomState(seed)
    n = len(ft)
    diffs = []
    for _ in range(rounds):
        idx = rng.randint(0, n, n)
        fa_, fb_ = fid_of(fa[idx], ft[idx]), fid_of(fb[idx], ft[idx])
        if fa_ is not None and fb_ is not None:
            diffs.append(fa_ - fb_)
    diffs = np.array(diffs)
    return {"rounds": int(len(diffs)), "a_lower_fraction": float((diffs < 0).mean()),
            "diff_q025": float(np.quantile(diffs, 0.025)), "diff_q975": float(np.quantile(diffs, 0.975))}
