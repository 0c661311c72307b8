"""Render docs/restore-benchmark.json (written by bench_restore.py) as the README's Markdown table.

    python benchmarks/restore_table.py docs/restore-benchmark.json

One row per (task, method): PSNR, SSIM, FID, KID x 10^3, NFE, seconds per image, and on which of PSNR / FID the
method beats the task's classical baseline; a dagger marks a win beyond the luck of the images (PSNR: mean
per-image gain over two standard errors; FID: lower in >= 97.5 % of the paired bootstrap rounds), "neither" in
bold when it beats the baseline on neither. Then one line counting the pairs that meet the aim.
"""

from __future__ import annotations

import json
import sys

LABELS = {"inpaint-random": "inpaint-random 50 %"}


def render(data: dict) -> str:
    verdict = {(v["task"], v["method"]): v for v in data["beats_baseline"]}
    lines = ["| task (σ_y) | method | PSNR (dB) | SSIM | FID | KID × 10³ | NFE | s / image | beats the baseline on |",
             "|---|---|---|---|---|---|---|---|---|"]
    last = None
    for r in data["rows"]:
        task = f"{LABELS.get(r['task'], r['task'])} ({r['sigma_y']})" if r["task"] != last else ""
        last = r["task"]
        method = r["method"].replace("classical (", "classical: ").removesuffix(")") if r["method"].startswith(
            "classical") else r["method"]
        v = verdict.get((r["task"], r["method"]))
        if v is None:
            wins = ""
        else:
            parts = [name + (" †" if v[name + "_clear"] else "") for name in ("psnr", "fid") if v[name]]
            wins = ", ".join(p.replace("psnr", "PSNR").replace("fid", "FID") for p in parts) or "**neither**"
        fid = "n/a" if r["fid"] is None else f"{r['fid']:.3f}"
        lines.append(f"| {task} | {method} | {r['psnr']:.2f} | {r['ssim']:.3f} | {fid} | {1000 * r['kid']:.2f} | "
                     f"{r['nfe']} | {r['sec']:.2f} | {wins} |")
    met = sum(1 for v in data["beats_baseline"] if v["psnr"] or v["fid"])
    clear = sum(1 for v in data["beats_baseline"] if v["psnr_clear"] or v["fid_clear"])
    lines.append("")
    lines.append(f"{met} of {len(data['beats_baseline'])} (task, method) pairs beat the baseline on PSNR or FID; "
                 f"{clear} of them beyond the luck of the images (†).")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(json.loads(open(sys.argv[1] if len(sys.argv) > 1 else "docs/restore-benchmark.json").read())))
