"""Train the `photos` FID feature extractor and write ditk/metrics/weights/photos-simclr.safetensors.

Why: see ditk/metrics/photos_extractor.py (no offline Inception; no usable pretrained network in a PyPI wheel).

How (`python benchmarks/train_photos_extractor.py`, CPU, one thread):
- data: the *training* part of the `photos` data set only (ditk.data.photos: the seven photographs shrunk to a
  shorter side of 128 px, without the held-out right strip and its 8-column gap). Pixels are what a ditk image
  becomes: uint8, read as uint8 / 255.
- views (SimCLR, Chen et al. 2020, instance discrimination): for a random training window, two 32x32 crops at
  independent offsets of up to +-`--shift` px from it (kept inside the training part), each flipped
  horizontally with probability 1/2. No colour, blur or noise augmentation: the features must stay sensitive
  to exactly what restoration gets wrong.
- loss: NT-Xent (temperature `--tau`) on the 64-d projection; network ditk.metrics.photos_extractor.PhotosNet;
  Adam, cosine learning rate, torch.manual_seed(--seed).
- after training: features (128-d, before the head) centred on the training windows' mean and divided by the
  root of their mean per-dimension variance (stored in the file).
- checks printed (and required): (1) held-out retrieval: each of the 28 held-out crops, shifted by 2 px, must
  find its own unshifted crop as nearest neighbour among the 28 (top-1 accuracy > 0.8); (2) FID between the
  held-out crops and degraded copies of them grows with the degradation (Gaussian blur sigma 0.5 < 1 < 2 px;
  noise sigma 0.05 < 0.1 < 0.2 on [-1, 1]); (3) for scale: 28 random training crops vs the 28 held-out crops
  (two clean sets of *different* content: FID of unpaired sets that small is dominated by content), and the
  held-out crops vs their gray versions.
- result (`python benchmarks/train_photos_extractor.py`, defaults, torch 2.14, 2026-12-03; 424 s on the shared
  2-core machine): final NT-Xent loss 1.78; held-out top-1 28/28; FID vs blur sigma 0.5 / 1 / 2 px: 0.013 / 0.10 /
  0.36; vs noise 0.05 / 0.1 / 0.2: 0.077 / 0.34 / 2.1; gray: 40.7; training vs held-out crops: 60.8.
  sha256 c3e838e9dd79286ca52a8c556f387281a800421eabbacb3f99f1dd66f5706c33 (PHOTOS_SHA256).
Prints the sha256 to copy into PHOTOS_SHA256. Re-running reproduces the file on the same CPU and torch version
(another CPU or torch version may change the last bits, hence the sha256, not the checks).
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from ditk.data.photos import PhotosConfig, Photos, shrunk_photos
from ditk.metrics.offline import sha256_file
from ditk.metrics.photos_extractor import PHOTOS_WEIGHTS, PhotosNet


def training_parts(cfg: PhotosConfig) -> list[torch.Tensor]:
    """Each photograph's training part (left of the gap before the held-out strip), (3, H, W) uint8 tensors."""
    parts = []
    for arr in shrunk_photos(cfg.photo_size):
        right = arr.shape[1] - cfg.test_width - cfg.gap
        parts.append(torch.from_numpy(np.ascontiguousarray(arr[:, :right])).permute(2, 0, 1))
    return parts


