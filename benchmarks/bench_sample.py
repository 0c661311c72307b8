"""Sampling speed of any class-conditional preset, per setting, optionally beside the official DiT sampling loop.

    python benchmarks/bench_sample.py [--preset dit-s-2] [--steps 50] [--batch 8] [--device cpu|cuda]
        [--precision fp32|bf16] [--solver ddpm] [--cfg-scale 4.0] [--cache none] [--compile] [--repeats 3]
        [--warmup 1] [--variant NAME:KEY=V,KEY=V ...] [--official PATH] [--official-precision fp32,bf16]
        [--json out.json] [KEY=VALUE ...]
    python benchmarks/bench_sample.py --suite dit-s-2,dit-b-2,dit-xl-2 --device cuda --batch 32 --json gpu-sample.json

The second is the whole GPU sampling table (each preset in fp32 and bf16, eager, compiled and compiled with CUDA
graphs, 50 DDPM steps with guidance 4.0 unless --steps/--solver/--cfg-scale say otherwise); it has not been run (no
GPU here). bf16 is autocast on CUDA and on CPU (oneDNN's bf16 kernels; fast on AMX / AVX512-BF16 cores).

Each variant is ditk's sampling loop (`ditk.sampling.sample`, what `ditk sample` runs, with the feature-cache
policy and compiled units of `ditk.generate.sample_images`) on one batch of latents, under the preset plus the
flags (--steps = sample.steps, --solver, --cfg-scale, --cache, --compile, --precision) plus the variant's own
keys, e.g. `--variant eager:sample.compile=false --variant compiled:sample.compile=true --variant fora:sample.cache=fora`
(default: one variant `ditk`). The VAE decode is not timed (latents only). Weights are random (seed 0) with the
all-zero tensors (adaLN-Zero gates, the final layer) re-drawn from N(0, 0.02): otherwise every block is the
identity and caching policies would skip everything. Every variant uses the same weights and the same noise.

`--official PATH` adds the official facebookresearch/DiT sampling loop (PATH is a local checkout, imported from
there, never copied here), as its sample_ddp.py runs it: `create_diffusion(str(steps))`, `p_sample_loop` with
`forward_with_cfg` on a doubled batch when cfg_scale > 1 (guidance on the first 3 channels), on the same
weights (ditk's DiT state dict has the official names) and the same noise. Its row corresponds to ditk's
`solver=ddpm` with `sample.cfg_channels=3`; the script sets those for every ditk variant when --official is
given, unless a variant overrides them. One official row per `--official-precision` (default: --precision);
bf16 runs the official loop under torch.autocast(device, bfloat16), as ditk's `sample.precision=bf16` does.

Variants run ALTERNATING, one full sampling run each per repeat, so that a busy machine slows them alike. The
table gives, per variant: images/s, milliseconds per sampling step, NFE (denoiser forward calls per run; a
CFG call on the doubled batch counts once), peak memory (CUDA: allocated; CPU: the process's max RSS) and the
time relative to the first variant.
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


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_weights(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-draw the all-zero weight tensors (adaLN-Zero, final layer) from N(0, 0.02), as bench_cache does."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.numel() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


class CallCounter:
    """Counts the denoiser's forward calls (NFE) through a forward pre-hook, or by wrapping a function (the
    official `forward_with_cfg` calls `self.forward` directly, which module hooks do not see)."""

    def __init__(self, model=None):
        self.calls = 0
        if model is not None:
            model.register_forward_pre_hook(self._count)

    def _count(self, *args):
        self.calls += 1

    def wrap(self, fn):
        def counted(*args, **kwargs):
            self.calls += 1
            return fn(*args, **kwargs)
        return counted


# --suite's variants: eager, compiled, and on CUDA compiled with CUDA graphs (static shapes while sampling)
SUITE_VARIANTS = ["eager:sample.compile=false", "compiled:sample.compile=true",
                  "graphs:sample.compile=true,sample.cuda_graphs=true"]


def ditk_variant(cfg, base_model, args, device):
    """ditk's sampling of one batch for one setting; returns (run function, config, call counter)."""
    from ditk.cache.pipeline import compiled_units, policy_for
    from ditk.generate import Pipeline
    from ditk.sampling import sample

    model = copy.deepcopy(base_model).to(device).eval()
    objective = build_objective(cfg)
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    conditioner = build_conditioner(cfg, num_classes, model=model)
    pipe = Pipeline(cfg, model, objective, None, conditioner, device)
    sc = cfg.sample
    shape = latent_shape(model)
    noise = torch.randn((args.batch, *shape), generator=torch.Generator().manual_seed(1)).to(device)
    labels = torch.arange(args.batch, device=device) % max(num_classes, 1)
    cond = conditioner.cond(labels) if num_classes else {}
    uncond = conditioner.uncond(args.batch, device) if sc.cfg_scale != 1.0 else None
    policy = policy_for(pipe)
    counter = CallCounter(model)

    @torch.no_grad()
    def run():
        gens = [torch.Generator().manual_seed(i) for i in range(args.batch)]
        with compiled_units(model, policy, sc.compile, sc.cuda_graphs):
            return sample(model, objective, noise, cond, uncond, solver=sc.solver, steps=sc.steps,
                          cfg_scale=sc.cfg_scale, cfg_channels=sc.cfg_channels, generator=gens,
                          solver_options=dict(sc.solver_options), cache=policy, precision=sc.precision)

    return run, counter


