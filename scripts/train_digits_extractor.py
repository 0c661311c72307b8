"""Train the `digits` FID feature extractor and write ditk/metrics/weights/digits-cnn.safetensors.

Why: Inception features of 8x8 digits upscaled to 299x299 say little and cost minutes on a CPU. A small
CNN that tells digits apart gives features in which FID separates good digit samples from bad ones, in
seconds, with no download. ditk ships the result; this script is how it was made.

How it was made (`python scripts/train_digits_extractor.py`, CPU, one thread, about 5 s of training):
- data: scikit-learn's digits (1797 images, 8x8, ink 0..16). Training uses ditk's digits `train` split and
  holds out its `test` split (ditk.data.digits.split_indices: 10 % per class, 179 images), so FID against
  the test split uses features that never saw those images.
- pixels: exactly what a ditk sample of that image becomes: ink v -> x = v/8 - 1 in [-1, 1] -> uint8
  floor(clamp(127.5 x + 128, 0, 255)) (DiT's `to_uint8`), and the network reads uint8 / 255.
- augmentation (seeded): shifts of up to one pixel, and for half of each batch a bilinear upsampling by 2
  or 4 followed by area-averaging back to 8x8, which is what the extractor sees for ditk's digits trained at
  `data.image_size` 16 or 32.
- network: ditk.metrics.extractors.DigitsNet (38,282 parameters, float32, 154,380 bytes); Adam lr 2e-3,
  batch 64, 60 epochs, torch.manual_seed(0). The features (the 64-d penultimate layer before its ReLU) are
  then centred on the training images' mean and divided by one scalar, the root of their mean variance
  (stored in the file as `feature_mean`, `feature_scale`), so FID and KID work at an O(1) feature scale.
- result (torch 2.14.1, CPU): held-out accuracy 1.0000 (179/179) on the clean test split, and 1.0000 on its
  2x and 4x upsampled-then-area-averaged versions; training accuracy 0.9981 (un-augmented train images).
- sha256 of the file: bb8e150c2f4549caf512c5796971b0611598e7c52d5b21005bed743631605df5 (DIGITS_SHA256 in
  ditk/metrics/extractors.py, which the extractor checks at load).

Re-running reproduces the file bit for bit on the same CPU and torch version; another CPU or torch version may
change the last bits of the weights (and so the sha256) but not the accuracy, which the script checks
(> 95 %). After re-training, copy the printed sha256 into DIGITS_SHA256.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ditk.data.digits import split_indices
from ditk.metrics.extractors import DIGITS_WEIGHTS, DigitsNet
from ditk.metrics.offline import sha256_file

MIN_ACCURACY = 0.95


def digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn digits as the uint8 images ditk writes for them: (1797, 8, 8) and labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images.astype(np.float32) / 8.0 - 1.0
    return np.clip(127.5 * x + 128.0, 0, 255).astype(np.uint8), bunch.target.astype(np.int64)


def shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Move each image by -1..1 pixels in both directions, filling with paper (0)."""
    padded = F.pad(x, (1, 1, 1, 1))
    offsets = torch.randint(0, 3, (len(x), 2), generator=g)
    return torch.stack([padded[i, :, dy:dy + 8, dx:dx + 8] for i, (dy, dx) in enumerate(offsets.tolist())])


def up_down(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Bilinear upsampling (as ditk's digits data set at image_size 8*factor) then area-average back to 8x8."""
    up = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    return F.avg_pool2d(up, factor)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    x = shift(x, g)
    blur = torch.rand(len(x), generator=g) < 0.5
    factor = 2 if torch.rand(1, generator=g).item() < 0.5 else 4
    return torch.where(blur[:, None, None, None], up_down(x, factor), x)


@torch.no_grad()
def accuracy(net: DigitsNet, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    return float((net(x).argmax(1) == y).float().mean())


def train(epochs: int = 60, batch_size: int = 64, lr: float = 2e-3, seed: int = 0) -> tuple[DigitsNet, dict]:
    torch.manual_seed(seed)
    images, labels = digits_uint8()
    train_idx, test_idx = split_indices(labels, "train"), split_indices(labels, "test")
    x = torch.from_numpy(images).float().unsqueeze(1) / 255
    y = torch.from_numpy(labels)
    x_train, y_train, x_test, y_test = x[train_idx], y[train_idx], x[test_idx], y[test_idx]

    net = DigitsNet()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        net.train()
        order = torch.randperm(len(x_train), generator=g)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(net(augment(x_train[idx], g)), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    net.set_feature_normalisation(x_train)
    report = {
        "train_images": len(train_idx),
        "heldout_images": len(test_idx),
        "train_accuracy": accuracy(net, x_train, y_train),
        "heldout_accuracy": accuracy(net, x_test, y_test),
        "heldout_accuracy_upsampled_2x": accuracy(net, up_down(x_test, 2), y_test),
        "heldout_accuracy_upsampled_4x": accuracy(net, up_down(x_test, 4), y_test),
        "parameters": sum(p.numel() for p in net.parameters()),
    }
    return net, report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(DIGITS_WEIGHTS), help="where to write the safetensors file")
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # one thread: the same summation order, so the same bits, every run
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()
    net, report = train(epochs=args.epochs)
    report["seconds"] = round(time.perf_counter() - start, 2)
    if report["heldout_accuracy"] <= MIN_ACCURACY:
        print(f"held-out accuracy {report['heldout_accuracy']:.4f} is not above {MIN_ACCURACY}: not written",
              file=sys.stderr)
        return 1

    from safetensors.torch import save_file

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    about = {"format": "ditk-digits-extractor/1", "script": "scripts/train_digits_extractor.py",
             "heldout_accuracy": f"{report['heldout_accuracy']:.4f}",
             "input": "1x8x8 in [0,1] (uint8/255, ink bright)", "features": "fc1 output (64-d, before ReLU)"}
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    # One metadata entry holding sorted JSON: safetensors writes several entries in no fixed order, which
    # would change the file's sha256 from run to run.
    save_file(state, str(out), metadata={"ditk": json.dumps(about, sort_keys=True)})
    out.chmod(0o644)  # package data: readable by everyone who imports ditk
    report["path"] = str(out)
    report["bytes"] = out.stat().st_size
    report["sha256"] = sha256_file(out)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
