"""`ditk restore`: read inputs, build the measurement, run a method in the sampling loop, write the folder.

Output folder: restored/NNNNNN.png, degraded/NNNNNN.png (y as a picture: the low-resolution image, the masked
image, the gray image; A^dagger y for compressed sensing), ground_truth/NNNNNN.png with --degrade, grid.png
(rows: degraded | restored | ground truth), samples.npz (restored, uint8 NHWC), report.json and lineage.json.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import ConfigError
from .base import METHODS
from .operators import Operator, build_operator



def load_methods() -> dict:
    from . import ddnm, ddrm, dps, pigdm, pnp_flow  # noqa: F401  (each registers its method)

    return METHODS


def get_method(name: str):
    import difflib

    methods = load_methods()
    if name not in methods:
        close = difflib.get_close_matches(name, methods, n=1, cutoff=0.4)
        hint = f"did you mean '{close[0]}'?" if close else f"choose one of: {', '.join(sorted(methods))}"
        raise ConfigError(f"unknown method '{name}': {hint}")
    return methods[name]


def pixel_shape(pipe) -> tuple[int, int, int]:
    """(C, H, W) of the images the prior makes (after the decoder for latent models)."""
    from ..build import latent_shape

    c, h, w = latent_shape(pipe.model)
    f = int(getattr(pipe.autoencoder, "downsample", 1))
    if f == 1:
        return (c, h, w)
    return (3, h * f, w * f)


def is_latent(pipe) -> bool:
    return int(getattr(pipe.autoencoder, "downsample", 1)) != 1 or pipe.autoencoder.name != "identity"


# ------------------------------------------------------------------------------------------------------------
# Inputs


def read_images(files: Sequence[Path], channels: int, size: tuple[int, int], resize: bool, what: str) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1]. A size other than `size` (H, W) is an error unless `resize` (PIL bicubic)."""
    from PIL import Image

    out = []
    for f in files:
        try:
            img = Image.open(f).convert("L" if channels == 1 else "RGB")
        except Exception as e:  # PIL raises several kinds for unreadable files
            raise ConfigError(f"cannot read image '{f}': {type(e).__name__}") from e
        if (img.height, img.width) != tuple(size):
            if not resize:
                raise ConfigError(f"input '{f}' is {img.width}x{img.height} but {what} must be {size[1]}x{size[0]}: "
                                  "pass --resize to resize the inputs")
            img = img.resize((size[1], size[0]), Image.BICUBIC)
        arr = np.asarray(img, dtype=np.float32)
        arr = arr[..., None] if arr.ndim == 2 else arr
        out.append(torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0)
    return torch.stack(out)


def measure(op: Operator, clean: torch.Tensor, sigma_y: float, seed: int, indices: Sequence[int]) -> torch.Tensor:
    """y = A x + sigma_y n, the noise of image i from its own seed (independent of batching)."""
    y = op.A(clean)
    if sigma_y > 0:
        noise = torch.stack([torch.randn(y.shape[1:], generator=torch.Generator().manual_seed(10_007 * seed + i + 1))
                             for i in indices])
        y = y + sigma_y * noise
    return y


# ------------------------------------------------------------------------------------------------------------
# Restoration of one batch


@dataclass
class Result:
    images: torch.Tensor  # (N, C, H, W) in [-1, 1]
    nfe: int  # model evaluations per image
    seconds: float


