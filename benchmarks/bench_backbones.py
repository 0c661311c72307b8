"""Backbones side by side with DiT: parameters, GFLOPs per forward, CPU forward and training-step time, peak memory.

    python benchmarks/bench_backbones.py [--families dit,diffusion-rwkv] [--sizes tiny,S] [--batch 1]
                                         [--threads 1] [--repeats 3] [--train-tokens 1100] [--rounds 1]
                                         [--json out.jsonl]

For every model family in the MODELS registry it takes the family's tiny preset (`digits-*`) and its S-size
preset (`*-s-2*`; the table FAMILY_PRESETS below pins the known ones) and measures each at several sequence
lengths (the preset's resolution and larger ones: tiny 8 -> 32 px, i.e. 16 -> 256 tokens; S 32 -> 64 -> 128
latent px, i.e. 256 -> 1024 -> 4096 tokens), next to a DiT with the same width, depth (number of blocks) and
patch size. The model and its DiT twin are measured alternately, each in a fresh process, --rounds times
(times and memory: medians over the rounds; "fwd / DiT" and "train / DiT": the median of the per-round
ratios), so that a change of load on a shared machine hits both sides alike.
Families missing from the registry, or without such presets, are skipped with a note. Inputs: random
latents, t = 500, class 0, or (caption models such as Dimba) random features for conditioner.max_length
caption tokens.

GFLOPs (1 GFLOP = 1e9 floating-point operations, a multiply-add = 2) per forward of one batch:
  counted  torch.utils.flop_counter.FlopCounterMode: matmuls, convolutions and attention (SDPA; the CPU
           SDPA kernel gets the formula FlopCounterMode already uses for the CUDA ones) — what DiT's
           FLOPs are made of. It does not see elementwise ops, so custom scans are invisible to it;
  scan     analytic counts for those scans, from hooks on the scan modules during the counted forward:
           Bi-WKV (Diffusion-RWKV) 13 T D per call, the paper's count (our chunked form's own N x N
           chunk-carry einsum, which FlopCounterMode does see, is removed from `counted` so it is not
           doubled); Mamba selective scan (DiS, Dimba) 7 T d_inner d_state per direction (discretisation
           dt*A and its exp, dt*B*u, the recurrence a*h + b and the output contraction C.h; the matmuls of
           our chunked form inside the `scan` module, its prefix sums included, are removed from `counted`).
Note DiT's paper tables quote multiply-accumulates: DiT-S/2's "6.06 Gflops" is ~12.1 GFLOPs here.
Peak memory: the rise of the process's peak resident set size (ru_maxrss) over its size before the first
forward, measured in a fresh process per row, so each number is that model's own inference peak (weights
excluded, activations and workspace included). Times ("fwd ms"): median CPU time of the process (time.process_time) over --repeats no-grad forwards after
one warm-up, on --threads CPU threads (1 by default): on one thread this equals the wall time of an idle
machine and, unlike wall time, is not inflated when other jobs share the cores (wall times are in --json).
Rows of at most --train-tokens tokens also time a training step ("train ms": forward in train mode, the
mean-square of the output as loss, backward into every parameter; median of --repeats after one warm-up)
and its peak memory ("train MB", measured the same way, gradients included).
A second table compares, for the models with scans, the scans' analytic GFLOP/s (their FLOPs above over the
CPU time spent inside the scan modules, `SelectiveScan` / `BiWKV`) with the GFLOP/s of the nn.Linear layers
(2 x rows x in x out over the time inside them) of the model and of its DiT twin, from hooks around each
call during --repeats extra forwards.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time

# Presets per family (tiny on the embedded digits, S-size at 256x256). Families not listed are discovered
# from the shipped presets by model name; listed families whose model is not registered are skipped.
FAMILY_PRESETS = {
    "dit": {"tiny": "digits-dit", "S": "dit-s-2"},
    "dit-moe": {"tiny": "digits-dit-moe", "S": "dit-moe-s-2-8e2a"},
    "dis": {"tiny": "digits-dis", "S": "dis-s-2"},
    "diffusion-rwkv": {"tiny": "digits-drwkv", "S": "drwkv-s-2"},
    "dimba": {"tiny": "digits-dimba", "S": None},  # Dimba ships L and G only (text-to-image)
}
SCALES = {"tiny": (1, 4), "S": (1, 2, 4)}  # input side x these (tokens x their squares)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes(reset_worked: bool) -> int:
    if reset_worked:
        return _status_kib("VmHWM") * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # lifetime peak (KiB on Linux)


def build(spec: dict):
    """A model (eval mode) from {"preset", "overrides"}, or a DiT twin from {"dit": DiT kwargs}."""
    import torch

    from ditk.build import build_model
    from ditk.config import resolve
    from ditk.models.dit import DiT

    torch.manual_seed(0)
    if "dit" in spec:
        return DiT(**spec["dit"]).eval()
    cfg = resolve(spec["preset"], spec.get("overrides", []), allow_missing=("data", "autoencoder"))
    return build_model(cfg).eval()


def conditioning(model, batch: int, text_tokens: int) -> dict:
    """Class labels (all 0) for class-conditional models; random text-token features (all valid) for models
    that cross-attend to a caption (Dimba: `context` (N, L, caption_channels), `context_mask`)."""
    import torch

    params = inspect.signature(model.forward).parameters
    required = {n for n, p in list(params.items())[2:] if p.default is inspect.Parameter.empty}
    if "context" in params and hasattr(model, "caption_channels"):
        g = torch.Generator().manual_seed(0)
        cond = {"context": torch.randn(batch, text_tokens, model.caption_channels, generator=g)}
        if "context_mask" in params:
            cond["context_mask"] = torch.ones(batch, text_tokens, dtype=torch.bool)
        return cond
    if required - {"y"}:
        raise ValueError(f"needs {sorted(required - {'y'})}: only class and caption conditioning are benchmarked")
    if "y" in params and getattr(model, "num_classes", 0):
        return {"y": torch.zeros(batch, dtype=torch.long)}
    return {}


def count_cpu_attention() -> None:
    """FlopCounterMode has formulas for the CUDA SDPA kernels but not for the CPU one that DiT's attention
    runs here, so attention would count as 0; register the same formula (QK^T and AV: 4 B H T^2 d) for it."""
    import torch
    from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_flop_count

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None and op not in flop_registry and op.default not in flop_registry:
        register_flop_formula(op)(lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v))


def analytic_scan_flops(model, run) -> tuple[int, int, int]:
    """(analytic scan FLOPs, FlopCounterMode total, FlopCounterMode FLOPs inside Bi-WKV modules) of `run()`."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    flops = [0]
    hooks = []
    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind == "BiWKV":
            def wkv_hook(mod, args, out):
                from ditk.models.rwkv import bi_wkv_flops

                flops[0] += bi_wkv_flops(*args[2].shape)  # the paper's 13 T D per Bi-WKV
            hooks.append(module.register_forward_hook(wkv_hook))
        elif hasattr(module, "A_log") and hasattr(module, "d_inner") and hasattr(module, "d_state"):
            def mamba_hook(mod, args, out):
                n, length = args[0].shape[0], args[0].shape[1]
                directions = 2 if getattr(mod, "bidirectional", False) else 1
                flops[0] += 7 * n * length * mod.d_inner * mod.d_state * directions
            hooks.append(module.register_forward_hook(mamba_hook))
    count_cpu_attention()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        run()
    for h in hooks:
        h.remove()
    inside_scans = sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items()
                       if name.split(".")[-1] in ("wkv", "scan"))
    return flops[0], counter.get_total_flops(), inside_scans


