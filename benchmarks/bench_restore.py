"""Restoration benchmark: task x method on the held-out crops of the `photos` data set, in one run.

    python benchmarks/bench_restore.py --ddpm-run runs/photos-dit --flow-run runs/photos-dit-flow

For every task the same measurements y = A x + sigma_y n (seeded) go to the classical baseline (bicubic /
Wiener / nearest fill / pseudo-inverse) and to each method that applies (DDNM, DDRM, PiGDM, DPS on the DDPM prior,
PnP-Flow on the flow prior). Prints a Markdown table (PSNR, SSIM on 8-bit RGB; FID and KID of the restored set
against the ground-truth set in the features of the `photos` extractor (ditk/metrics/photos_extractor.py: no offline
Inception; KID as the paired U-statistic of ditk/restore/set_metrics.py); NFE per image, seconds per image), then
which (task, method) pairs beat the classical baseline on PSNR or FID, and whether beyond the luck of the images
(PSNR: mean per-image gain over two standard errors; FID: lower in >= 97.5 % of paired bootstrap resamples); writes it as JSON (--json) and a grid image (--grid): per task two crops, columns degraded | classical |
methods... | ground truth.

Tuning: `--split val` restores crops cut from the TRAINING part of the photographs instead (non-overlapping, stride
32, `--num` of them evenly spaced) and `--options 'dps:zeta=1;pnp-flow:alpha=0.5'` sets method options; the
defaults of ditk/restore were chosen that way, never on the held-out test crops the README reports.
`benchmarks/restore_table.py` renders the JSON as the README's table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

TASKS = [("sr4", 0.05), ("blur", 0.05), ("inpaint-random", 0.05), ("inpaint-box", 0.05), ("colorize", 0.05),
         ("denoise", 0.1)]


def fmt(v, spec=".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def beats_baseline(rows: list[dict]) -> list[dict]:
    """Per (task, method): does it beat the task's classical row on PSNR (higher) and on FID (lower)?"""
    base = {r["task"]: r for r in rows if r["method"].startswith("classical")}
    out = []
    for r in rows:
        if r["method"].startswith("classical"):
            continue
        boot = r.get("fid_vs_baseline") or {}
        out.append(dict(task=r["task"], method=r["method"], psnr=bool(r["psnr"] > base[r["task"]]["psnr"]),
                        fid=bool(r["fid"] is not None and r["fid"] < base[r["task"]]["fid"]),
                        # beyond the luck of the images: PSNR gain over 2 standard errors (paired over images); FID
                        # lower in >= 97.5 % of the paired bootstrap rounds
                        psnr_clear=bool(r.get("psnr_gain", 0) > 2 * r.get("psnr_gain_se", np.inf)),
                        fid_clear=bool(boot.get("a_lower_fraction", 0) >= 0.975)))
    return out


def eval_images(split: str, num: int) -> torch.Tensor:
    """The held-out test crops, or `num` validation crops evenly spaced among the non-overlapping (stride 32) crops
    of the photographs' training part: tuning never sees a test pixel."""
    from ditk.data.photos import Photos, PhotosConfig

    if split == "test":
        return Photos(PhotosConfig(split="test")).images[:num]
    images = Photos(PhotosConfig(split="train", stride=32)).images
    pick = np.linspace(0, len(images) - 1, num).round().astype(int)
    return images[torch.from_numpy(pick)]


