"""`ditk quantize` side by side on a trained digits DiT: every scheme / method x bit width -> digits FID, weights on
disk and in memory, sampling time per image and peak memory of the sampling process, quantization (+ calibration) time.

    python benchmarks/bench_quantize.py --run runs/digits-dit --num 1000 --work bench-quantize

Each row is `ditk quantize RUN ... --out WORK/ROW` then `ditk evaluate-fid --run WORK/ROW --num N` in fresh
processes (OMP_NUM_THREADS=1), exactly as a user runs them; the fp32 row evaluates the run itself. The calibration
set (simulated rows) is drawn once and reused from the cache (its drawing time is reported once).
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
    ("rtn W6A8", ["--simulate", "rtn", "--wbits", "6", "--abits", "8"]),
    ("ptq4dit W6A8", ["--simulate", "ptq4dit", "--wbits", "6", "--abits", "8"]),
    ("qdit W6A8", ["--simulate", "qdit", "--wbits", "6", "--abits", "8"]),
    ("rtn W4A8", ["--simulate", "rtn", "--wbits", "4", "--abits", "8"]),
    ("rtn W4A8 g32", ["--simulate", "rtn", "--wbits", "4", "--abits", "8", "--group-size", "32"]),
    ("ptq4dit W4A8", ["--simulate", "ptq4dit", "--wbits", "4", "--abits", "8"]),
    ("qdit W4A8", ["--simulate", "qdit", "--wbits", "4", "--abits", "8"]),
    ("svdquant W4A8", ["--simulate", "svdquant", "--wbits", "4", "--abits", "8"]),
    ("rtn W4A4 g32", ["--simulate", "rtn", "--wbits", "4", "--abits", "4", "--group-size", "32"]),
    ("svdquant W4A4", ["--simulate", "svdquant", "--wbits", "4", "--abits", "4"]),
]


def ditk(*args, env):
    proc = subprocess.run([sys.executable, "-m", "ditk", *map(str, args)], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"ditk {' '.join(map(str, args))} failed:\n{proc.stderr[-2000:]}")
    return proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a trained digits run (ditk train digits-dit)")
    ap.add_argument("--num", type=int, default=1000, help="images per FID")
    ap.add_argument("--work", default="bench-quantize", help="folder for the quantized runs and samples")
    ap.add_argument("--rows", default="", help="comma-separated row names to run (default: all)")
    ap.add_argument("--batch-size", type=int, default=125, help="images per sampling batch (the time per image depends on it)")
    ap.add_argument("--calib-num", type=int, default=32)
    ap.add_argument("--calib-timesteps", type=int, default=8)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
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
                       fp32_weights_mib=round(m["size_bytes"]["before"] / 2**20, 3))
        samples = work / "samples" / slug
        proc = ditk("evaluate-fid", "--run", folder, "--num", args.num, "--samples-dir", samples, "--no-progress",
                    "--sample-batch-size", args.batch_size, env=env)
        fid = json.loads(proc.stdout.strip().splitlines()[-1])
        report = json.loads((samples / "report.json").read_text())
        row.update(fid=round(fid["fid"], 3), kid=round(fid["kid_mean"], 4), s_per_image=report["seconds_per_image"],
                   peak_rss_mb=report["peak_rss_mb"])
        results.append(row)
        print(json.dumps(row), flush=True)
    print("\n| row | kind | FID | weights in memory (MiB) | file (MiB) | s / image | peak RSS (MB) | calibration + method (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        calib = "" if r.get("calibration_s") is None else f"{r['calibration_s']:.1f}{' (cached)' if r['calibration_reused'] else ''} + "
        cost = "" if "method_s" not in r else f"{calib}{r['method_s']:.1f}"
        print(f"| {r['row']} | {r.get('kind', 'fp32')} | {r['fid']:.2f} | {r.get('weights_mib', r.get('fp32_weights_mib', ''))} | "
              f"{r.get('file_mib', '')} | {r['s_per_image']} | {r['peak_rss_mb']} | {cost} |")


if __name__ == "__main__":
    main()
