"""Training-step and sampling time of a DiT-S/2-sized model on 32x32x4 latents (random weights).

    python benchmarks/bench_dit.py [--device cpu|cuda] [--batch 8] [--steps 10]

Prints one JSON object per measurement on stdout, so later work (caching, compilation, new solvers)
can be compared with this baseline on the same machine. Not part of the test suite.
"""

import argparse
import json
import time

import torch

from ditk.config import resolve
from ditk.build import build_model, build_objective


def timed(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="solver steps for the sampling measurement")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)

    cfg = resolve("dit-s-2", allow_missing=("data", "autoencoder"))  # 32x32x4 latents, 256 tokens
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    objective = build_objective(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    shape = (args.batch, model.in_channels, model.input_size, model.input_size)
    x0 = torch.randn(shape, device=device)
    y = torch.randint(0, model.num_classes, (args.batch,), device=device)
    gen = torch.Generator().manual_seed(0)

    def train_step():
        t = objective.sample_time(args.batch, gen).to(device)
        noise = torch.randn(shape, generator=gen).to(device)
        loss = objective.training_losses(model, x0, t, noise, {"y": y})["loss"].mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    from ditk.sampling import sample

    def sample_batch():
        with torch.no_grad():
            noise = torch.randn(shape, generator=gen).to(device)
            sample(model, objective, noise, {"y": y}, {"y": torch.full_like(y, model.num_classes)},
                   solver="ddim", steps=args.steps, cfg_scale=1.5, cfg_channels=3)

    params = sum(p.numel() for p in model.parameters())
    step_s = timed(train_step, args.repeats, device)
    model.eval()
    sample_s = timed(sample_batch, 1, device)
    common = {"model": "DiT-S/2", "params": params, "latent": [4, 32, 32], "batch": args.batch,
              "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads()}
    print(json.dumps({**common, "measure": "train_step_s", "value": round(step_s, 4),
                      "images_per_s": round(args.batch / step_s, 2)}))
    print(json.dumps({**common, "measure": "sample_s", "solver": "ddim", "steps": args.steps, "cfg_scale": 1.5,
                      "value": round(sample_s, 4), "s_per_image": round(sample_s / args.batch, 4)}))


if __name__ == "__main__":
    main()