def parse_options(text: str) -> dict:
    """'ddrm:eta=0.5,eta_b=1;dps:zeta=1' -> {"ddrm": {"eta": "0.5", "eta_b": "1"}, "dps": {"zeta": "1"}}."""
    out: dict = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        method, _, kvs = part.partition(":")
        for kv in filter(None, kvs.split(",")):
            key, _, value = kv.partition("=")
            value = {"true": True, "false": False}.get(value.lower(), value)
            out.setdefault(method.strip(), {})[key.strip()] = value
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ddpm-run", required=True, help="a photos-dit run (DDPM prior)")
    ap.add_argument("--flow-run", help="a photos-dit-flow run (flow prior, for pnp-flow)")
    ap.add_argument("--num", type=int, default=28, help="held-out crops to restore (28 = all)")
    ap.add_argument("--tasks", default=",".join(t for t, _ in TASKS))
    ap.add_argument("--methods", default="ddnm,ddrm,pigdm,dps,pnp-flow")
    ap.add_argument("--steps", default="ddnm=100,ddrm=100,pigdm=100,dps=1000,pnp-flow=100",
                    help="steps per method (DPS paper: 1000)")
    ap.add_argument("--pnp-samples", type=int, default=5, help="PnP-Flow noise draws averaged per step (paper: 5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", choices=("test", "val"), default="test",
                    help="test: the held-out crops (what the README reports); val: crops cut from the TRAINING part "
                         "of the photographs (stride 32, evenly spaced), the only images hyper-parameters are tuned on")
    ap.add_argument("--options", default="",
                    help="method options, e.g. 'ddrm:eta=0.5;dps:zeta=1.0' (default: each method's own defaults)")
    ap.add_argument("--fid-extractor", default="photos", help="feature network for FID/KID (photos: shipped)")
    ap.add_argument("--bootstrap", type=int, default=100, help="paired bootstrap rounds for FID vs the baseline")
    ap.add_argument("--json", default="docs/restore-benchmark.json")
    ap.add_argument("--grid", default="docs/restore-grid.png")
    args = ap.parse_args()

    from ditk.generate import load_pipeline
    from ditk.io import save_grid
    from ditk.restore.classical import classical, name_for
    from ditk.restore.operators import build_operator
    from ditk.restore.pipeline import get_method, measure, psnr_ssim, restore_batch
    from ditk.restore.set_metrics import bootstrap_fid_difference, fid_kid

    torch.set_num_threads(1)
    steps = {k: int(v) for k, v in (kv.split("=") for kv in args.steps.split(","))}
    methods = args.methods.split(",")
    truth = eval_images(args.split, args.num)
    extra = parse_options(args.options)
    idx = list(range(len(truth)))
    pipes = {"ddpm": load_pipeline(args.ddpm_run, device="cpu")}
    if args.flow_run:
        pipes["rectified-flow"] = load_pipeline(args.flow_run, device="cpu")
    sigmas = dict(TASKS)
    rows, tiles, columns = [], [], None
    for task in args.tasks.split(","):
        sigma_y = sigmas.get(task, 0.05)
        op = build_operator(task, tuple(truth.shape[1:]))
        y = measure(op, truth, sigma_y, args.seed, idx)
        start = time.perf_counter()
        base = classical(op, y, sigma_y)
        sec = (time.perf_counter() - start) / len(idx)
        psnr, ssim = psnr_ssim(base, truth)
        truth_feats = fid_kid(truth, truth, args.fid_extractor, return_features=True)["features"]
        fk = fid_kid(base, truth, args.fid_extractor, truth_features=truth_feats, return_features=True)
        base_feats, base_psnr = fk["features"], np.array(psnr)
        rows.append(dict(task=task, sigma_y=sigma_y, method=f"classical ({name_for(op)})", psnr=np.mean(psnr),
                         ssim=np.mean(ssim), fid=fk["fid"], kid=fk["kid"], nfe=0, sec=sec))
        shown = [op.y_to_image(y).clamp(-1, 1), base]
        names = ["degraded", "classical"]
        for method in methods:
            cls = get_method(method)
            pipe = next((p for p in pipes.values() if p.objective.name in cls.objectives), None)
            if pipe is None:
                continue
            opts = {"samples": args.pnp_samples} if method == "pnp-flow" else {}
            opts.update(extra.get(method, {}))
            res = restore_batch(pipe, op, method, y, idx, sigma_y=sigma_y, steps=steps.get(method), seed=args.seed,
                                options=opts)
            psnr, ssim = psnr_ssim(res.images, truth)
            fk = fid_kid(res.images, truth, args.fid_extractor, truth_features=truth_feats, return_features=True)
            # is the difference to the baseline more than the luck of these N images? paired bootstrap over images
            boot = bootstrap_fid_difference(fk["features"], base_feats, truth_feats, rounds=args.bootstrap)
            gain = np.array(psnr) - base_psnr
            rows.append(dict(task=task, sigma_y=sigma_y, method=method, psnr=np.mean(psnr), ssim=np.mean(ssim),
                             fid=fk["fid"], kid=fk["kid"], nfe=res.nfe, sec=res.seconds / len(idx),
                             fid_vs_baseline=boot, psnr_gain=float(gain.mean()),
                             psnr_gain_se=float(gain.std(ddof=1) / np.sqrt(len(gain)))))
            shown.append(res.images)
            names.append(method)
            print(f"[bench] {task} {method}: PSNR {rows[-1]['psnr']:.2f} SSIM {rows[-1]['ssim']:.3f} "
                  f"FID {fmt(rows[-1]['fid'])} KID {rows[-1]['kid']:.4f} {rows[-1]['sec']:.2f} s/img", file=sys.stderr)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json + ".partial").write_text(json.dumps({"rows": rows}, indent=2) + "\n")  # survives a crash
        shown.append(truth)
        names.append("ground truth")
        columns = names
        pick = [0, 13] if len(idx) > 13 else [0]
        for i in pick:
            for pics in shown:
                pic = pics[i:i + 1]
                if pic.shape[-2:] != truth.shape[-2:]:
                    pic = torch.nn.functional.interpolate(pic, size=truth.shape[-2:], mode="nearest")
                tiles.append(pic)
    print("| task | σ_y | method | PSNR (dB) | SSIM | FID | KID × 1000 | NFE | s / image |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['sigma_y']} | {r['method']} | {r['psnr']:.2f} | {r['ssim']:.3f} | {fmt(r['fid'])} | "
              f"{1000 * r['kid']:.2f} | {r['nfe']} | {r['sec']:.3f} |")
    verdicts = beats_baseline(rows)
    for v in verdicts:
        print(f"[bench] {v['task']} {v['method']}: PSNR {'beats' if v['psnr'] else 'does not beat'} the baseline"
              f"{' (clearly)' if v['psnr_clear'] else ''}, FID {'beats' if v['fid'] else 'does not beat'} it"
              f"{' (clearly)' if v['fid_clear'] else ''}", file=sys.stderr)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"rows": rows, "num_images": len(idx), "steps": steps,
                                           "pnp_samples": args.pnp_samples, "grid_columns": columns,
                                           "ddpm_run": args.ddpm_run, "flow_run": args.flow_run,
                                           "fid_extractor": args.fid_extractor, "beats_baseline": verdicts}, indent=2) + "\n")
    save_grid(torch.cat(tiles), args.grid, nrow=len(columns), scale=2)
    print(f"[bench] grid columns: {' | '.join(columns)} -> {args.grid}", file=sys.stderr)


if __name__ == "__main__":
    main()
