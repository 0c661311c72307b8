"""Feature caching side by side: time per image and distance to full compute, for every policy at its defaults.

    python benchmarks/bench_cache.py --run runs/digits-dit      # a trained digits DiT (ditk train digits-dit)
    python benchmarks/bench_cache.py --skip-digits               # only the random-weight DiT-S/2
    python benchmarks/bench_cache.py --skip-digits --skip-dit --backbones all   # every backbone, random weights

Two models:
- the digits DiT of a run (`--run`; without it, one is trained first into --work, `ditk train digits-dit`,
  which takes minutes on an idle CPU and much longer on a shared one), sampled with the run's own settings
  (digits-dit: DDPM 100 steps, CFG 2);
- a DiT-S/2-sized model (33M parameters, 32x32x4 latents, 256 tokens) with random weights, sampled with
  50-step DDIM and CFG 1.5 (TaylorSeer's DiT protocol). adaLN-Zero would make every random block the identity,
  so its zero-initialised layers are re-drawn from N(0, 0.02);
- with --backbones: DiT, DiT-MoE, DiS, Diffusion-RWKV, Dimba and FluxMusic at one small size (width 192, 256
  tokens, random weights as above), 20 DDIM steps (FluxMusic: flow Euler) with CFG 1.5.

For each model and policy (none, fora, taylorseer, delta-dit, fbc, teacache uncalibrated and calibrated) it
prints one JSON object, then a Markdown table: seconds per image (best of --repeats interleaved runs: on a
shared machine the fastest run is the least disturbed one),
speed-up over no cache, the fraction of block compute that ran, and the distance of the samples to the
uncached ones (same seeds): relative L2 error, and PSNR of the uint8 images for the digits.
Timing is never part of the tests.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ditk.cache import build_policy
from ditk.cache.pipeline import psnr
from ditk.cache.residual import TeaCache, TeaCacheConfig
from ditk.io import to_uint8

POLICIES = ["none", "fora", "taylorseer", "delta-dit", "fbc", "teacache", "teacache-calibrated"]


def compute_fraction(report: dict) -> float:
    """Share of the hooked units' evaluations that ran (1.0 without caching)."""
    units = report["units"].values()
    done = sum(u["computed"] for u in units)
    total = done + sum(u["cached"] for u in units)
    return done / total if total else 1.0


def calibrate(run_fn) -> list:
    """TeaCache's calibration for a row: one full run recorded, the rescaling polynomial fitted."""
    recorder = TeaCache(TeaCacheConfig(), record=True)
    run_fn(recorder)
    return recorder.fit()


