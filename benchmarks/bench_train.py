"""Training-step speed of any class-conditional preset, per lever set, optionally beside the official DiT code.

    python benchmarks/bench_train.py [--preset dit-s-2] [--batch 16] [--device cpu|cuda] [--precision fp32|bf16]
        [--steps 10] [--warmup 2] [--variant NAME:KEY=V,KEY=V ...] [--official PATH]
        [--official-precision fp32,bf16] [--json out.json] [KEY=VALUE ...]
    python benchmarks/bench_train.py --suite dit-s-2,dit-b-2,dit-xl-2 --batch 32 --device cuda --json gpu.json

The second is the whole GPU table (DiT-S/2, B/2, XL/2 at the paper's 32 images per GPU, fp32 and bf16, eager
and regionally compiled); it has not been run yet (no GPU was available when it was written).

Each variant is ditk's training step (the loop's: objective loss, backward, clipping, AdamW, EMA) under the
preset plus its overrides, e.g. `--variant eager:train.compile=none --variant regional:train.compile=regional`
(default: one variant `ditk` with the preset's settings). A variant's precision is its own config's, as in the
loop: `train.mixed_precision=bf16` autocasts the model's forward to bf16 exactly as accelerate does in `ditk train`
(fp32 master weights, outputs back to fp32 for the loss) and `runtime.matmul_precision=medium` lets fp32 matmuls
use bf16 internally; `--precision bf16` sets `train.mixed_precision=bf16` for every variant that does not set it.
Thread counts are compared in separate processes
(`OMP_NUM_THREADS=N`): switching torch's threads at every alternating step costs more than the step itself. `--official PATH` adds the official
facebookresearch/DiT step (PATH is a local checkout, imported from there, never copied here): its DiT,
`create_diffusion("")`, AdamW(lr=1e-4, wd=0) and its EMA loop, with the same weights, batch and shapes; one row
per `--official-precision` (default: --precision): `official-bf16` wraps the official model's forward in the same
bf16 autocast as ditk's bf16 variants (the official train.py itself trains in fp32).
Variants run ALTERNATING, one step each per round, so that a busy machine slows them alike; the table gives
median step time, images/s, model FLOPs per step (FlopCounterMode) and MFU against a large matmul timed
on the same device and precision, the time blocked on the data loader, peak memory (CUDA: allocated; CPU: the
process's max RSS) and each variant's time relative to the first. The data are random latents served by a
DataLoader (`--workers`): the same for every variant; the VAE is not part of the step, unless `--vae`.

`--vae`: end to end with a VAE, ditk's default against the official code's way. Each variant then runs twice:
on precomputed latents (`train.precompute_latents=true`: the step reads the stored posterior moments, mean and
std of 32x32x4 latents, and draws a fresh latent from them, as ditk.data.latents.PosteriorDraw) and, as `NAME+vae`, on
pixels encoded by the VAE at every step (facebookresearch/DiT train.py: `vae.encode(x).latent_dist.sample()
* 0.18215` under no_grad, fp32, before the model). The VAE is an AutoencoderKL of Stable Diffusion's real
architecture (the sd-vae-ft-ema config, 83.7M parameters) with random weights: no download, and the
encoder's cost does not depend on its weights. With --official, the official step also encodes every step.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import sys
import time

import torch

from ditk.build import build_conditioner, build_model, build_objective, latent_shape
from ditk.config import resolve
from ditk.speed import apply_model_levers, build_optimizer, update_ema

DEFAULT_THREADS = torch.get_num_threads()  # torch's default here (OMP_NUM_THREADS, else one per core)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _loader(shape, num_classes, batch, workers, seed):
    g = torch.Generator().manual_seed(seed)
    n = batch * 8
    data = torch.utils.data.TensorDataset(torch.randn((n, *shape), generator=g),
                                          torch.randint(0, max(num_classes, 1), (n,), generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                                         persistent_workers=workers > 0, generator=g)
    while True:  # endless: the timed steps never see an epoch boundary the other variants do not
        yield from loader


def sd_vae(device):
    """Stable Diffusion's VAE (stabilityai/sd-vae-ft-ema's config.json) with random weights, as ditk's encoder."""
    from diffusers import AutoencoderKL

    from ditk.autoencoders import KLAutoencoder

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                        layers_per_block=2, act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=256,
                        scaling_factor=0.18215)
    return KLAutoencoder(vae.to(device), "sd-vae-ft-ema config, random weights", scale_factor=0.18215)


def bf16_forward(model, device):
    """What accelerate's `prepare` does to the model under `mixed_precision="bf16"` (ditk.train): its forward
    runs under torch.autocast(device, bfloat16) and floating outputs return to fp32; weights stay fp32."""
    from accelerate.utils import convert_outputs_to_fp32

    forward = model.forward
    model.forward = convert_outputs_to_fp32(torch.autocast(device.type, dtype=torch.bfloat16)(forward))
    return model


