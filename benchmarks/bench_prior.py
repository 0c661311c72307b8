"""Compare natural-image priors (photos-dit / photos-dit-flow runs) the way `ditk restore` sees them, in one run.

    python benchmarks/bench_prior.py OLD_RUN NEW_RUN [--num 1000] [--work /tmp/bench-prior]

Two measures per run (EMA weights):
- held-out loss: the run's own training loss (DDPM: simple MSE + the learned-variance VLB term; flow: velocity
  MSE) on the 28 held-out test crops of the `photos` data set (never trained on), each repeated --reps times
  with the SAME (t, noise) draws for every run, so the difference to the first run is a paired one (mean and
  standard error). It measures the denoiser that the restoration methods call.
- unconditional FID / KID: `ditk evaluate-fid --run RUN --num N` (the preset's solver and steps, seed 0, the
  `photos` extractor, against the 5,000 training crops); samples go under --work, not into the run.
Runs compared with each other must share the objective (their losses are on one scale only then).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch


def heldout_losses(run: str, reps: int, batch: int = 140) -> torch.Tensor:
    """Per-draw training losses of RUN's EMA model on the held-out crops (fixed seeds: paired across runs)."""
    from ditk.data.photos import Photos, PhotosConfig
    from ditk.generate import load_pipeline

    pipe = load_pipeline(run, device="cpu")
    x = torch.as_tensor(Photos(PhotosConfig(split="test")).images).float().repeat(reps, 1, 1, 1)
    x0 = pipe.autoencoder.encode(x)  # identity for the pixel-space photos priors
    g = torch.Generator().manual_seed(1)
    t = pipe.objective.sample_time(len(x0), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    out = []
    with torch.no_grad():
        for i in range(0, len(x0), batch):
            s = slice(i, i + batch)
            cond = pipe.conditioner.uncond(len(x0[s]))
            out.append(pipe.objective.training_losses(pipe.model, x0[s], t[s], noise[s], cond)["loss"])
    return torch.cat(out).double()


def fid(run: str, num: int, samples: Path) -> dict:
    cmd = [sys.executable, "-m", "ditk", "evaluate-fid", "--run", run, "--num", str(num), "--samples-dir",
           str(samples), "--no-progress"]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run directories (the first is the reference of the paired differences)")
    ap.add_argument("--reps", type=int, default=40, help="draws of (t, noise) per held-out crop")
    ap.add_argument("--num", type=int, default=1000, help="unconditional samples per run for FID (0: skip FID)")
    ap.add_argument("--work", default="/tmp/bench-prior", help="where the FID samples go")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    print(f"| run | held-out loss | vs {Path(args.runs[0]).name} (paired) | FID ({args.num}) | KID x 10^3 |")
    print("|---|---|---|---|---|")
    first = None
    for i, run in enumerate(args.runs):
        loss = heldout_losses(run, args.reps)
        if first is None:
            first = loss
        d = loss - first
        diff = f"{d.mean():+.5f} ± {d.std() / len(d) ** 0.5:.5f}" if i else ""
        f = fid(run, args.num, work / f"{i}-{Path(run).name}") if args.num else None
        fid_s = f"{f['fid']:.2f}" if f else ""
        kid_s = f"{f['kid_mean']:.2f} ± {f['kid_std']:.2f}" if f else ""
        print(f"| {run} | {loss.mean():.5f} | {diff} | {fid_s} | {kid_s} |", flush=True)


if __name__ == "__main__":
    main()
