"""Feature extractors for FID/KID: the FEATURE_EXTRACTORS registry entries.

An extractor is what clean-fid calls a feature model plus the resize that feeds it. Images reach it the
way clean-fid's folder pipeline produces them: uint8 RGB HWC -> `fn_resize` -> float CHW in [0, 255]
-> `model` -> (N, D) features.

- `inception`: Inception-v3 pool3 (2048-d), the FID standard, exactly as clean-fid builds it for each mode,
  but with its weights read from the user's weights folder (sha256-checked) instead of downloaded.
- `digits`: a small CNN trained on scikit-learn's digits (`scripts/train_digits_extractor.py`), shipped in
  `weights/`; it makes FID meaningful for 8x8 digit samples on a CPU, where Inception is blind and slow.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import DitkError
from ..registry import FEATURE_EXTRACTORS
from . import offline

MODES = ("clean", "legacy_tensorflow", "legacy_pytorch")  # clean-fid's protocols

RESIZE_POLICY = {
    "clean": "PIL bicubic to 299x299 in float, no quantisation (clean-fid clean)",
    "legacy_tensorflow": "bilinear to 299x299 inside the network, as TensorFlow's FID and the ADM evaluator "
                         "(clean-fid legacy_tensorflow)",
    "legacy_pytorch": "torch bilinear to 299x299 (clean-fid legacy_pytorch, pytorch-fid)",
}

DIGITS_WEIGHTS = Path(__file__).parent / "weights" / "digits-cnn.safetensors"
# sha256 of the shipped file; `scripts/train_digits_extractor.py` prints it (and documents how it was made).
DIGITS_SHA256 = "bb8e150c2f4549caf512c5796971b0611598e7c52d5b21005bed743631605df5"


@dataclass
class ExtractorConfig:
    mode: str = "clean"  # clean | legacy_tensorflow | legacy_pytorch
    weights_dir: Optional[str] = None  # folder holding the weight files; None -> $DITK_WEIGHTS_DIR
    device: str = "cpu"


@dataclass
class FeatureExtractor:
    name: str
    model: Callable[[torch.Tensor], torch.Tensor]  # (N, 3, H, W) float in [0, 255] on `device` -> (N, dim)
    mode: str  # the clean-fid protocol; picks clean-fid's resizer when fn_resize is None
    dim: int
    weights_sha256: Optional[str]
    resize: str  # the resize policy in words, recorded with every result
    fn_resize: Optional[Callable[[np.ndarray], np.ndarray]] = None  # uint8 RGB HWC -> HWC (clean-fid's custom_fn_resize)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


class ExtractorHandle:
    """An extractor by name and mode, built (weights read and checked) only once images must be embedded:
    comparing two statistics files needs no weights at all."""

    def __init__(self, name: str, mode: str = "clean", weights_dir: Optional[str] = None, device: str = "cpu",
                 instance: Optional[FeatureExtractor] = None):
        self.name, self.mode, self.weights_dir, self.device = name, mode, weights_dir, device
        self._instance = instance
        if instance is None:
            FEATURE_EXTRACTORS.get(name)  # unknown names fail now, with a suggestion

    @classmethod
    def wrap(cls, extractor: FeatureExtractor) -> "ExtractorHandle":
        return cls(extractor.name, extractor.mode, device=str(extractor.device), instance=extractor)

    @property
    def built(self) -> bool:
        return self._instance is not None

    def get(self) -> FeatureExtractor:
        if self._instance is None:
            cfg = ExtractorConfig(mode=self.mode, weights_dir=self.weights_dir, device=self.device)
            self._instance = FEATURE_EXTRACTORS.build(self.name, cfg)
        return self._instance


def _check_mode(mode: str, allowed: tuple, name: str) -> None:
    if mode not in allowed:
        raise DitkError(f"feature extractor '{name}' supports --mode {' | '.join(allowed)}, not '{mode}'")


# --------------------------------------------------------------------------------------------- inception

@FEATURE_EXTRACTORS.register("inception", config=ExtractorConfig)
def build_inception(cfg) -> FeatureExtractor:
    """Inception-v3 pool3 features (2048-d) as clean-fid computes them; weights from --weights-dir."""
    _check_mode(cfg.mode, MODES, "inception")
    device = torch.device(cfg.device)
    spec = offline.INCEPTION_PYTORCH_FID if cfg.mode == "legacy_pytorch" else offline.INCEPTION_TORCHSCRIPT
    path = offline.locate(spec, cfg.weights_dir)  # checked against spec.sha256
    if cfg.mode == "legacy_pytorch":
        net = _pytorch_fid_inception(path).to(device).eval()

        def model(x):  # clean-fid features.feature_extractor("pytorch_inception")
            return net(x / 255)[0].squeeze(-1).squeeze(-1)
    else:
        from cleanfid.inception_torchscript import InceptionV3W

        # download=False: clean-fid would otherwise fetch into /tmp. The file name inside the folder is fixed
        # by clean-fid, which is why `locate` looks for exactly that name.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's notice that torch.jit.load is deprecated
            model = InceptionV3W(str(path.parent), download=False,
                                 resize_inside=cfg.mode == "legacy_tensorflow").to(device).eval()
    return FeatureExtractor(name="inception", model=model, mode=cfg.mode, dim=2048,
                            weights_sha256=spec.sha256, resize=RESIZE_POLICY[cfg.mode], device=device)


def _pytorch_fid_inception(path: Path) -> nn.Module:
    """clean-fid's InceptionV3 (legacy_pytorch), with the state dict read from `path` instead of the hub."""
    import cleanfid.inception_pytorch as ip

    def load_local(url, *args, **kwargs):
        if os.path.basename(url) != path.name:
            raise DitkError(f"clean-fid asked for {url}, which ditk does not provide offline")
        return torch.load(path, map_location="cpu", weights_only=True)

    original = ip.load_state_dict_from_url
    ip.load_state_dict_from_url = load_local
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's deprecation notice for `pretrained=False`
            return ip.InceptionV3(output_blocks=[3], resize_input=False)
    finally:
        ip.load_state_dict_from_url = original