def sample_views(parts, batch: int, size: int, shift: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two views (batch, 3, size, size) in [0, 1] of `batch` random windows."""
    weights = torch.tensor([float((p.shape[1] - size) * (p.shape[2] - size)) for p in parts])
    which = torch.multinomial(weights, batch, replacement=True, generator=g)
    views = ([], [])
    for k in which.tolist():
        p = parts[k]
        h, w = p.shape[1] - size, p.shape[2] - size
        top = int(torch.randint(0, h + 1, (1,), generator=g))
        left = int(torch.randint(0, w + 1, (1,), generator=g))
        for out in views:
            dy, dx = (int(v) for v in torch.randint(-shift, shift + 1, (2,), generator=g))
            t, l = min(max(top + dy, 0), h), min(max(left + dx, 0), w)
            crop = p[:, t:t + size, l:l + size]
            if torch.rand(1, generator=g).item() < 0.5:
                crop = crop.flip(-1)
            out.append(crop)
    return tuple(torch.stack(v).float() / 255 for v in views)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.t() / tau
    n = z1.shape[0]
    sim.fill_diagonal_(-float("inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, target)


def to01(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> the 8-bit values ditk writes, in [0, 1]."""
    return torch.clamp(127.5 * x + 128, 0, 255).floor() / 255


@torch.no_grad()
def fid_of(net: PhotosNet, a: torch.Tensor, b: torch.Tensor) -> float:
    from ditk.metrics.fid import frechet_distance

    fa, fb = net.features(a).double().numpy(), net.features(b).double().numpy()
    return frechet_distance(fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0), np.cov(fb, rowvar=False))


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = int(math.ceil(3 * sigma))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma ** 2))
    k = (k / k.sum())
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3)


def checks(net: PhotosNet, seed: int) -> dict:
    net.eval()
    test = Photos(PhotosConfig(split="test", hflip=False)).images  # [-1, 1]
    train = Photos(PhotosConfig(split="train", hflip=False)).images
    clean = to01(test)
    # (1) retrieval of held-out crops shifted by 2 px (replicate padding) among the 28
    shifted = to01(F.pad(test, (2, 0, 2, 0), mode="replicate")[..., :32, :32])
    with torch.no_grad():
        fq, fk = F.normalize(net.features(shifted), dim=1), F.normalize(net.features(clean), dim=1)
    top1 = float(((fq @ fk.t()).argmax(1) == torch.arange(len(test))).float().mean())
    g = torch.Generator().manual_seed(seed)
    out = {"heldout_top1": top1, "n_heldout": len(test)}
    out["fid_blur"] = {s: fid_of(net, clean, to01(gaussian_blur(test, s))) for s in (0.5, 1.0, 2.0)}
    out["fid_noise"] = {s: fid_of(net, clean, to01(test + s * torch.randn(test.shape, generator=g)))
                        for s in (0.05, 0.1, 0.2)}
    pick = torch.randperm(len(train), generator=g)[: len(test)]
    out["fid_floor_train_vs_heldout"] = fid_of(net, to01(train[pick]), clean)
    out["fid_gray"] = fid_of(net, clean, to01(test.mean(1, keepdim=True).expand_as(test)))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--tau", type=float, default=0.2)
    ap.add_argument("--shift", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(PHOTOS_WEIGHTS))
    args = ap.parse_args()
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    cfg = PhotosConfig()
    parts = training_parts(cfg)
    net = PhotosNet()
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    g = torch.Generator().manual_seed(args.seed)
    start = time.time()
    for step in range(1, args.steps + 1):
        v1, v2 = sample_views(parts, args.batch, cfg.image_size, args.shift, g)
        loss = nt_xent(net.project(v1), net.project(v2), args.tau)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == 1:
            print(f"[photos-extractor] step {step} loss {loss.item():.4f} {time.time() - start:.0f}s", file=sys.stderr)
    net.eval()
    train = Photos(PhotosConfig(split="train", hflip=False)).images
    net.set_feature_normalisation(to01(train))
    result = checks(net, args.seed)
    print(result)
    ok = (result["heldout_top1"] > 0.8 and list(result["fid_blur"].values()) == sorted(result["fid_blur"].values())
          and list(result["fid_noise"].values()) == sorted(result["fid_noise"].values()))
    if not ok:
        sys.exit("the trained extractor failed its checks: not written")
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    save_file(state, args.out)
    print(f"wrote {args.out} sha256 {sha256_file(args.out)} ({sum(v.numel() for v in state.values())} values)")


if __name__ == "__main__":
    main()
