"""`ditk quantize` side by side on a trained digits DiT: every scheme / method x bit width -> digits FID, weights on
disk and in memory, sampling time per image and peak memory of the sampling process, quantization (+ calibration) time.

    python benchmarks/bench_quantize.py --run runs/digits-dit --num 1000 --work bench-quantize

Each row is `ditk quantize RUN ... --out WORK/ROW` then `ditk evaluate-fid --run WORK/ROW --num N` in fresh
processes (OMP_NUM_THREADS=1), exactly as a user runs them; the fp32 row evaluates the run itself. The calibration
set (simulated rows) is drawn once and reused from the cache (its drawing time is reported once).
--dit-s2: the same for a DiT-S/2 (33M parameters, 32x32x4 latents) with random weights (its adaLN-Zero layers
re-drawn from N(0, 0.02)), saved as a bare .safetensors and quantized through `ditk quantize FILE --preset dit-s-2`:
no FID (no ImageNet, no VAE offline), but the relative L2 distance of the final latents to full precision after a
short DDIM trajectory from the same noise, and the time of that trajectory.

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

ROWS = [  # (row name, quantize arguments); None = the full-precision run itself
    ("fp32", None),
    ("int8-wo (W8A16)", ["--scheme", "int8-wo"]),
    ("int8-dq (W8A8)", ["--scheme", "int8-dq"]),
    ("fp8-wo (W8A16)", ["--scheme", "fp8-wo"]),
    ("intx-wo W4 g32", ["--scheme", "intx-wo", "--wbits", "4", "--group-size", "32"]),
    ("rtn W8A8", ["--simulate", "rtn", "--wbits", "8", "--abits", "8"]),
    ("ptq4dit W8A8", ["--simulate", "ptq4dit", "--wbits", "8", "--abits", "8"]),
    ("viditq W8A8", ["--simulate", "viditq", "--wbits", "8", "--abits", "8"]),
    ("qdit W6A8", ["--simulate", "qdit", "--wbits", "6", "--abits", "8"]),
    ("rtn W4A8 g32", ["--simulate", "rtn", "--wbits", "4", "--abits", "8", "--group-size", "32"]),
    ("ptq4dit W4A8", ["--simulate", "ptq4dit", "--wbits", "4", "--abits", "8"]),
    ("qdit W4A8", ["--simulate", "qdit", "--wbits", "4", "--abits", "8"]),
    ("svdquant W4A8", ["--simulate", "svdquant", "--wbits", "4", "--abits", "8"]),
    ("viditq W4A8 g32", ["--simulate", "viditq", "--wbits", "4", "--abits", "8", "--group-size", "32"]),
    ("rtn W4A4 g32", ["--simulate", "rtn", "--wbits", "4", "--abits", "4", "--group-size", "32"]),
    ("svdquant W4A4", ["--simulate", "svdquant", "--wbits", "4", "--abits", "4"]),
    ("vq4dit W3A16", ["--simulate", "vq4dit", "--wbits", "3"]),
    ("vq4dit W2A16", ["--simulate", "vq4dit", "--wbits", "2"]),
    ("lrqdit W4A8", ["--simulate", "lrqdit", "--wbits", "4", "--abits", "8"]),
    ("lrqdit W4A4", ["--simulate", "lrqdit", "--wbits", "4", "--abits", "4"]),
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


DIT_ROWS = [
    ("int8-wo (W8A16)", dict(scheme="int8-wo")),
    ("int8-dq (W8A8)", dict(scheme="int8-dq")),
    ("fp8-wo (W8A16)", dict(scheme="fp8-wo")),
    ("intx-wo W4 g32", dict(scheme="intx-wo", wbits=4, group_size=32)),
    ("rtn W8A8", dict(method="rtn", wbits=8, abits=8)),
    ("ptq4dit W8A8", dict(method="ptq4dit", wbits=8, abits=8)),
    ("viditq W8A8", dict(method="viditq", wbits=8, abits=8)),
    ("rtn W4A8 g32", dict(method="rtn", wbits=4, abits=8, group_size=32)),
    ("qdit W4A8 (g32, no search)", dict(method="qdit", wbits=4, abits=8, options={"search": False})),
    ("svdquant W4A4", dict(method="svdquant", wbits=4, abits=4)),
]


def bench_dit_s2(work: Path, steps: int, num: int, overrides: list[str]) -> None:
    """Output distance of every row on a random-weight DiT-S/2 (in this process, one thread)."""
    import torch
    from safetensors.torch import save_file

    from ditk.build import build_model
    from ditk.config import resolve
    from ditk.generate import load_pipeline, sample_images
    from ditk.quantize.api import quantize
    from ditk.quantize.checks import CalibSettings

    torch.set_num_threads(1)
    os.environ["DITK_CACHE_DIR"] = str(work / "cache")
    preset_args = ["autoencoder.name=identity", "sample.solver=ddim", f"sample.steps={steps}", "sample.cfg_scale=1.5",
                   *overrides]
    weights = work / "dit-s2-random.safetensors"
    if not weights.is_file():
        torch.manual_seed(0)
        model = build_model(resolve("dit-s-2", preset_args, allow_missing=("data",)))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad and not p.any():
                    p.normal_(0, 0.02)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))

    def trajectory(pipe):
        start = time.perf_counter()
        out = sample_images(pipe, list(range(num)))
        return out, time.perf_counter() - start

    fp32 = load_pipeline(str(weights), preset="dit-s-2", overrides=preset_args, device="cpu")
    trajectory(fp32)  # warm-up: the first call pays one-off costs
    ref, ref_s = trajectory(fp32)
    print(json.dumps({"model": "dit-s-2", "row": "fp32", "s_per_image": round(ref_s / num, 3)}), flush=True)
    rows = []
    for name, kw in DIT_ROWS:
        folder = work / ("dit-s2-" + name.split(" (")[0].replace(" ", "_"))
        if not (folder / "quantization.json").is_file():
            quantize(str(weights), preset="dit-s-2", overrides=preset_args, out=str(folder), progress=False,
                     calib=CalibSettings(num=2, timesteps=4), **kw)
        m = json.loads((folder / "quantization.json").read_text())
        pipe = load_pipeline(str(folder), device="cpu")
        trajectory(pipe)
        out, secs = trajectory(pipe)
        row = {"model": "dit-s-2", "row": name, "kind": m["kind"], "rel_l2": round(float((out - ref).norm() / ref.norm()), 5),
               "s_per_image": round(secs / num, 3), "weights_mib": round(m["size_bytes"]["after"] / 2**20, 2),
               "fp32_weights_mib": round(m["size_bytes"]["before"] / 2**20, 2), "method_s": m["seconds"],
               "calibration_s": (m["calibration"] or {}).get("seconds")}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n| DiT-S/2 row | kind | rel. L2 to fp32 | weights in memory (MiB) | s / image ({steps} DDIM steps) | method (s) |")
    print("|---|---|---|---|---|---|")
    print(f"| fp32 | fp32 | 0 | {rows[0]['fp32_weights_mib']} | {ref_s / num:.2f} | |")
    for r in rows:
        print(f"| {r['row']} | {r['kind']} | {r['rel_l2']} | {r['weights_mib']} | {r['s_per_image']} | {r['method_s']:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="a trained digits run (ditk train digits-dit)")
    ap.add_argument("--num", type=int, default=300, help="images per FID")
    ap.add_argument("--work", default="bench-quantize", help="folder for the quantized runs and samples")
    ap.add_argument("--rows", default="", help="comma-separated row names to run (default: all)")
    ap.add_argument("--batch-size", type=int, default=125, help="images per sampling batch (the time per image depends on it)")
    ap.add_argument("--calib-num", type=int, default=32)
    ap.add_argument("--calib-timesteps", type=int, default=8)
    ap.add_argument("--dit-s2", action="store_true", help="benchmark a random-weight DiT-S/2 instead (output distance)")
    ap.add_argument("--dit-steps", type=int, default=10, help="--dit-s2: DDIM steps")
    ap.add_argument("--dit-images", type=int, default=2, help="--dit-s2: latents sampled")
    ap.add_argument("--dit-set", action="append", default=[], help="--dit-s2: a config override (repeatable)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.dit_s2:
        return bench_dit_s2(work, args.dit_steps, args.dit_images, args.dit_set)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DITK_CACHE_DIR": str(work / "cache")}
    wanted = {r.strip() for r in args.rows.split(",") if r.strip()}
    results = []
    for name, qargs in ROWS:
        if wanted and name not in wanted:
            continue
        slug = name.replace(" ", "_").replace("(", "").replace(")", "")
        row = {"row": name}
        if qargs is None:
            folder = Path(args.run)
        else:
            folder = work / slug
            if not (folder / "quantization.json").is_file():
                start = time.perf_counter()
                ditk("quantize", args.run, *qargs, "--out", folder, "--no-progress", "--calib-num", args.calib_num,
                     "--calib-timesteps", args.calib_timesteps, env=env)
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
        proc = ditk("evaluate-fid", "--run", folder, "--num", args.num, "--samples-dir", samples, "--no-progress",
                    "--sample-batch-size", args.batch_size, env=env)
        fid = json.loads(proc.stdout.strip().splitlines()[-1])
        report = json.loads((samples / "report.json").read_text())
        row.update(fid=round(fid["fid"], 3), kid=round(fid["kid_mean"], 4), s_per_image=report["seconds_per_image"],
                   peak_rss_mb=report["peak_rss_mb"])
        if qargs is not None and (work / "samples" / "fp32" / "samples.npz").is_file():
            row.update(distance_to_fp32(samples, work / "samples" / "fp32"))
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


if __name__ == "__main__":
    main()