def bench(name: str, run_fn, repeats: int, n_images: int, images: bool) -> list[dict]:
    """run_fn(policy) -> samples (N, C, H, W) on the CPU."""
    coefficients = calibrate(run_fn)
    times = {p: [] for p in POLICIES}
    outputs, reports = {}, {}
    run_fn(build_policy("none"))  # warm-up (lazy imports, allocator)
    for _ in range(repeats):
        for p in POLICIES:  # interleaved, so a load change on the machine hits every policy alike
            policy = (build_policy("teacache", {"coefficients": coefficients}) if p == "teacache-calibrated"
                      else build_policy(p))
            start = time.perf_counter()
            outputs[p] = run_fn(policy)
            times[p].append(time.perf_counter() - start)
            reports[p] = policy.report()
    base = min(times["none"])
    rows = []
    for p in POLICIES:
        t = min(times[p])
        ref, out = outputs["none"], outputs[p]
        row = {
            "model": name, "policy": p, "options": reports[p]["options"],
            "seconds_per_image": round(t / n_images, 5), "speedup": round(base / t, 3),
            "compute_fraction": round(compute_fraction(reports[p]), 3),
            "full_evaluations": reports[p]["full_evaluations"], "model_evaluations": reports[p]["model_evaluations"],
            "rel_l2_error": round(float((out - ref).norm() / ref.norm()), 5),
            "psnr_db": (lambda v: None if not np.isfinite(v) else round(v, 2))(psnr(to_uint8(out), to_uint8(ref)))
            if images else None,
            "runs_seconds": [round(s, 3) for s in times[p]],
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def digits(args) -> list[dict]:
    from ditk.generate import load_pipeline, sample_images

    run = args.run
    if run is None:
        run = str(Path(args.work) / "digits-dit")
        if not (Path(run) / "checkpoints" / "latest").is_file():
            print(f"[bench] training digits-dit into {run} (use --run to reuse a trained run)", file=sys.stderr)
            subprocess.run(["ditk", "train", "digits-dit", f"run.dir={args.work}", "--no-progress"], check=True)
    pipe = load_pipeline(run, overrides=[f"sample.num={args.digits_images}", f"sample.batch_size={args.digits_images}"],
                         device=args.device)
    indices = list(range(args.digits_images))
    sc = pipe.cfg.sample
    print(f"[bench] digits: {run}, {sc.solver} {sc.steps} steps, cfg {sc.cfg_scale}, {len(indices)} images",
          file=sys.stderr)

    return bench(f"digits DiT ({Path(run).name}, {sc.solver}{sc.steps}, cfg {sc.cfg_scale:g})",
                 lambda policy: sample_images(pipe, indices, cache=policy), args.repeats, len(indices), True)


def dit_s2(args) -> list[dict]:
    from ditk.build import build_model, build_objective
    from ditk.config import resolve
    from ditk.sampling import sample

    device = torch.device(args.device)
    cfg = resolve("dit-s-2", allow_missing=("data", "autoencoder"))
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and (p == 0).all() and ("adaLN_modulation" in name or "final_layer" in name):
                p.normal_(0, 0.02)
    model = model.to(device).eval().requires_grad_(False)
    objective = build_objective(cfg)
    n = args.dit_images
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(n)]  # noqa: E731
    noise = torch.stack([torch.randn(4, 32, 32, generator=g) for g in gens()]).to(device)
    y = torch.arange(n, device=device) % 1000
    null = torch.full((n,), 1000, device=device)
    print(f"[bench] DiT-S/2 random weights: ddim {args.dit_steps} steps, cfg 1.5, {n} images", file=sys.stderr)

    def run_fn(policy):
        out = sample(model, objective, noise, {"y": y}, {"y": null}, solver="ddim", steps=args.dit_steps,
                     cfg_scale=1.5, cfg_channels=3, generator=gens(), cache=policy)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out.cpu()

    return bench(f"DiT-S/2 random (32x32x4, ddim{args.dit_steps}, cfg 1.5)", run_fn, args.repeats, n, False)


# Backbones at one common small size (256 tokens, width 192, random weights): what each policy costs and saves on
# each architecture. name -> (builder kwargs, sampler). Their numbers show cost, not quality (see dit_s2).
BACKBONES = {
    "dit": dict(depth=8, num_heads=3),
    "dit-moe": dict(depth=8, num_heads=3, num_experts=4, top_k=2, num_shared_experts=1),
    "dis": dict(depth=8, scan_backend="torch"),  # 9 Mamba blocks (4 in, mid, 4 out)
    "diffusion-rwkv": dict(depth=9, wkv_impl="torch"),  # 4 in, mid, 4 out
    "dimba": dict(depth=6, num_heads=3, caption_channels=384, scan_backend="torch"),  # 6 layers, Mamba after each
    "fluxmusic": dict(input_size=16, frames=64, in_channels=8, num_heads=3, depth_double=3, depth_single=6,
                      axes_dim=(16, 24, 24), context_dim=384, pooled_dim=384),  # 8 x 32 patches of an 8-channel latent
}


