"""Structure preservation of an edit: PSNR and SSIM to the source restricted to the pixels the edit should keep.

The changed-stroke mask says which pixels an edit from the source towards the target is *expected* to change;
it does not look at the edit, so every editor is scored over the same pixels:

    changed = dilate_r( |source - prototype(target)| > threshold )      (any channel, images in [-1, 1])

prototype(c) is the mean training image of class c (`class_prototypes`), threshold 0.5 is a quarter of the
[-1, 1] range, and dilate_r a (2r+1) x (2r+1) max filter. On the 8 x 8 digits r = 0: one pixel is an eighth of
the image, and a 3 x 3 dilation marks 85 % of the held-out digits' pixels as changed (36 % without it). Where no
prototype exists (another data set), `ditk edit --mask` gives the region to change, and without one the mask falls
back to the pixels the edit itself moved by more than the threshold (then it depends on the editor: a weaker
edit is scored over more pixels).

Masked SSIM is the mean of the SSIM map (scikit-image's, the same window and data range as `artefact.ssim`,
averaged over channels) over the kept pixels. scikit-image's own mean leaves out a border of (win - 1) / 2
pixels; the masked mean keeps them (their local statistics use reflected neighbours), because on 8 x 8 images with
a 7 x 7 window that border is all but the 2 x 2 centre. Masked PSNR is `artefact.psnr` with the mask.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

STROKE_THRESHOLD = 0.5


def ssim_window(side: int) -> int:
    """The SSIM window of `artefact.ssim`: 7, or the largest odd size that fits the image."""
    return min(7, side if side % 2 else side - 1)


def ssim_maps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) images in [-1, 1] -> (N, H, W) SSIM maps (float64, mean over channels)."""
    from skimage.metrics import structural_similarity

    out = []
    for x, y in zip(a.double().cpu().numpy(), b.double().cpu().numpy()):
        _, s = structural_similarity(x, y, data_range=2.0, channel_axis=0, win_size=ssim_window(min(x.shape[-2:])),
                                     full=True)
        out.append(torch.from_numpy(s).mean(0))
    return torch.stack(out)


def masked_ssim(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor) -> list[float]:
    """Per image: mean SSIM map over the pixels where keep (N, 1, H, W) is 1; NaN where it keeps none."""
    maps = ssim_maps(a, b)
    m = keep.double().cpu()[:, 0]
    count = m.flatten(1).sum(1)
    total = (maps * m).flatten(1).sum(1)
    return [float(t / c) if c > 0 else float("nan") for t, c in zip(total, count)]


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """(N, 1, H, W) {0, 1} -> its (2r+1) x (2r+1) max-filter (r = 0: unchanged)."""
    if radius <= 0:
        return mask
    return F.max_pool2d(mask.float(), 2 * radius + 1, stride=1, padding=radius)


def changed_strokes(source: torch.Tensor, reference: torch.Tensor, threshold: float = STROKE_THRESHOLD,
                    radius: int = 0) -> torch.Tensor:
    """(N, 1, H, W) {0, 1}: pixels where source and reference (the target's prototype, or the edit) differ by more
    than `threshold` in any channel, dilated by `radius`."""
    diff = (source.float() - reference.float()).abs().amax(dim=1, keepdim=True) > threshold
    return dilate(diff.float(), radius)


@functools.lru_cache(maxsize=1)
def digits_prototypes() -> torch.Tensor:
    """(10, 1, 8, 8): the mean training digit of each class, in [-1, 1]."""
    from ..data.digits import Digits

    d = Digits(split="train")
    return torch.stack([d.images[d.labels == c].mean(0) for c in range(10)])


def class_prototypes(data_name: str) -> Optional[torch.Tensor]:
    """Per-class mean training images of an embedded data set (digits), else None."""
    return digits_prototypes() if data_name == "digits" else None


def preservation(source: torch.Tensor, edited: torch.Tensor, changed: torch.Tensor) -> list[dict]:
    """Per image: PSNR and SSIM to the source over the unchanged pixels, and the changed fraction of the mask."""
    from .artefact import psnr

    keep = 1.0 - changed.float()
    return [{"psnr_outside_changed_db": p, "ssim_outside_changed": s, "mask_changed_fraction": float(c.mean())}
            for p, s, c in zip(psnr(edited, source, keep), masked_ssim(edited, source, keep), changed)]