def inside_modules(model, run, repeats: int) -> dict:
    """Median CPU seconds per forward spent inside (a) the scan modules (Mamba's `SelectiveScan`, RWKV's
    `BiWKV`) and (b) the nn.Linear layers, with the Linear layers' FLOPs (2 x rows x in x out): the GFLOP/s
    of the scans next to the GFLOP/s of the matmuls on the same core (hooks around each call)."""
    import torch

    spent = {"scan": 0.0, "linear": 0.0}
    linear_flops = [0]
    hooks = []
    for module in model.modules():
        kind = "scan" if type(module).__name__ in ("SelectiveScan", "BiWKV") else (
            "linear" if isinstance(module, torch.nn.Linear) else None)
        if kind is None:
            continue

        def pre(mod, args):
            mod._bench_start = time.process_time()

        def post(mod, args, out, kind=kind):
            spent[kind] += time.process_time() - mod._bench_start
            if kind == "linear":
                linear_flops[0] += 2 * out.numel() * mod.in_features
        hooks += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    runs = []
    with torch.no_grad():
        for _ in range(max(1, repeats)):
            spent.update(scan=0.0, linear=0.0)
            linear_flops[0] = 0
            run()
            runs.append((spent["scan"], spent["linear"], linear_flops[0]))
    for h in hooks:
        h.remove()
    scan_s, linear_s, flops = (statistics.median(c) for c in zip(*runs))
    return {"scan_ms": 1e3 * scan_s, "linear_ms": 1e3 * linear_s, "gflops_linear": flops / 1e9}


