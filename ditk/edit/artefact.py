"""The inversion artefact (one `.safetensors` per input image) and the inputs and metrics of invert/edit.

Tensors: `noise` (C, H, W) the terminal point; `pair` (BDIA's z_{N-1}); `trajectory` (K + 1, C, H, W) with
--save-trajectory; `feat|<evaluation key>|<hook point>` attention features with --save-features. Metadata (strings):
`ditk` = JSON {model, model_fingerprint, objective, schedule (alpha_bar or sigma per node, incl. the shift), method,
options, steps, conditioning, guidance (always 1), autoencoder, image, nfe}.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..atomic import atomic_path
from ..errors import ConfigError



def model_fingerprint(model) -> str:
    """A cheap digest of the weights (name, shape, sum, sum of squares per tensor) and the architecture."""
    h = hashlib.sha1()
    for name, p in model.state_dict().items():
        p = p.detach().double()
        h.update(f"{name}{tuple(p.shape)}{float(p.sum()):.8e}{float((p * p).sum()):.8e}".encode())
    return h.hexdigest()[:16]


def pipeline_identity(pipe) -> dict:
    from omegaconf import OmegaConf

    return {"model": OmegaConf.to_container(pipe.cfg.model, resolve=True),
            "objective": OmegaConf.to_container(pipe.cfg.objective, resolve=True),
            "autoencoder": OmegaConf.to_container(pipe.cfg.autoencoder, resolve=True),
            "model_fingerprint": model_fingerprint(pipe.model)}


def save_artefact(path: Path, tensors: dict, meta: dict) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"ditk": json.dumps(meta)})


def load_artefact(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("ditk", "null"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # not a safetensors file at all
        raise ConfigError(f"{path} is not a ditk inversion artefact ({type(e).__name__}): pass one written by ditk invert") from None
    if not isinstance(meta, dict) or "noise" not in tensors:
        raise ConfigError(f"{path} is not a ditk inversion artefact: pass one written by ditk invert")
    return tensors, meta


def check_artefact(path: Path, meta: dict, identity: dict, method: Optional[str] = None,
                   steps: Optional[int] = None) -> None:
    """One line naming what differs between the artefact and the model/schedule it is used with."""
    for key in [k for k in ("model", "objective", "autoencoder", "front_end") if k in identity]:
        if meta.get(key) != identity[key]:
            theirs, ours = meta.get(key) or {}, identity[key]
            diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
            raise ConfigError(f"{path.name} was inverted with another {key} ({', '.join(f'{key}.{d}' for d in diff[:3])} "
                              f"differ{'s' if len(diff) == 1 else ''}): invert the image again with this model")
    if meta.get("model_fingerprint") != identity["model_fingerprint"]:
        raise ConfigError(f"{path.name} was inverted with other weights ({meta.get('source')}): invert it again with this model")
    if method is not None and meta.get("method") != method:
        raise ConfigError(f"{path.name} holds a '{meta.get('method')}' inversion, not '{method}': pass --inversion "
                          f"{meta.get('method')} or invert again")
    if steps is not None and int(meta.get("steps", -1)) != int(steps):
        raise ConfigError(f"{path.name} was inverted with {meta.get('steps')} steps: pass --steps {meta.get('steps')}")


def load_images(paths: Sequence[Path], channels: int, size: int, resize: bool) -> torch.Tensor:
    """PNG/JPEG files -> (N, channels, size, size) in [-1, 1] (uint8 u -> u / 127.5 - 1). A wrong size or channel
    count is an error unless `resize` (bicubic resize; RGB <-> grayscale conversion)."""
    from PIL import Image

    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise ConfigError(f"the model's images have {channels} channels: only 1 (grayscale) or 3 (RGB) load from files")
    out = []
    for p in paths:
        try:
            img = Image.open(p)
            img.load()
        except Exception:
            raise ConfigError(f"{p} is not an image file PIL can read: pass PNG/JPEG images") from None
        img_channels = len(img.getbands()) - (1 if img.mode in ("LA", "RGBA") else 0)
        if img.size != (size, size) or img_channels != channels:
            if not resize:
                raise ConfigError(f"{p.name} is {img.size[0]}x{img.size[1]} with {img_channels} channel(s) but the model "
                                  f"takes {size}x{size} with {channels}: pass --resize to convert it")
            img = img.convert(mode).resize((size, size), Image.BICUBIC)
        arr = np.asarray(img.convert(mode), dtype=np.float32)
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        out.append(torch.from_numpy(arr / 127.5 - 1.0))
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------------- metrics


def psnr(a: torch.Tensor, b: torch.Tensor, mask: Optional[torch.Tensor] = None) -> list[float]:
    """Per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2); `mask` (N, 1, H, W) selects the pixels."""
    err = (a.double() - b.double()) ** 2
    if mask is None:
        mse = err.flatten(1).mean(1)
    else:
        m = mask.double().expand_as(err)
        mse = (err * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp(min=1)
    return [float("inf") if v == 0 else float(10 * torch.log10(4.0 / v)) for v in mse]


def ssim(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Per-image SSIM (scikit-image, Gaussian-free 7x7 window or the largest odd window that fits, data range 2)."""
    from skimage.metrics import structural_similarity

    out = []
    for x, y in zip(a.double().cpu().numpy(), b.double().cpu().numpy()):
        side = min(x.shape[-2:])
        win = min(7, side if side % 2 else side - 1)
        out.append(float(structural_similarity(x, y, data_range=2.0, channel_axis=0, win_size=win)))
    return out