# ------------------------------------------------------------------------------------------------ digits

class DigitsNet(nn.Module):
    """8x8 grayscale digit -> 64-d features -> 10 logits. 38,282 trained parameters.

    conv3x3(16) ReLU conv3x3(32) ReLU maxpool2 | linear(512->64) = penultimate | ReLU linear(64->10).
    The features are the penultimate layer *before* its ReLU (FID fits a Gaussian to them; rectified features
    with dead units would give singular covariances), centred by the training images' mean and divided by
    one scalar, the root of their mean per-dimension variance. A single scalar keeps the geometry (FID just
    scales by its square) and puts the features at the O(1) scale for which KID's cubic kernel
    (x.y / d + 1)^3 was designed, as Inception's are.
    """

    feature_dim = 64

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, self.feature_dim)
        self.fc2 = nn.Linear(self.feature_dim, 10)
        self.register_buffer("feature_mean", torch.zeros(self.feature_dim))
        self.register_buffer("feature_scale", torch.ones(()))

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 1, 8, 8) in [0, 1], ink bright (scikit-learn's convention, as ditk's digits data set)."""
        h = F.relu(self.conv1(2 * x - 1))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return self.fc1(h.flatten(1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return (self.penultimate(x) - self.feature_mean) / self.feature_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.penultimate(x)))

    @torch.no_grad()
    def set_feature_normalisation(self, x: torch.Tensor) -> None:
        """Centre and scale the features on the images `x` (the training images, without augmentation)."""
        feats = self.penultimate(x)
        self.feature_mean.copy_(feats.mean(0))
        self.feature_scale.copy_(feats.var(0).mean().sqrt())


DIGITS_RESIZE = ("PIL box (area average) to 8x8 in float, no quantisation; grayscale = mean of R, G, B "
                 "(exact for grayscale images)")


@FEATURE_EXTRACTORS.register("digits", config=ExtractorConfig)
def build_digits(cfg) -> FeatureExtractor:
    """64-d penultimate features of a small CNN trained on scikit-learn's 8x8 digits (shipped weights)."""
    from cleanfid.resize import make_resizer

    _check_mode(cfg.mode, ("clean",), "digits")
    device = torch.device(cfg.device)
    net = offline.load_shipped(DigitsNet(), DIGITS_WEIGHTS, DIGITS_SHA256, "digits extractor",
                               "python scripts/train_digits_extractor.py")
    net.to(device).eval()

    def model(x):
        return net.features(x.mean(dim=1, keepdim=True) / 255)

    # Larger images (ditk's digits at image_size 16/32, upscaled PNGs) are area-averaged back to 8x8: for an
    # integer factor this averages whole blocks, so nearest-upscaled digits come back exactly.
    fn_resize = make_resizer("PIL", False, "box", (8, 8))
    return FeatureExtractor(name="digits", model=model, mode="clean", dim=DigitsNet.feature_dim,
                            weights_sha256=DIGITS_SHA256, resize=DIGITS_RESIZE, fn_resize=fn_resize, device=device)
