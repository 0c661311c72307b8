"""`ditk quantize` side by side on a trained digits DiT and a trained DiT-S/2: every scheme / method x bit width ->
digits FID (or, for DiT-S/2, the distance of its samples to full precision), weights on disk and in memory,
sampling time per image and peak memory of the sampling process, quantization (+ calibration) time.

    python benchmarks/bench_quantize.py --run runs/digits-dit --num 1000 --dit-run runs/dit-s2-digits --work bench-quantize

Each row is `ditk quantize RUN ... --out WORK/ROW` then `ditk evaluate-fid --run WORK/ROW --num N` in fresh
processes (OMP_NUM_THREADS=1), exactly as a user runs them; the fp32 row evaluates the run itself. The calibration
set (simulated rows) is drawn once and reused from the cache (its drawing time is reported once).
--dit-run: a DiT-S/2 run (depth 12, width 384, 6 heads, patch 2) with its own trained weights, e.g. a short
`ditk train digits-dit model.depth=12 model.hidden_size=384 model.num_heads=6 model.patch_size=2 ...`; every row
samples --dit-images images with --dit-steps DDIM steps from the same noise in a fresh process and reports the
relative L2 / PSNR of its samples to the full-precision ones, time per image and that process's peak RSS.
Each measured row is saved under WORK/rows/ (WORK/dit-s2/rows/); a rerun of an interrupted benchmark reuses them.

Every ditk command runs in a fresh process and this one never imports torch: on Linux a child's getrusage peak
RSS starts at its parent's, so a large parent would mask the children's figures (ditk reports VmHWM, the process's own).

Real rows (torchao) are real quantized weights; simulated rows are fake-quant: their time and memory are not
a claim about a deployed model. Prints one JSON object per row, then a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

def _sim(method, w, a, *extra):
    return ["--simulate", method, "--wbits", str(w), "--abits", str(a), *extra]


# every scheme x bit width where it applies, cut to what one run on the shared 2-core CPU can measure at 1,000
# images per FID: real torchao schemes at their fixed widths (intx-wo at 4 bits); simulated methods at W8A8 (all
# but LRQ-DiT, a 4-bit method), W6A8 (RTN, Q-DiT: its paper's headline setting, ViDiT-Q), W4A8 (all), W6A6 (ViDiT-Q's
# low-bit setting, with RTN), W4A4 (RTN, SVDQuant: its setting, ViDiT-Q), VQ4DiT at W3 (weight-only). 4-bit RTN uses
# groups of 32 (per channel it is far off on this model).
ROWS = [  # (row name, quantize arguments); None = the full-precision run itself
    ("fp32", None),
    ("int8-wo W8A16", ["--scheme", "int8-wo"]),
    ("int8-dq W8A8", ["--scheme", "int8-dq"]),
    ("fp8-wo W8A16", ["--scheme", "fp8-wo"]),
    ("intx-wo W4A16 g32", ["--scheme", "intx-wo", "--wbits", "4", "--group-size", "32"]),
    *[(f"{m} W8A8", _sim(m, 8, 8)) for m in ("rtn", "ptq4dit", "qdit", "viditq", "svdquant")],
    *[(f"{m} W6A8", _sim(m, 6, 8)) for m in ("rtn", "qdit", "viditq")],
    ("rtn W4A8 g32", _sim("rtn", 4, 8, "--group-size", "32")),
    *[(f"{m} W4A8", _sim(m, 4, 8)) for m in ("ptq4dit", "qdit", "viditq", "svdquant", "lrqdit")],
    *[(f"{m} W6A6", _sim(m, 6, 6)) for m in ("rtn", "viditq")],
    ("rtn W4A4 g32", _sim("rtn", 4, 4, "--group-size", "32")),
    *[(f"{m} W4A4", _sim(m, 4, 4)) for m in ("viditq", "svdquant")],
    ("vq4dit W3A16", ["--simulate", "vq4dit", "--wbits", "3"]),
]


def packed_mib(m: dict) -> float:
    """The size the quantized weights would take packed at their bit width (computed, not measured): each quantized
    layer's weight at `weight_bits` per value plus a 16-bit scale and zero per group (per output channel without
    groups), SVDQuant's low-rank branch and smoothing vector in 16 bits; everything else as stored (fp32)."""
    total = m["size_bytes"]["before"]
    for rec in m["layers"].values():
        spec = rec.get("module") or {}
        n_in, n_out = spec.get("in_features"), spec.get("out_features")
        if n_in is None:  # real rows: torchao already stores them packed (or unpacked: then this is what it could be)
            return m["size_bytes"]["after"] / 2**20
        if "codebook_size" in rec:  # VQ4DiT: weight_bits per value (one index per sub-vector) + an fp16 codebook
            total += -4 * n_in * n_out + n_in * n_out * rec["weight_bits"] / 8 + 2 * rec["codebook_size"] * rec["vector_dim"]
            continue
        groups = n_out * (n_in // (rec.get("group_size") or n_in))
        total += -4 * n_in * n_out + n_in * n_out * rec["weight_bits"] / 8 + 4 * groups
        total += 2 * spec.get("rank", 0) * (n_in + n_out) + (2 * n_in if spec.get("smooth") else 0)
    return total / 2**20


def distance_to_fp32(samples: Path, fp32: Path) -> dict:
    """Same seeds, same classes: how far each image is from the full-precision one (uint8 pixels)."""
    import numpy as np

    a = np.load(samples / "samples.npz")["arr_0"].astype(np.float64)
    b = np.load(fp32 / "samples.npz")["arr_0"].astype(np.float64)
    mse = float(((a - b) ** 2).mean())
    return {"psnr_vs_fp32": round(float(10 * np.log10(255**2 / mse)), 2) if mse else None,
            "rel_l2_vs_fp32": round(float(np.linalg.norm(a - b) / np.linalg.norm(b)), 4)}


def ditk(*args, env):
    proc = subprocess.run([sys.executable, "-m", "ditk", *map(str, args)], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"ditk {' '.join(map(str, args))} failed:\n{proc.stderr[-2000:]}")
    return proc


# DiT-S/2: the same grid, cheaper where a method's cost grows with the model (stated in the table): Q-DiT with
# uniform groups of 32 (no search: its fitness runs the 33M model per candidate), PTQ4DiT's block reconstruction at
# 10 steps per block, no VQ4DiT (k-means over 2^12 codewords of 147k sub-vectors per layer is too slow here).
DIT_CHEAP = {"qdit": {"search": False}, "ptq4dit": {"recon_steps": 10}}


def dit_rows():
    rows = []
    for name, qargs in ROWS[1:]:
        if name.startswith("vq4dit"):
            continue
        kw, it = {}, iter(qargs)
        for flag in it:
            key = {"--scheme": "scheme", "--simulate": "method", "--wbits": "wbits", "--abits": "abits",
                   "--group-size": "group_size"}[flag]
            value = next(it)
            kw[key] = value if key in ("scheme", "method") else int(value)
        if kw.get("method") in DIT_CHEAP:
            kw["options"] = DIT_CHEAP[kw["method"]]
        rows.append((name, kw))
    return rows


def cli_args(kw: dict) -> list:
    flags = {"scheme": "--scheme", "method": "--simulate", "wbits": "--wbits", "abits": "--abits", "group_size": "--group-size"}
    out = [x for k, v in kw.items() if k in flags for x in (flags[k], v)]
    return out + [x for k, v in (kw.get("options") or {}).items() for x in ("--opt", f"{k}={json.dumps(v)}")]


def ordered(rows: list, wanted: list) -> list:
    """The rows named in `wanted`, in that order (all rows when it is empty); an unknown name is an error."""
    if not wanted:
        return rows
    by_name = dict(rows)
    unknown = [w for w in wanted if w not in by_name]
    if unknown:
        raise SystemExit(f"unknown row(s) {unknown}: pick from {list(by_name)}")
    return [(w, by_name[w]) for w in wanted]


def slug_of(name: str) -> str:
    return name.replace(" ", "_").replace("(", "").replace(")", "")


DIT_ROW_CODE = """
import json, sys, time, torch
from ditk.generate import load_pipeline, peak_rss_mb, sample_images
torch.set_num_threads(1)
folder, num, ref, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
pipe = load_pipeline(folder, overrides=json.loads(sys.argv[5]), device="cpu")  # the benchmark's sampler
sample_images(pipe, list(range(min(num, 2))))  # warm-up: one-off costs
start = time.perf_counter()
x = sample_images(pipe, list(range(num)))
secs = time.perf_counter() - start
res = {"s_per_image": round(secs / num, 4), "peak_rss_mb": peak_rss_mb()}  # this process's own peak
if ref == "-":
    torch.save(x, out)
else:
    r = torch.load(ref)
    res["rel_l2"] = round(float((x - r).norm() / r.norm()), 5)
    res["psnr_vs_fp32"] = round(float(10 * torch.log10(4 / ((x - r) ** 2).mean())), 2)  # images in [-1, 1]
print(json.dumps(res))
"""


RSS_CODE = """
import gc, json, sys, torch
from ditk.generate import load_pipeline
def rss_mb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024
base = rss_mb()  # torch and ditk imported, nothing loaded
pipe = load_pipeline(sys.argv[1], device="cpu")
gc.collect()
print(json.dumps({"rss_before_load_mb": round(base, 1), "rss_after_load_mb": round(rss_mb(), 1)}))
"""


def resident_memory(run: str, work: Path, wanted: list) -> None:
    """--memory: the resident set of a process once the model is loaded (fresh process per row, after gc), minus
    the same process before loading: what holding the model costs (the peak RSS of sampling also holds torch's
    run-time buffers and, for quantized folders, the full-precision model built before the quantized weights are
    assigned to it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    print("\n| DiT-S/2 row | RSS before loading (MB) | RSS with the model loaded (MB) | difference (MB) |")
    print("|---|---|---|---|")
    for name in wanted:
        folder = Path(run) if name == "fp32" else work / slug_of(name)
        proc = subprocess.run([sys.executable, "-c", RSS_CODE, str(folder)], capture_output=True, text=True, env=env)
        if proc.returncode:
            raise SystemExit(f"--memory {name} failed:\n{proc.stderr[-2000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"| {name} | {r['rss_before_load_mb']} | {r['rss_after_load_mb']} | "
              f"{r['rss_after_load_mb'] - r['rss_before_load_mb']:.1f} |", flush=True)


def bench_dit_s2(run: str, work: Path, steps: int, num: int, calib_num: int, calib_timesteps: int,
                 wanted: list) -> list[dict]:
    """Output distance of every row on a trained DiT-S/2 run: the final samples after `steps` DDIM steps (the
    run's guidance) from the same noise as the full-precision model; each row sampled in a fresh process (its
    peak RSS is that process's)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DITK_CACHE_DIR": str(work / "cache")}
    sampling = ["sample.solver=ddim", f"sample.steps={steps}", "sample.cache=none"]
    work.mkdir(parents=True, exist_ok=True)
    ref = work / "fp32-samples.pt"
    results = []
    for name, kw in ordered([("fp32", None), *dit_rows()], wanted):
        cached = work / "rows" / f"{slug_of(name)}.json"
        if cached.is_file():
            row = json.loads(cached.read_text())
            results.append(row)
            print(json.dumps(row), flush=True)
            continue
        row = {"model": "dit-s-2", "row": name}
        if kw is None:
            folder = Path(run)
        else:
            folder = work / slug_of(name)
            if not (folder / "quantization.json").is_file():  # in a fresh process: this one stays small (see below)
                ditk("quantize", run, *sampling, *cli_args(kw), "--out", folder, "--no-progress", "--calib-num", calib_num,
                     "--calib-timesteps", calib_timesteps, env=env)
            m = json.loads((folder / "quantization.json").read_text())
            row.update(kind=m["kind"], options=kw.get("options"), method_s=m["seconds"],
                       calibration_s=(m["calibration"] or {}).get("seconds"),
                       weights_mib=round(m["size_bytes"]["after"] / 2**20, 2),
                       fp32_weights_mib=round(m["size_bytes"]["before"] / 2**20, 2), packed_mib=round(packed_mib(m), 2))
        proc = subprocess.run([sys.executable, "-c", DIT_ROW_CODE, str(folder), str(num), "-" if kw is None else str(ref),
                               str(ref), json.dumps(sampling)], capture_output=True, text=True, env=env)
        if proc.returncode:
            raise SystemExit(f"DiT-S/2 row {name} failed:\n{proc.stderr[-2000:]}")
        row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(row) + "\n")
        results.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n| DiT-S/2 row | kind | rel. L2 to fp32 | PSNR to fp32 (dB) | weights in memory (MiB) | packed (MiB, computed) "
          f"| s / image ({steps} DDIM steps) | peak RSS (MB) | calibration + method (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        cost = "" if "method_s" not in r else f"{r.get('calibration_s') or 0:.1f} + {r['method_s']:.1f}"
        print(f"| {r['row']} | {r.get('kind', 'fp32')} | {r.get('rel_l2', 0)} | {r.get('psnr_vs_fp32', '')} | "
              f"{r.get('weights_mib', '')} | {r.get('packed_mib', '')} | {r['s_per_image']} | {r['peak_rss_mb']} | {cost} |")
    return results


def bench_digits(run: str, work: Path, num: int, batch_size: int, calib_num: int, calib_timesteps: int,
                 sampler: list, wanted: list) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DITK_CACHE_DIR": str(work / "cache")}
    results = []
    for name, qargs in ordered(ROWS, wanted):
        slug = slug_of(name)
        cached = work / "rows" / f"{slug}.json"
        if cached.is_file():  # a row already measured by an interrupted invocation of the same benchmark
            row = json.loads(cached.read_text())
            results.append(row)
            print(json.dumps(row), flush=True)
            continue
        row = {"row": name}
        if qargs is None:
            folder = Path(run)
        else:
            folder = work / slug
            if not (folder / "quantization.json").is_file():
                start = time.perf_counter()
                ditk("quantize", run, *qargs, "--out", folder, "--no-progress", "--calib-num", calib_num,
                     "--calib-timesteps", calib_timesteps, env=env)
                row["quantize_wall_s"] = round(time.perf_counter() - start, 1)
            m = json.loads((folder / "quantization.json").read_text())
            row.update(kind=m["kind"], weight_bits=m["weight_bits"], act_bits=m["act_bits"], method_s=m["seconds"],
                       calibration_s=(m["calibration"] or {}).get("seconds"),
                       calibration_reused=(m["calibration"] or {}).get("reused"),
                       weights_mib=round(m["size_bytes"]["after"] / 2**20, 3),
                       file_mib=round(m["size_bytes"]["after_file"] / 2**20, 3),
                       fp32_weights_mib=round(m["size_bytes"]["before"] / 2**20, 3),
                       packed_mib=round(packed_mib(m), 3))
        samples = work / "samples" / slug
        proc = ditk("evaluate-fid", "--run", folder, "--num", num, "--samples-dir", samples, "--no-progress",
                    "--sample-batch-size", batch_size, *sampler, env=env)
        fid = json.loads(proc.stdout.strip().splitlines()[-1])
        report = json.loads((samples / "report.json").read_text())
        row.update(fid=round(fid["fid"], 3), kid=round(fid["kid_mean"], 4), s_per_image=report["seconds_per_image"],
                   peak_rss_mb=report["peak_rss_mb"])
        if qargs is not None and (work / "samples" / "fp32" / "samples.npz").is_file():
            row.update(distance_to_fp32(samples, work / "samples" / "fp32"))
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(row) + "\n")
        results.append(row)
        print(json.dumps(row), flush=True)
    print("\n| row | kind | FID | PSNR vs fp32 samples (dB) | weights in memory (MiB) | file (MiB) | "
          "packed at the bit width (MiB, computed) | s / image | peak RSS (MB) | calibration + method (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        calib = "" if r.get("calibration_s") is None else f"{r['calibration_s']:.1f}{' (cached)' if r['calibration_reused'] else ''} + "
        cost = "" if "method_s" not in r else f"{calib}{r['method_s']:.1f}"
        print(f"| {r['row']} | {r.get('kind', 'fp32')} | {r['fid']:.2f} | {r.get('psnr_vs_fp32', '')} | {r.get('weights_mib', r.get('fp32_weights_mib', ''))} | "
              f"{r.get('file_mib', '')} | {r.get('packed_mib', '')} | {r['s_per_image']} | {r['peak_rss_mb']} | {cost} |")
    aims(results)
    return results


def aims(results: list[dict]) -> None:
    """The issue's aims: every W8A8 row within +0.1 FID of fp32; the best W4A8 row within +1.0."""
    base = next((r["fid"] for r in results if r["row"] == "fp32"), None)
    if base is None:
        return
    w8a8 = [r for r in results if "W8A8" in r["row"]]
    w4a8 = [r for r in results if "W4A8" in r["row"]]
    for r in w8a8:
        print(f"[aim W8A8 <= fp32 + 0.1] {r['row']}: {r['fid'] - base:+.3f} {'holds' if r['fid'] - base <= 0.1 else 'MISSED'}")
    if w4a8:
        best = min(w4a8, key=lambda r: r["fid"])
        print(f"[aim best W4A8 <= fp32 + 1.0] {best['row']}: {best['fid'] - base:+.3f} "
              f"{'holds' if best['fid'] - base <= 1.0 else 'MISSED'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="a trained digits run (ditk train digits-dit): FID rows")
    ap.add_argument("--dit-run", help="a trained DiT-S/2 run: output-distance rows")
    ap.add_argument("--num", type=int, default=1000, help="images per FID")
    ap.add_argument("--work", default="bench-quantize", help="folder for the quantized runs and samples")
    ap.add_argument("--rows", default="", help="comma-separated digits row names to run, in this order (default: all)")
    ap.add_argument("--dit-rows", default="", help="comma-separated DiT-S/2 row names to run, in this order (default: all)")
    ap.add_argument("--batch-size", type=int, default=250, help="images per sampling batch (the time per image depends on it)")
    ap.add_argument("--solver", help="digits: sampler for every row (default: the run's own)")
    ap.add_argument("--steps", type=int, help="digits: sampling steps for every row (default: the run's own)")
    ap.add_argument("--calib-num", type=int, default=32)
    ap.add_argument("--calib-timesteps", type=int, default=8)
    ap.add_argument("--dit-steps", type=int, default=20, help="DiT-S/2: DDIM steps")
    ap.add_argument("--dit-images", type=int, default=16, help="DiT-S/2: images sampled per row")
    ap.add_argument("--dit-calib-num", type=int, default=8)
    ap.add_argument("--dit-calib-timesteps", type=int, default=4)
    ap.add_argument("--memory", action="store_true", help="DiT-S/2: only the resident memory of the already "
                    "quantized --dit-rows folders once loaded (fresh process each)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    dit_wanted = [r.strip() for r in args.dit_rows.split(",") if r.strip()]
    sampler = [*(["--solver", args.solver] if args.solver else []), *(["--steps", args.steps] if args.steps else [])]
    if args.memory:
        return resident_memory(args.dit_run, work / "dit-s2", dit_wanted)
    if args.dit_run:  # first: its rows are quick
        bench_dit_s2(args.dit_run, work / "dit-s2", args.dit_steps, args.dit_images, args.dit_calib_num,
                     args.dit_calib_timesteps, dit_wanted)
    if args.run:
        bench_digits(args.run, work, args.num, args.batch_size, args.calib_num, args.calib_timesteps, sampler, wanted)


if __name__ == "__main__":
    main()
