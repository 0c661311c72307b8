"""FID and KID of a restored set against its ground truth, through `ditk evaluate-fid`'s own pipeline.

The features are clean-fid's (ditk.metrics.fid.compute_features on the uint8 images the PNGs hold), the distances
clean-fid's Fréchet distance and KID (mean and spread over subsets, seeded). Which feature network: `auto` takes
the one made for the prior's data (`photos` for the photos crops, `digits` for the digits); Inception (`inception`,
weights by --weights-dir) for anything else, when the user has its weights.

FID on a few dozen images is biased upwards and noisy (the covariance of N images has rank N - 1 < the feature
dimension): compare values only at the same image count and extractor; KID is unbiased at any N but has a large
spread at small N (reported as kid_std).
"""

from __future__ import annotations

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


def fid_kid(restored: torch.Tensor, truth: torch.Tensor, extractor_name: str, weights_dir: Optional[str] = None,
            truth_features: Optional[np.ndarray] = None) -> dict:
    """FID and KID (x 1000 as well: the usual way to print it) of `restored` against `truth`."""
    from ..errors import DitkError
    from ..metrics.extractors import ExtractorHandle
    from ..metrics.fid import frechet_distance, kernel_distance

    extractor = ExtractorHandle(extractor_name, weights_dir=weights_dir).get()
    fr = features(restored, extractor).astype(np.float64)
    ft = features(truth, extractor).astype(np.float64) if truth_features is None else truth_features
    try:
        fid = round(float(frechet_distance(fr.mean(0), np.cov(fr, rowvar=False), ft.mean(0),
                                           np.cov(ft, rowvar=False))), 4)
    except DitkError:  # (S1 S2)^1/2 not real: far fewer images than feature dimensions
        fid = None
    m = min(len(fr), len(ft))
    if m <= 1000:  # the whole sets: KID's unbiased estimate itself (subsets of all N would all be the same)
        kid, kid_std = kernel_distance(fr, ft, subsets=1, subset_size=m)[0], None
    else:
        kid, kid_std = kernel_distance(fr, ft, subsets=100, subset_size=1000)
    return {"fid": fid, "kid": round(kid, 6), "kid_std": None if kid_std is None else round(kid_std, 6),
            "n": int(len(fr)),
            "extractor": extractor.name, "feature_dim": int(extractor.dim), "weights_sha256": extractor.weights_sha256,
            "reference": "the ground-truth images of this set"}