def restore_batch(pipe, op: Operator, method_name: str, y: torch.Tensor, indices: Sequence[int], *, sigma_y: float,
                  steps: Optional[int] = None, seed: int = 0, options: Optional[dict] = None,
                  progress: bool = False, class_label: Optional[int] = None) -> Result:
    """Restore the images whose measurements are y (N, ...) with the prior of `pipe`."""
    from ..generate import image_generators
    from ..sampling import sample

    cls = get_method(method_name)
    latent = is_latent(pipe)
    cls.check(op, pipe.objective.name, latent)
    decode = pipe.autoencoder.decode if latent else None
    gens = image_generators(seed, indices)
    method = cls(op, y.to(pipe.device), pipe.objective, sigma_y, options, generators=gens, decode=decode)
    from ..build import latent_shape

    r = method.replicas
    shape = latent_shape(pipe.model)
    # the loop's initial noise: image i's from its generator (each replica its own draw)
    noise = torch.stack([torch.randn(shape, generator=g) for g in gens for _ in range(r)]).to(pipe.device)
    loop_gens = [g for g in gens for _ in range(r)]
    n = noise.shape[0]
    if getattr(pipe.conditioner, "unconditional", False):
        cond = {}
    elif class_label is not None:
        cond = pipe.conditioner.cond(torch.full((n,), int(class_label), device=pipe.device))
    else:  # a class-conditional prior used without a class: its null label (the unconditional model of CFG)
        cond = pipe.conditioner.uncond(n, pipe.device)
    start = time.perf_counter()
    x = sample(pipe.model, pipe.objective, noise, cond, None, solver=cls.solver, steps=int(steps or cls.default_steps),
               generator=loop_gens, progress=progress, solver_options=getattr(method, "solver_options", {}),
               step_hooks=[method])
    if r > 1:
        x = x[::r]
    images = pipe.autoencoder.decode(x) if latent else x
    seconds = time.perf_counter() - start
    return Result(images.detach().float().clamp(-1, 1).cpu(), method.nfe, seconds)


# ------------------------------------------------------------------------------------------------------------
# Metrics


