"""Frozen image encoders for captioning: CONDITIONERS entries that turn pictures into the feature tokens a
captioner's mapping network reads (`prefix`, (N, S, F)).

- `digits-cnn`: the digits CNN that ditk ships for FID (`ditk.metrics.extractors.DigitsNet`, trained on the
  training digits only, sha256-checked): token 0 is its normalised 64-d penultimate feature, tokens 1..16 the 4x4
  cells of its last convolution (32 channels, after ReLU and max-pool, zero-padded to 64), so the captioner sees
  where the ink is as well as what digit it is. Takes 8x8 grayscale pictures; needs no download.
- `clip-image`: a CLIP vision tower from a local folder (transformers `CLIPVisionModelWithProjection`, e.g.
  openai/clip-vit-base-patch32 as in Prefix-diffusion and ClipCap): one token, the projected image embedding
  (512-d for ViT-B/32), or the patch tokens (`features: tokens`). Pictures are resized (shorter side, bicubic),
  centre-cropped and normalised with the folder's preprocessor settings.

Both take pictures as (N, C, H, W) tensors in [-1, 1] (ditk's convention) and load files with `load_image`.
The null condition (`uncond`) is all-zero features.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..conditioners import load_local
from ..errors import ConfigError
from ..registry import CONDITIONERS


class ImageConditioner:
    """What both encoders share: file loading with the size check, the null condition, the class names."""

    channels = 1
    image_size: Optional[int] = None  # the side length the encoder needs; None: any (it resizes itself)
    tokens = 1
    feature_dim = 0

    def __init__(self, num_classes: int = 0, class_names: Optional[Sequence[str]] = None):
        self.num_classes = int(num_classes)
        self.class_names = list(class_names) if class_names else None

    def load_image(self, path, resize: bool = False) -> torch.Tensor:
        """An image file -> (C, H, W) in [-1, 1]; a picture of the wrong size is an error unless `resize`."""
        from PIL import Image

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"image '{path}' does not exist: check the path")
        try:
            image = Image.open(path).convert("L" if self.channels == 1 else "RGB")
        except OSError as e:
            raise ConfigError(f"cannot read image '{path}' ({e}): give a PNG or JPEG file") from None
        size = self.image_size
        if size is not None and image.size != (size, size):
            if not resize:
                raise ConfigError(f"image '{path}' is {image.size[0]}x{image.size[1]} but the {self.name} encoder "
                                  f"takes {size}x{size}: pass --resize to scale it (area average), or give {size}x{size} images")
            image = image.resize((size, size), Image.BOX)
        x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).float()
        x = x.view(image.size[1], image.size[0], self.channels).permute(2, 0, 1)
        return x / 127.5 - 1.0

    def uncond(self, n: int, device=None) -> dict:
        return {"prefix": torch.zeros(n, self.tokens, self.feature_dim, device=device)}


@dataclass
class DigitsCNNConfig:
    cells: bool = True  # add the 16 cells of the last conv map to the pooled feature (false: one token)


class DigitsCNNConditioner(ImageConditioner):
    name = "digits-cnn"
    channels = 1
    image_size = 8
    feature_dim = 64

    def __init__(self, cfg, num_classes: int = 0, class_names=None):
        super().__init__(num_classes, class_names)
        from safetensors.torch import load_file

        from ..metrics import offline
        from ..metrics.extractors import DIGITS_SHA256, DIGITS_WEIGHTS, DigitsNet

        offline.verify(DIGITS_WEIGHTS, DIGITS_SHA256, "digits CNN")
        self.net = DigitsNet()
        self.net.load_state_dict(load_file(DIGITS_WEIGHTS))
        self.net.eval().requires_grad_(False)
        self.cells = bool(cfg.cells)
        self.tokens = 17 if self.cells else 1

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        net = self.net.to(images.device)
        x = (images.float() + 1) / 2  # [-1, 1] -> ink in [0, 1], as DigitsNet was trained
        pooled = net.features(x)[:, None]  # (N, 1, 64)
        if not self.cells:
            return pooled
        h = F.max_pool2d(F.relu(net.conv2(F.relu(net.conv1(2 * x - 1)))), 2)  # (N, 32, 4, 4), DigitsNet's path
        cells = F.pad(h.flatten(2).transpose(1, 2), (0, self.feature_dim - h.shape[1]))  # (N, 16, 64)
        return torch.cat([pooled, cells], dim=1)

    def cond(self, images, device=None) -> dict:
        images = torch.as_tensor(images)
        if images.shape[-2:] != (8, 8):
            raise ConfigError(f"the digits-cnn encoder takes 8x8 pictures, got {tuple(images.shape[-2:])}")
        return {"prefix": self.features(images.to(device) if device is not None else images)}


@CONDITIONERS.register("digits-cnn", config=DigitsCNNConfig)
def build_digits_cnn(cfg, num_classes: int = 0, class_names=None) -> DigitsCNNConditioner:
    """Frozen digits CNN (shipped weights): 8x8 digit -> 17 feature tokens of 64 (pooled + 4x4 cells)."""
    return DigitsCNNConditioner(cfg, num_classes, class_names)


@dataclass
class CLIPImageConfig:
    encoder_path: str = ""  # local folder of a CLIP model (e.g. openai/clip-vit-base-patch32)
    features: str = "embeds"  # embeds: the projected image embedding (1 token; ClipCap) | tokens: the patch tokens


class CLIPImageConditioner(ImageConditioner):
    name = "clip-image"
    channels = 3
    image_size = None

    def __init__(self, cfg, num_classes: int = 0, class_names=None):
        super().__init__(num_classes, class_names)
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        if cfg.features not in ("embeds", "tokens"):
            raise ConfigError(f"unknown conditioner.features '{cfg.features}': use embeds or tokens")
        path = cfg.encoder_path
        if not path:
            raise ConfigError("the clip-image encoder needs conditioner.encoder_path=<local folder of a CLIP model, "
                              "e.g. openai/clip-vit-base-patch32>")
        if not Path(path).is_dir():
            raise ConfigError(f"the CLIP folder '{path}' does not exist: set conditioner.encoder_path to a local folder "
                              "of openai/clip-vit-base-patch32 (config.json, model weights, preprocessor_config.json)")
        self.model, processor = load_local(
            path, "a CLIP vision model", "set conditioner.encoder_path to a local folder of openai/clip-vit-base-patch32",
            CLIPVisionModelWithProjection, CLIPImageProcessor)
        self.model.eval().requires_grad_(False)
        self.mode = cfg.features
        self.resize_to = _side(processor.size, ("shortest_edge", "height"))
        self.crop = _side(processor.crop_size, ("height", "shortest_edge"))
        self.mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
        vc = self.model.config
        self.tokens = 1 if self.mode == "embeds" else (vc.image_size // vc.patch_size) ** 2 + 1
        self.feature_dim = vc.projection_dim if self.mode == "embeds" else vc.hidden_size

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] pictures -> CLIP's input: shorter side resized (bicubic), centre crop, mean/std normalised."""
        x = (images.float() + 1) / 2
        if x.shape[1] == 1:  # grayscale pictures (the digits): CLIP reads RGB
            x = x.expand(-1, 3, -1, -1)
        h, w = x.shape[-2:]
        scale = self.resize_to / min(h, w)
        x = F.interpolate(x, size=(max(self.crop, round(h * scale)), max(self.crop, round(w * scale))),
                          mode="bicubic", align_corners=False, antialias=True)
        top, left = (x.shape[-2] - self.crop) // 2, (x.shape[-1] - self.crop) // 2
        x = x[..., top:top + self.crop, left:left + self.crop].clamp(0, 1)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    @torch.no_grad()
    def cond(self, images, device=None) -> dict:
        images = torch.as_tensor(images)
        if device is not None:
            images = images.to(device)
        model = self.model.to(images.device)
        out = model(pixel_values=self.preprocess(images))
        feats = out.image_embeds[:, None] if self.mode == "embeds" else out.last_hidden_state
        return {"prefix": feats}


def _side(size, keys) -> int:
    """A preprocessor size (an int, a dict, or transformers' SizeDict) -> one side length, by the first key set."""
    if isinstance(size, (int, float)):
        return int(size)
    for key in keys:
        value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
        if value:
            return int(value)
    raise ConfigError(f"cannot read the CLIP preprocessor's size {size!r}: check preprocessor_config.json")


@CONDITIONERS.register("clip-image", config=CLIPImageConfig)
def build_clip_image(cfg, num_classes: int = 0, class_names=None) -> CLIPImageConditioner:
    """Frozen CLIP vision tower from a local folder: the projected image embedding (or patch tokens)."""
    return CLIPImageConditioner(cfg, num_classes, class_names)