def child(spec: dict, batch: int, repeats: int, threads: int, train: bool) -> dict:
    import torch

    torch.set_num_threads(threads)
    model = build(spec)
    size = model.input_size
    x = torch.randn(batch, model.in_channels, size, size)
    t = torch.full((batch,), 500.0)
    cond = conditioning(model, batch, spec.get("text_tokens", 16))

    def run():
        return model(x, t, **cond)

    def measure(step, grad: bool):
        """(peak bytes of the warm-up, median CPU seconds, median wall seconds) of `step`."""
        gc.collect()
        reset = reset_peak_rss()
        before = _status_kib("VmRSS") * 1024 if reset else max(_status_kib("VmRSS") * 1024, peak_rss_bytes(False))
        with torch.set_grad_enabled(grad):
            step()  # warm-up; sets the peak
        peak = peak_rss_bytes(reset) - before
        times, cpu_times = [], []
        with torch.set_grad_enabled(grad):
            for _ in range(repeats):
                start, cpu_start = time.perf_counter(), time.process_time()
                step()
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - cpu_start)
        return max(peak, 0), statistics.median(cpu_times), statistics.median(times)

    params = sum(p.numel() for p in model.parameters())
    peak, cpu, wall = measure(run, grad=False)
    scan, counted, inside_wkv = analytic_scan_flops(model, run)
    tokens = (size // model.patch_size) ** 2
    row = {"params": params, "tokens": tokens, "blocks": len(model.blocks), "gflops_counted": (counted - inside_wkv) / 1e9,
           "gflops_scan": scan / 1e9, "fwd_ms": 1e3 * cpu, "wall_ms": 1e3 * wall, "peak_mb": peak / 2**20,
           **inside_modules(model, run, repeats)}
    if train:
        model.train()

        def train_step():
            model.zero_grad(set_to_none=True)
            out = run()
            out.float().square().mean().backward()

        peak, cpu, wall = measure(train_step, grad=True)
        row.update(train_ms=1e3 * cpu, train_wall_ms=1e3 * wall, train_peak_mb=peak / 2**20)
    return row


def run_child(spec: dict, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec), "--batch", str(args.batch),
           "--repeats", str(spec.get("repeats", args.repeats)), "--threads", str(args.threads)]
    if spec.get("train"):
        cmd.append("--train")
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def discover() -> dict:
    """family -> {"tiny": preset|None, "S": preset|None} for every registered model."""
    from ditk.config import preset_names, resolve
    from ditk.registry import MODELS

    by_model = {}
    for name in preset_names():
        try:
            cfg = resolve(name, allow_missing=("data", "autoencoder"))
        except Exception:  # a preset another engineer is still writing: not this script's business
            continue
        by_model.setdefault(cfg.model.name, []).append((name, cfg))
    families = {}
    for family in MODELS.names():
        presets = dict(by_model.get(family, []))
        pinned = FAMILY_PRESETS.get(family, {})
        tiny = pinned.get("tiny") if pinned.get("tiny") in presets else next(
            (n for n in sorted(presets) if n.startswith("digits-")), None)
        s_size = pinned.get("S") if pinned.get("S") in presets else next(
            (n for n in sorted(presets, key=len) if re.search(r"-s-2(-|$)", n)), None)
        families[family] = {"tiny": tiny, "S": s_size, "configs": presets}
    return families