def official_variant(path, cfg, base_model, args, device, precision="fp32"):
    """The official DiT sampling loop (sample_ddp.py's), imported from a local checkout."""
    sys.path.insert(0, path)
    try:
        from diffusion import create_diffusion
        from models import DiT
    finally:
        sys.path.remove(path)
    m, sc = cfg.model, cfg.sample
    model = DiT(input_size=m.input_size, patch_size=m.patch_size, in_channels=m.in_channels,
                hidden_size=m.hidden_size, depth=m.depth, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio,
                class_dropout_prob=m.class_dropout_prob, num_classes=m.num_classes, learn_sigma=m.learn_sigma)
    model.load_state_dict(base_model.state_dict())  # the same weights (ditk keeps the official names)
    model.to(device).eval()
    diffusion = create_diffusion(str(sc.steps))
    shape = (m.in_channels, m.input_size, m.input_size)
    noise = torch.randn((args.batch, *shape), generator=torch.Generator().manual_seed(1)).to(device)
    y = torch.arange(args.batch, device=device) % m.num_classes
    using_cfg = sc.cfg_scale > 1.0
    if using_cfg:  # sample_ddp.py: the batch doubled with the null class, forward_with_cfg
        z = torch.cat([noise, noise], 0)
        y = torch.cat([y, torch.full_like(y, m.num_classes)], 0)
        kwargs, fn = dict(y=y, cfg_scale=sc.cfg_scale), model.forward_with_cfg
    else:
        z, kwargs, fn = noise, dict(y=y), model.forward
    counter = CallCounter()
    fn = counter.wrap(fn)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    @torch.no_grad()
    def run():
        with autocast:
            out = diffusion.p_sample_loop(fn, z.shape, z, clip_denoised=False, model_kwargs=kwargs, progress=False,
                                          device=device)
        return out.chunk(2, 0)[0] if using_cfg else out

    return run, counter