def build_backbone(name: str, device):
    """A random-weight model of the backbone (all-zero tensors, e.g. adaLN-Zero gates, re-drawn from N(0, 0.02)),
    its conditioning for n images and its noise shape."""
    from ditk.models.dimba import Dimba
    from ditk.models.dis import DiS
    from ditk.models.dit import DiT
    from ditk.models.dit_moe import DiTMoE
    from ditk.models.mmdit import FluxMusic
    from ditk.models.rwkv import DiffusionRWKV

    torch.manual_seed(0)
    image = dict(input_size=32, patch_size=2, in_channels=4, hidden_size=192, learn_sigma=False)
    kw = BACKBONES[name]
    cls = {"dit": DiT, "dit-moe": DiTMoE, "dis": DiS, "diffusion-rwkv": DiffusionRWKV, "dimba": Dimba}.get(name)
    if name == "fluxmusic":
        model = FluxMusic(patch_size=2, hidden_size=192, **kw)
        shape = (8, 16, 64)
    else:
        model = cls(**image, **({} if name == "dimba" else {"num_classes": 1000}), **kw)
        shape = (4, 32, 32)
    with torch.no_grad():
        for p in model.parameters():
            if (p == 0).all():
                p.normal_(0, 0.02)
    model = model.to(device).eval().requires_grad_(False)

    def conditions(n):
        g = torch.Generator().manual_seed(1)
        if name == "fluxmusic":
            c = {"context": torch.randn(n, 16, 384, generator=g), "pooled": torch.randn(n, 384, generator=g)}
            u = {"context": torch.zeros(n, 16, 384), "pooled": torch.zeros(n, 384)}
        elif name == "dimba":
            mask = torch.ones(n, 16, dtype=torch.bool)
            c = {"context": torch.randn(n, 16, 384, generator=g), "context_mask": mask}
            u = {"context": torch.zeros(n, 16, 384), "context_mask": mask}
        else:
            c, u = {"y": torch.arange(n) % 1000}, {"y": torch.full((n,), 1000)}
        move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        return move(c), move(u)

    return model, conditions, shape


def backbones(args) -> list[dict]:
    from ditk.objectives.ddpm import DDPM, DDPMConfig
    from ditk.objectives.flow import FlowConfig, RectifiedFlow
    from ditk.sampling import sample

    device = torch.device(args.device)
    names = list(BACKBONES) if args.backbones == "all" else args.backbones.split(",")
    rows = []
    for name in names:
        model, conditions, shape = build_backbone(name, device)
        flow = name == "fluxmusic"
        objective = RectifiedFlow(FlowConfig()) if flow else DDPM(DDPMConfig(variance="fixed_small"))
        solver = "euler" if flow else "ddim"
        n = args.backbone_images
        cond, uncond = conditions(n)
        gens = lambda: [torch.Generator().manual_seed(i) for i in range(n)]  # noqa: E731
        noise = torch.stack([torch.randn(shape, generator=g) for g in gens()]).to(device)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"[bench] {name}: {params:.1f}M parameters, {len(model.blocks)} blocks, {solver} "
              f"{args.backbone_steps} steps, cfg 1.5, {n} images", file=sys.stderr)

        def run_fn(policy):
            out = sample(model, objective, noise, cond, uncond, solver=solver, steps=args.backbone_steps,
                         cfg_scale=1.5, generator=gens(), cache=policy)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return out.cpu()

        rows += bench(f"{name} random ({len(model.blocks)} blocks, width 192, 256 tokens, {solver}{args.backbone_steps})",
                      run_fn, args.repeats, n, False)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | policy | s / image | speed-up | block compute | full evals / total | rel. L2 error | PSNR (dB) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        psnr_text = "identical" if r["psnr_db"] is None and r["rel_l2_error"] == 0 else (r["psnr_db"] or "-")
        lines.append(f"| {r['model']} | {r['policy']} | {r['seconds_per_image']:.4f} | {r['speedup']:.2f}x | "
                     f"{100 * r['compute_fraction']:.0f}% | {r['full_evaluations']:g} / {r['model_evaluations']:g} | "
                     f"{r['rel_l2_error']:.4f} | {psnr_text} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a trained digits DiT run (default: train one into --work)")
    parser.add_argument("--work", default="runs", help="where to train the digits run when --run is not given")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--digits-images", type=int, default=64)
    parser.add_argument("--dit-images", type=int, default=4)
    parser.add_argument("--dit-steps", type=int, default=50)
    parser.add_argument("--backbones", default="", help="also benchmark these backbones at a common small size "
                        f"(comma-separated, or 'all': {', '.join(BACKBONES)})")
    parser.add_argument("--backbone-steps", type=int, default=20)
    parser.add_argument("--backbone-images", type=int, default=1)
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--skip-dit", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    if not args.skip_digits:
        rows += digits(args)
    if not args.skip_dit:
        rows += dit_s2(args)
    if args.backbones:
        rows += backbones(args)
    print(f"\n{table(rows)}\n\ndevice: {args.device}, torch threads: {torch.get_num_threads()}, "
          f"repeats: {args.repeats} (best of)")


if __name__ == "__main__":
    main()