def dit_twin(cfg, blocks: int, input_size: int) -> dict:
    """A DiT with the model's width, number of blocks and patch size, and its number of attention heads where
    it has attention (Dimba, DiT-MoE; else DiT's 64-channel heads): the same attention layout, so that the
    comparison is of what the model adds or replaces (Dimba's tiny model: 4 heads of 16 channels; one
    64-channel head makes its twin ~15 % faster at 256 tokens, benchmarks/bench_scans.py)."""
    d = int(cfg.model.hidden_size)
    own = int(cfg.model.get("num_heads", 0) or 0)
    heads = own if own > 0 and d % own == 0 else next(h for h in (d // 64, 6, 8, 4, 2, 1) if h > 0 and d % h == 0)
    return {"dit": dict(input_size=input_size, patch_size=int(cfg.model.patch_size),
                        in_channels=int(cfg.model.in_channels), hidden_size=d, depth=blocks, num_heads=heads,
                        num_classes=int(cfg.model.get("num_classes", 1000) or 1000),
                        learn_sigma=bool(cfg.model.get("learn_sigma", True)))}


def _median_row(runs: list[dict]) -> dict:
    """Per-key median over the rounds of one configuration (numbers), else the first round's value."""
    return {k: (statistics.median(r[k] for r in runs) if isinstance(v, float) else v) for k, v in runs[0].items()}


def _ratio(ours_runs: list[dict], twin_runs: list[dict], key: str) -> float | None:
    """Median over the rounds of ours / twin for `key`, each ratio from one round's back-to-back pair."""
    pairs = [(o[key], t[key]) for o, t in zip(ours_runs, twin_runs) if key in o and key in t]
    return statistics.median(a / b for a, b in pairs) if pairs else None


def _table_row(family: str, preset: str, input_size: int, ours: dict, twin: dict | None,
               ratios: tuple = (None, None)) -> str:
    dash = "—"
    gf = ours["gflops_counted"] + ours["gflops_scan"]

    def train_cols(r):
        return [f"{r['train_ms']:.0f}", f"{r['train_peak_mb']:.0f}"] if "train_ms" in r else [dash, dash]

    cols = [family, f"{preset} @{input_size}px ({ours['blocks']} blocks)", str(ours["tokens"]),
            f"{ours['params'] / 1e6:.1f}", f"{ours['gflops_counted']:.3g}",
            f"{ours['gflops_scan']:.3g} (total {gf:.3g})", f"{ours['fwd_ms']:.1f}", f"{ours['peak_mb']:.0f}",
            *train_cols(ours)]
    if twin is None:
        cols += [dash] * 8
    else:
        cols += [f"{twin['params'] / 1e6:.1f}", f"{twin['gflops_counted']:.3g}", f"{twin['fwd_ms']:.1f}",
                 f"{twin['peak_mb']:.0f}", *train_cols(twin), f"{ratios[0]:.2f}x",
                 f"{ratios[1]:.2f}x" if ratios[1] is not None else dash]
    return "| " + " | ".join(cols) + " |"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="", help="comma-separated model names (default: all registered)")
    parser.add_argument("--sizes", default="tiny,S")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-tokens", type=int, default=1100,
                        help="also time a training step for rows with at most this many tokens (0: never)")
    parser.add_argument("--rounds", type=int, default=1, help="measure model and DiT twin alternately this often")
    parser.add_argument("--max-tokens", type=int, default=5000, help="skip larger sequence lengths")
    parser.add_argument("--json", default="", help="also write one JSON object per row to this file")
    parser.add_argument("--train", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child), args.batch, args.repeats, args.threads, args.train)))
        return

    families = discover()
    wanted = [f for f in args.families.split(",") if f] or list(families)
    for family in wanted:
        if family not in families:
            print(f"note: '{family}' is not in the MODELS registry (yet): skipped", file=sys.stderr)
    header = ("| family | model | tokens | params (M) | GFLOPs counted | + scan (analytic) | fwd ms | peak MB "
              "| train ms | train MB | DiT same D/depth: params (M) | GFLOPs | fwd ms | peak MB | train ms | train MB "
              "| fwd / DiT | train / DiT |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    rows = []
    for family in [f for f in wanted if f in families]:
        for size in [s for s in args.sizes.split(",") if s]:
            preset = families[family].get(size)
            if not preset:
                print(f"note: {family} has no {size} preset: skipped", file=sys.stderr)
                continue
            cfg = families[family]["configs"][preset]
            base = int(cfg.model.input_size)
            for scale in SCALES.get(size, (1, 2)):
                input_size = base * scale
                tokens = (input_size // int(cfg.model.patch_size)) ** 2
                if tokens > args.max_tokens:
                    continue
                train = 0 < tokens <= args.train_tokens
                # the longest rows take a DiT tens of seconds per forward: one timed repeat after the warm-up
                repeats = args.repeats if tokens <= 1100 else 1
                spec = {"preset": preset, "overrides": [f"model.input_size={input_size}"], "train": train,
                        "repeats": repeats, "text_tokens": int(cfg.get("conditioner", {}).get("max_length", 16) or 16)}
                try:
                    ours_runs, twin_runs = [], []
                    for _ in range(max(1, args.rounds)):  # alternate: ours, twin, ours, twin, ...
                        ours_runs.append(run_child(spec, args))
                        if family != "dit":
                            twin_spec = {**dit_twin(cfg, ours_runs[0]["blocks"], input_size), "train": train,
                                         "repeats": repeats}
                            twin_runs.append(run_child(twin_spec, args))
                except Exception as err:  # a family still being written, or one we cannot condition
                    print(f"note: {family} {preset} at {input_size}px: {err}: skipped", file=sys.stderr)
                    continue
                ours, twin = _median_row(ours_runs), _median_row(twin_runs) if twin_runs else None
                ratios = (_ratio(ours_runs, twin_runs, "fwd_ms"), _ratio(ours_runs, twin_runs, "train_ms"))
                row = {"family": family, "preset": preset, "input_size": input_size, **ours,
                       "dit": twin, "batch": args.batch, "threads": args.threads, "rounds": args.rounds,
                       "fwd_ratio": ratios[0], "train_ratio": ratios[1]}
                rows.append(row)
                print(_table_row(family, preset, input_size, ours, twin, ratios), flush=True)
    scan_rows = [r for r in rows if r["gflops_scan"] > 0 and r.get("scan_ms") and r.get("dit")]
    if scan_rows:  # the scans' analytic GFLOP/s next to the matmuls' (nn.Linear) on the same core, same run
        print("\n| model | tokens | scan GFLOP/s (analytic / time inside the scan modules) | its own Linear GFLOP/s "
              "| DiT twin: Linear GFLOP/s | whole forward GFLOP/s | scan / twin's Linear |")
        print("|---|---|---|---|---|---|---|")
        for r in scan_rows:
            t = r["dit"]
            scan_rate = r["gflops_scan"] / (r["scan_ms"] / 1e3)
            own = r["gflops_linear"] / (r["linear_ms"] / 1e3)
            twin_linear = t["gflops_linear"] / (t["linear_ms"] / 1e3)
            twin_all = t["gflops_counted"] / (t["fwd_ms"] / 1e3)
            print(f"| {r['preset']} @{r['input_size']}px | {r['tokens']} | {scan_rate:.1f} ({r['scan_ms']:.1f} ms) | "
                  f"{own:.1f} | {twin_linear:.1f} | {twin_all:.1f} | {scan_rate / twin_linear:.2f}x |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    import torch

    print(f"\nbatch {args.batch}, {args.threads} CPU thread(s), median of {args.repeats} no-grad forwards (1 above "
          f"1,100 tokens), {args.rounds} alternating round(s), torch {torch.__version__}, load average "
          f"{os.getloadavg()[0]:.1f} at the end", file=sys.stderr)


if __name__ == "__main__":
    main()