def quantised(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images as the PNGs hold them, in [0, 1]."""
    from ..io import to_uint8

    return torch.from_numpy(to_uint8(x)).permute(0, 3, 1, 2).float() / 255.0


def psnr_ssim(restored: torch.Tensor, truth: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-image PSNR (dB) and SSIM (Gaussian window 11, sigma 1.5) on the 8-bit images, all channels, data range
    1, no border crop (torchmetrics)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    a, b = quantised(restored), quantised(truth)
    psnr = peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(a, b, data_range=1.0, reduction="none")
    return [round(float(v), 4) for v in psnr], [round(float(v), 5) for v in ssim]


def set_fid(pipe, restored: torch.Tensor, clean: torch.Tensor, extractor: Optional[str], weights_dir=None) -> dict:
    """FID / KID of the restored set against the ground truth (ditk.restore.set_metrics); `auto` picks the
    extractor made for the prior's data set, and FID is null (with the reason) where there is none."""
    from .set_metrics import auto_extractor, fid_kid

    name = auto_extractor(pipe.cfg.data.get("name")) if extractor == "auto" else extractor
    if name is None:
        why = "--fid-extractor none" if extractor != "auto" else (
            f"no feature network is made for data set '{pipe.cfg.data.get('name')}': pass --fid-extractor inception "
            "(with --weights-dir) or photos/digits")
        return {"fid": None, "kid": None, "fid_note": f"not computed: {why}"}
    if len(restored) < 2:
        return {"fid": None, "kid": None, "fid_note": "not computed: FID and KID need at least 2 images"}
    out = fid_kid(restored, clean, name, weights_dir)
    return {"fid": out.pop("fid"), "kid": out.pop("kid"), "fid_protocol": {
        **out, "note": "FID on a few dozen images is biased upwards and noisy: compare only at the same image count "
                       "and extractor; KID is unbiased"}}


# ------------------------------------------------------------------------------------------------------------
# The command


def grid_rows(degraded_pics: torch.Tensor, restored: torch.Tensor, truth: Optional[torch.Tensor], limit: int = 16):
    """Rows degraded | restored | ground truth, `limit` images a row; degraded pictures upscaled (nearest)."""
    import torch.nn.functional as F

    k = min(limit, restored.shape[0])
    size = restored.shape[-2:]
    deg = degraded_pics[:k]
    if deg.shape[-2:] != size:
        deg = F.interpolate(deg, size=size, mode="nearest")
    rows = [deg, restored[:k]] + ([truth[:k]] if truth is not None else [])
    return torch.cat(rows), k


def run(pipe, *, files: Sequence[Path], task: str, method: str, out_dir: Path, task_options: dict, method_options: dict,
        sigma_y: float, steps: Optional[int], seed: int, batch_size: int, degrade_inputs: bool, resize: bool,
        progress: bool, source: str, class_label: Optional[int] = None, fid_extractor: Optional[str] = "auto",
        weights_dir: Optional[str] = None) -> dict:
    from ..atomic import atomic_dir, write_text
    from ..io import save_grid, save_npz, save_pngs, to_uint8
    from ..runs import save_json

    if sigma_y < 0:
        raise ConfigError(f"--sigma-y must be >= 0, got {sigma_y}")
    shape = pixel_shape(pipe)
    op = build_operator(task, shape, task_options)
    cls = get_method(method)
    cls.check(op, pipe.objective.name, is_latent(pipe))
    cls.resolve_options(method_options, op)  # unknown options fail before any work
    if is_latent(pipe) and cls.needs_grad:
        print(f"[ditk] warning: {method} on a latent model differentiates through the VAE decoder at every step: "
              "expect several times the time and memory of pixel-space restoration", file=sys.stderr)
    if degrade_inputs:
        clean = read_images(files, shape[0], shape[1:], resize, "clean images (--degrade)")
        y = measure(op, clean, sigma_y, seed, range(len(files)))
    else:
        if task == "cs":
            op.y_from_image(None)  # raises: CS measurements are no picture
        probe = op.y_to_image(op.A(torch.zeros(1, *shape)))
        pictures = read_images(files, probe.shape[1], probe.shape[2:], resize, f"degraded inputs for task {task}")
        y = op.y_from_image(pictures)
        clean = None

    restored, nfe, seconds = [], 0, 0.0
    for b in range(0, len(files), batch_size):
        idx = list(range(b, min(b + batch_size, len(files))))
        res = restore_batch(pipe, op, method, y[idx], idx, sigma_y=sigma_y, steps=steps, seed=seed,
                            options=method_options, progress=progress, class_label=class_label)
        restored.append(res.images)
        nfe, seconds = res.nfe, seconds + res.seconds
        print(f"[ditk] restored {idx[-1] + 1}/{len(files)}", file=sys.stderr)
    restored = torch.cat(restored)
    pictures = op.y_to_image(y).clamp(-1, 1)

    report = {
        "source": source, "task": op.describe(), "method": method,
        "method_options": cls.resolve_options(method_options, op), "sigma_y": sigma_y,
        "steps": int(steps or cls.default_steps), "seed": seed, "num": len(files), "nfe_per_image": nfe,
        "seconds": round(seconds, 3), "seconds_per_image": round(seconds / len(files), 4),
        "device": str(pipe.device), "degraded_inputs_synthesised": bool(degrade_inputs),
        "inputs": [str(f) for f in files], "value_range": "[-1, 1] images; sigma_y on that scale",
    }
    if clean is not None:
        psnr, ssim = psnr_ssim(restored, clean)
        report["metrics"] = {"psnr_db": round(float(np.mean(psnr)), 3), "ssim": round(float(np.mean(ssim)), 4),
                             "per_image": {"psnr_db": psnr, "ssim": ssim},
                             "protocol": "8-bit RGB (or gray), data range 1, no border crop, torchmetrics"}
        report["metrics"].update(set_fid(pipe, restored, clean, fid_extractor, weights_dir))
    with atomic_dir(out_dir) as tmp:
        save_pngs(restored, tmp / "restored")
        save_pngs(pictures, tmp / "degraded")
        if clean is not None:
            save_pngs(clean, tmp / "ground_truth")
        tiles, k = grid_rows(pictures, restored, clean)
        save_grid(tiles, tmp / "grid.png", nrow=k, scale=max(1, 128 // shape[1]))
        save_npz(to_uint8(restored), tmp / "samples.npz")
        save_json(tmp / "report.json", report)
        lineage = {"command": sys.argv, "parent": source, "kind": "restore", "task": task, "method": method}
        write_text(tmp / "lineage.json", json.dumps(lineage, indent=2) + "\n")
    return report