def variant_precision(cfg) -> str:
    """The row's precision label: the autocast dtype, plus the fp32 matmul precision when not `highest`."""
    mixed = {"no": "fp32"}.get(str(cfg.train.mixed_precision), str(cfg.train.mixed_precision))
    matmul = str(cfg.runtime.get("matmul_precision", "highest"))
    return mixed if matmul == "highest" else f"{mixed}/{matmul}"


def ditk_variant(preset, overrides, args, device, vae=None, cached=None):
    """ditk's step for one lever set; returns (step function, parameter count, config). vae: encode pixels at
    every step (the official way) instead of reading precomputed latents; cached: read that VAE's posterior
    moments (2C channels) and draw the latents from them, as train.precompute_latents does."""
    cfg = resolve(preset, overrides, allow_missing=("data", "autoencoder"))
    torch.manual_seed(0)
    model = build_model(cfg)
    objective = build_objective(cfg)
    conditioner = build_conditioner(cfg, int(getattr(model, "num_classes", 0) or 0), model=model)
    ema = copy.deepcopy(model).requires_grad_(False).eval().to(device)
    model.to(device)
    apply_model_levers(model, cfg.train)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg.optim, device)
    shape = latent_shape(model)
    pixels = (3, shape[1] * vae.downsample, shape[2] * vae.downsample) if vae is not None else shape
    if cached is not None:
        from ditk.data.latents import PosteriorDraw

        draw = PosteriorDraw(cached)
        pixels = (2 * shape[0], *shape[1:])  # cat(mean, std), as the latent cache stores them
    batches = _loader(pixels, getattr(model, "num_classes", 0) or 0, args.batch, args.workers, 0)
    gen = torch.Generator().manual_seed(0)
    if cfg.train.mixed_precision not in ("no", "bf16"):
        raise SystemExit(f"train.mixed_precision={cfg.train.mixed_precision}: the harness times no and bf16")
    if cfg.train.mixed_precision == "bf16":  # after the levers, as the loop calls accelerator.prepare after them
        bf16_forward(model, device)
    matmul = matmul_precision(cfg.runtime.get("matmul_precision", "highest"))
    clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
    if int(cfg.runtime.threads):
        raise SystemExit("runtime.threads: measure thread counts in separate processes (OMP_NUM_THREADS=N python "
                         "benchmarks/bench_train.py ...): switching torch's threads between alternating steps costs "
                         "far more than the step")
    model.train()

    def step():
        torch.set_float32_matmul_precision(matmul)  # per step: the variants alternate in one process
        t0 = time.perf_counter()
        x0, labels = next(batches)
        wait = time.perf_counter() - t0
        x0, labels = x0.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if vae is not None:
            x0 = vae.encode(x0, generator=gen)  # no_grad, fp32: as the official train.py
        elif cached is not None:
            x0 = draw.encode(x0, generator=gen)  # a fresh posterior draw per step
        t = objective.sample_time(args.batch, gen).to(device)
        noise = torch.randn((args.batch, *shape), generator=gen).to(device)
        loss = objective.training_losses(model, x0, t, noise, conditioner.cond(labels))["loss"].mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)  # what accelerate's clip calls
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_ema(ema, model, cfg.train.ema_decay)
        return wait

    return step, sum(p.numel() for p in model.parameters()), cfg


def matmul_precision(value) -> str:
    from ditk.speed import MATMUL_PRECISIONS

    if str(value) not in MATMUL_PRECISIONS:
        raise SystemExit(f"runtime.matmul_precision={value}: one of {', '.join(MATMUL_PRECISIONS)}")
    return str(value)