def measure(variants, args, device):
    """Alternate the variants one sampling run at a time; per variant: seconds per run, NFE, CUDA peak."""
    nfe = {}
    for name, run, counter in variants:
        for i in range(max(args.warmup, 1)):  # compilation and allocator warm-up, untimed; the first counts NFE
            before = counter.calls
            run()
            if i == 0:
                nfe[name] = counter.calls - before
    times = {name: [] for name, _, _ in variants}
    peak = {}
    for _ in range(args.repeats):
        for name, run, _ in variants:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            t0 = time.perf_counter()
            run()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
            if device.type == "cuda":
                peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated(device))
    return times, nfe, peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE overrides applied to every ditk variant")
    parser.add_argument("--preset", default="dit-s-2", help="a class-conditional preset (default: dit-s-2)")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (sample.steps)")
    parser.add_argument("--batch", type=int, default=8, help="images per sampling run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="sample.precision")
    parser.add_argument("--solver", default="", help="sample.solver (default: the preset's)")
    parser.add_argument("--cfg-scale", type=float, default=None, help="sample.cfg_scale (default: the preset's)")
    parser.add_argument("--cache", default="", help="sample.cache policy: none, fora, taylorseer, ... (default: none)")
    parser.add_argument("--compile", action="store_true", help="sample.compile=true for every variant")
    parser.add_argument("--repeats", type=int, default=3, help="timed sampling runs per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed sampling runs per variant first (>= 1)")
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME:KEY=V,KEY=V a ditk setting (repeatable; the first is the reference)")
    parser.add_argument("--official", default="", help="path of a local facebookresearch/DiT checkout")
    parser.add_argument("--official-precision", default="",
                        help="comma-separated: one official row per precision, fp32 and/or bf16 (default: --precision)")
    parser.add_argument("--json", default="", help="write the results here as JSON")
    parser.add_argument("--suite", default="",
                        help="comma-separated presets: run each in fp32 and bf16, variants (default) eager, "
                             "compiled (sample.compile=true) and, on CUDA, compiled with CUDA graphs; e.g. the GPU table: dit-s-2,dit-b-2,dit-xl-2")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--steps, --batch and --repeats must be >= 1, --warmup >= 0")
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
                                            "cfg_scale": 4.0 if args.cfg_scale is None else args.cfg_scale,
                                            "solver": args.solver or "ddpm",
                                            "variant": args.variant or SUITE_VARIANTS[:3 if args.device == "cuda" else 2]})
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
    common = [*args.overrides, f"sample.steps={args.steps}", f"sample.precision={args.precision}"]
    if args.solver:
        common.append(f"sample.solver={args.solver}")
    if args.cfg_scale is not None:
        common.append(f"sample.cfg_scale={args.cfg_scale}")
    if args.cache:
        common.append(f"sample.cache={args.cache}")
    if args.compile:
        common.append("sample.compile=true")
    if args.official:  # what the official loop computes: DDPM, guidance on the first 3 channels
        common += ["sample.solver=ddpm", "sample.cfg_channels=3"]

    base = resolve(args.preset, common, allow_missing=("data", "autoencoder"))
    torch.manual_seed(0)
    base_model = random_weights(build_model(base))
    variants, cfgs = [], {}
    for spec in args.variant or ["ditk:"]:
        name, _, keys = spec.partition(":")
        cfg = resolve(args.preset, [*common, *filter(None, keys.split(","))], allow_missing=("data", "autoencoder"))
        run_fn, counter = ditk_variant(cfg, base_model, args, device)
        variants.append((name, run_fn, counter))
        cfgs[name] = cfg
    officials = []
    if args.official:
        precisions = list(filter(None, getattr(args, "official_precision", "").split(","))) or [args.precision]
        for precision in precisions:
            name = "official" if len(precisions) == 1 else f"official-{precision}"
            run_fn, counter = official_variant(args.official, base, base_model, args, device, precision)
            variants.append((name, run_fn, counter))
            cfgs[name] = resolve(args.preset, [*common, f"sample.precision={precision}"],
                                 allow_missing=("data", "autoencoder"))
            officials.append(name)

    times, nfe, peak = measure(variants, args, device)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ref = statistics.median(times[variants[0][0]])
    rows = []
    for name, _, _ in variants:
        sec = statistics.median(times[name])
        sc = cfgs[name].sample
        rows.append({"variant": name, "precision": sc.precision, "solver": sc.solver, "steps": int(sc.steps), "cfg_scale": float(sc.cfg_scale),
                     "cache": sc.cache, "compile": bool(sc.compile), "seconds": sec, "images_per_s": args.batch / sec,
                     "ms_per_step": sec / int(sc.steps) * 1e3, "nfe": nfe[name], "ratio": sec / ref,
                     "peak_mem_mb": peak[name] / 2 ** 20 if name in peak else None})
    print(f"{args.preset}  batch {args.batch}  {device.type}  {args.precision}  {args.repeats} alternating runs  "
          f"threads {torch.get_num_threads()}  overrides: {' '.join(args.overrides) or '-'}")
    print(f"{'variant':<14}{'prec':>6}{'solver':>8}{'steps':>6}{'cfg':>5}{'cache':>11}{'img/s':>9}{'ms/step':>10}{'NFE':>6}"
          f"{'peak MB':>9}{'x first':>9}")
    for r in rows:
        mem = f"{r['peak_mem_mb']:.0f}" if r["peak_mem_mb"] is not None else f"{rss_mb:.0f}*"
        cache = r["cache"] + ("+c" if r["compile"] else "")
        print(f"{r['variant']:<14}{r['precision']:>6}{r['solver']:>8}{r['steps']:>6}{r['cfg_scale']:>5.1f}{cache:>11}"
              f"{r['images_per_s']:>9.2f}{r['ms_per_step']:>10.1f}{r['nfe']:>6}{mem:>9}{r['ratio']:>9.3f}")
    if device.type != "cuda":
        print("* CPU: the whole process's max RSS, not per variant")
    seconds = {r["variant"]: r["seconds"] for r in rows}
    for r in rows:
        if r["variant"] not in officials:
            r["vs_official"] = {o: r["seconds"] / seconds[o] for o in officials}
            for o, ratio in r["vs_official"].items():
                print(f"{r['variant']} / {o} sampling time: {ratio:.3f}")
    return {"preset": args.preset, "batch": args.batch, "device": device.type, "precision": args.precision,
            "repeats": args.repeats, "threads": torch.get_num_threads(), "overrides": args.overrides,
            "process_max_rss_mb": rss_mb, "rows": rows}


if __name__ == "__main__":
    main()