def official_variant(path, cfg, args, device, vae=None, precision="fp32"):
    """The official DiT training step (facebookresearch/DiT train.py), imported from a local checkout. precision
    bf16: its model's forward under the same autocast as ditk's bf16 variants (the official code has none)."""
    sys.path.insert(0, path)
    try:
        from diffusion import create_diffusion
        from models import DiT
    finally:
        sys.path.remove(path)
    m = cfg.model
    torch.manual_seed(0)
    model = DiT(input_size=m.input_size, patch_size=m.patch_size, in_channels=m.in_channels,
                hidden_size=m.hidden_size, depth=m.depth, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio,
                class_dropout_prob=m.class_dropout_prob, num_classes=m.num_classes, learn_sigma=m.learn_sigma).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    diffusion = create_diffusion(timestep_respacing="")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    shape = (m.in_channels, m.input_size, m.input_size)
    if vae is not None:
        shape = (3, m.input_size * vae.downsample, m.input_size * vae.downsample)
    batches = _loader(shape, m.num_classes, args.batch, args.workers, 0)
    if precision == "bf16":
        bf16_forward(model, device)
    model.train()

    @torch.no_grad()
    def official_ema(decay=0.9999):  # official train.py update_ema
        ema_params = dict(ema.named_parameters())
        for name, param in model.named_parameters():
            ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)

    def step():
        torch.set_float32_matmul_precision("highest")  # torch's default, which the official code runs under
        t0 = time.perf_counter()
        x, y = next(batches)
        wait = time.perf_counter() - t0
        x, y = x.to(device), y.to(device)
        if vae is not None:
            with torch.no_grad():  # official train.py
                x = vae.vae.encode(x).latent_dist.sample().mul_(0.18215)
        t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=device)
        loss = diffusion.training_losses(model, x, t, dict(y=y))["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        official_ema()
        return wait

    return step, sum(p.numel() for p in model.parameters())


def step_flops(cfg, args, device) -> int:
    """Model FLOPs of one training step (forward + backward, counted by torch's FlopCounterMode on an eager
    copy; activation checkpointing's recomputation is not counted, as MFU conventionally does not). On CPU this
    torch does not count the fused attention kernel: DiT-S/2's forward counts 10.9 GFLOP per image against the
    paper's 6.06 GMAC = 12.1 GFLOP, the difference being QK^T and AV; MFU on CPU is therefore a slight floor."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(cfg).to(device)
    objective = build_objective(cfg)
    conditioner = build_conditioner(cfg, int(getattr(model, "num_classes", 0) or 0), model=model)
    shape = latent_shape(model)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn((args.batch, *shape), generator=gen).to(device)
    labels = torch.zeros(args.batch, dtype=torch.long, device=device)
    with FlopCounterMode(display=False) as counter:
        t = objective.sample_time(args.batch, gen).to(device)
        noise = torch.randn((args.batch, *shape), generator=gen).to(device)
        objective.training_losses(model, x0, t, noise, conditioner.cond(labels))["loss"].mean().backward()
    return counter.get_total_flops()


def matmul_ceiling(device, precision) -> float:
    """FLOP/s of a large square matmul on this device in this precision (a variant_precision label: bf16 = bf16
    operands; fp32/medium = fp32 operands under that fp32 matmul precision): the MFU denominator."""
    n = 4096 if device.type == "cuda" else 1024
    mixed, _, matmul = precision.partition("/")
    dtype = torch.bfloat16 if mixed == "bf16" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    torch.set_float32_matmul_precision(matmul or "highest")
    times = []
    for _ in range(6):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t0)
    torch.set_float32_matmul_precision("highest")
    return 2 * n ** 3 / statistics.median(times[1:])


def measure(variants, args, device):
    """Alternate the variants one step at a time; per variant: step seconds and data-wait seconds."""
    for _, step, *_ in variants:
        for _ in range(args.warmup):  # compilation and allocator warm-up, untimed
            step()
    times = {name: [] for name, *_ in variants}
    waits = {name: [] for name, *_ in variants}
    peak = {}
    for _ in range(args.steps):
        for name, step, *_ in variants:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            t0 = time.perf_counter()
            waits[name].append(step())
            _sync(device)
            times[name].append(time.perf_counter() - t0)
            if device.type == "cuda":
                peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated(device))
    torch.set_float32_matmul_precision("highest")  # a variant's runtime.matmul_precision ends with the run
    return times, waits, peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE overrides applied to every ditk variant")
    parser.add_argument("--preset", default="dit-s-2", help="a class-conditional preset (default: dit-s-2)")
    parser.add_argument("--batch", type=int, default=16, help="images per step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME:KEY=V,KEY=V a ditk lever set (repeatable; the first is the reference)")
    parser.add_argument("--official", default="", help="path of a local facebookresearch/DiT checkout")
    parser.add_argument("--official-precision", default="",
                        help="comma-separated: one official row per precision, fp32 and/or bf16 (default: --precision)")
    parser.add_argument("--json", default="", help="write the results here as JSON")
    parser.add_argument("--vae", action="store_true",
                        help="also run each variant encoding pixels with a random SD-VAE at every step (NAME+vae)")
    parser.add_argument("--suite", default="",
                        help="comma-separated presets: run each in fp32 and bf16, variants (default) eager and "
                             "compiled (train.compile=regional); e.g. the GPU table: dit-s-2,dit-b-2,dit-xl-2")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.warmup < 0:
        parser.error("--steps and --batch must be >= 1, --warmup >= 0")
    if not set(filter(None, args.official_precision.split(","))) <= {"fp32", "bf16"}:
        parser.error("--official-precision: a comma-separated list of fp32 and bf16")
    if not args.suite:
        result = run(args)
    else:
        import gc

        result = []
        for preset in filter(None, args.suite.split(",")):
            for precision in ("fp32", "bf16"):
                one = argparse.Namespace(**{**vars(args), "preset": preset, "precision": precision,
                                            "official_precision": "",
                                            "variant": args.variant or ["eager:train.compile=none",
                                                                        "compiled:train.compile=regional"]})
                result.append(run(one))
                gc.collect()  # free one configuration's models before the next
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def run(args):
    """One table: the variants of one preset, batch, device and precision, alternating."""
    device = torch.device(args.device)

    variants, cfg = [], None  # (name, step, params, precision label)
    vae = sd_vae(device) if getattr(args, "vae", False) else None
    common = [*(["train.mixed_precision=bf16"] if args.precision == "bf16" else []), *args.overrides]
    for spec in args.variant or ["ditk:"]:
        name, _, keys = spec.partition(":")
        overrides = [*common, *filter(None, keys.split(","))]
        step, params, cfg_v = ditk_variant(args.preset, overrides, args, device, cached=vae)
        cfg = cfg or cfg_v
        variants.append((name, step, params, variant_precision(cfg_v)))
        if vae is not None:
            step, params, _ = ditk_variant(args.preset, overrides, args, device, vae=vae)
            variants.append((f"{name}+vae", step, params, variant_precision(cfg_v)))
    officials = []
    if args.official:
        precisions = list(filter(None, getattr(args, "official_precision", "").split(","))) or [args.precision]
        for precision in precisions:
            step, params = official_variant(args.official, cfg, args, device, vae=vae, precision=precision)
            name = "official" if len(precisions) == 1 else f"official-{precision}"
            officials.append(name + ("+vae" if vae is not None else ""))
            variants.append((officials[-1], step, params, precision))

    flops = step_flops(cfg, args, device)
    ceilings = {p: matmul_ceiling(device, p) for p in dict.fromkeys(v[3] for v in variants)}
    times, waits, peak = measure(variants, args, device)
    ref = statistics.median(times[variants[0][0]])
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows = []
    for name, _, params, precision in variants:
        ms = statistics.median(times[name]) * 1e3
        rows.append({"variant": name, "precision": precision, "params": params, "step_ms": ms,
                     "images_per_s": args.batch / ms * 1e3, "data_wait_ms": statistics.median(waits[name]) * 1e3,
                     "ratio": ms / (ref * 1e3), "model_gflop": flops / 1e9,
                     "mfu": flops / (ms / 1e3) / ceilings[precision],
                     "peak_mem_mb": peak[name] / 2 ** 20 if name in peak else None})
    print(f"{args.preset}  batch {args.batch}  {device.type}  {args.precision}  {args.steps} alternating steps  "
          f"default threads {DEFAULT_THREADS}  overrides: {' '.join(args.overrides) or '-'}")
    print(f"model {flops / 1e9:.2f} GFLOP per step (forward + backward); matmul ceiling (GFLOP/s): "
          + ", ".join(f"{p} {c / 1e9:.1f}" for p, c in ceilings.items()))
    print(f"{'variant':<16}{'precision':>12}{'params':>12}{'step ms':>10}{'img/s':>9}{'MFU %':>7}{'wait ms':>9}"
          f"{'peak MB':>9}{'x first':>9}")
    for r in rows:
        mem = f"{r['peak_mem_mb']:.0f}" if r["peak_mem_mb"] is not None else f"{rss_mb:.0f}*"
        print(f"{r['variant']:<16}{r['precision']:>12}{r['params']:>12,}{r['step_ms']:>10.1f}{r['images_per_s']:>9.1f}"
              f"{100 * r['mfu']:>7.1f}{r['data_wait_ms']:>9.2f}{mem:>9}{r['ratio']:>9.3f}")
    if device.type != "cuda":
        print("* CPU: the whole process's max RSS, not per variant")
    ms_of = {r["variant"]: r["step_ms"] for r in rows}
    for r in rows:
        if r["variant"] not in officials:
            r["vs_official"] = {o: r["step_ms"] / ms_of[o] for o in officials}
            for o, ratio in r["vs_official"].items():
                print(f"{r['variant']} / {o} step time: {ratio:.3f}")
    result = {"preset": args.preset, "batch": args.batch, "device": device.type, "precision": args.precision,
              "steps": args.steps, "default_threads": DEFAULT_THREADS, "overrides": args.overrides,
              "process_max_rss_mb": rss_mb, "model_gflop_per_step": flops / 1e9,
              "matmul_ceiling_gflops": {p: c / 1e9 for p, c in ceilings.items()}, "rows": rows}
    if vae is not None:
        result["vae_params"] = sum(p.numel() for p in vae.vae.parameters())
        print(f"VAE: {result['vae_params']:,} parameters ({vae.path}); model FLOPs and MFU count the DiT only")
    return result


if __name__ == "__main__":
    main()
