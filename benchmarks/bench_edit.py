"""Inversion and editing side by side on held-out digits (the PIE-Bench trade-off in miniature), one run.

    ditk train digits-dit && ditk train digits-dit-flow
    OMP_NUM_THREADS=1 python benchmarks/bench_edit.py --ddpm runs/digits-dit --flow runs/digits-dit-flow

Inversion: per method and step count, reconstruction PSNR/SSIM (pixels, [-1, 1] clamped), latent MSE and NFE
(inversion + reconstruction) on the first --num-invert test digits (2 per class...). Editing: each test digit of
class c is edited towards class (c + 5) mod 10 with every method at its defaults (--edit-steps); the shipped digits
classifier scores success, preservation is PSNR/SSIM to the source, PSNR and SSIM outside the changed strokes
(ditk.edit.preserve: pixels where the source and the target class's mean training digit differ by more than 0.5, the
same mask for every editor) and the digits CNN feature distance. Prints markdown tables and writes --json.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def held_out(num: int):
    from ditk.data.digits import Digits

    d = Digits(split="test")
    order = torch.argsort(d.labels * 1000 + torch.arange(len(d.labels)))  # class-major
    per_class = max(1, num // 10)
    idx = torch.cat([order[d.labels[order] == c][:per_class] for c in range(10)])
    return d.images[idx], d.labels[idx]


def inversion_table(pipes, images, labels, steps_list):
    from ditk.edit.artefact import psnr, ssim
    from ditk.edit.inversion import METHODS, invert, reconstruct

    rows = []
    for method, (objective_name, _, _) in METHODS.items():
        pipe = pipes.get(objective_name)
        if pipe is None:
            continue
        cond = pipe.conditioner.cond(labels)
        for steps in steps_list:
            t0 = time.perf_counter()
            inv = invert(pipe.model, pipe.objective, images, cond, method, steps)
            rec, nfe = reconstruct(pipe.model, pipe.objective, inv, cond, method, steps)
            sec = time.perf_counter() - t0
            p = np.mean(psnr(rec.clamp(-1, 1), images))
            rows.append({"method": method, "steps": steps, "psnr_db": float(p),
                         "ssim": float(np.mean(ssim(rec.clamp(-1, 1), images))),
                         "latent_mse": float(((rec - images) ** 2).mean()), "nfe": inv.nfe + nfe,
                         "seconds_per_image": sec / len(images)})
            print(f"[bench] invert {method:12s} {steps:3d} steps: {p:6.2f} dB, NFE {inv.nfe + nfe}", flush=True)
    return rows


def tic_control_table(pipes, images, labels, steps_list):
    """TIC's first mechanism alone: the source branch's K/V replaced by the inversion's (target = source class)
    against plain reconstruction with the same inversion (DDIM / Euler)."""
    from ditk.edit.artefact import psnr
    from ditk.edit.editors import edit, plan

    rows = []
    for kind, pipe in pipes.items():
        cond, null = pipe.conditioner.cond(labels), pipe.conditioner.uncond(len(labels))
        for steps in steps_list:
            p = plan("tic", pipe.objective, len(pipe.model.blocks), steps)
            tic = edit(pipe.model, pipe.objective, images, cond, cond, null, p, steps)
            plain = edit(pipe.model, pipe.objective, images, cond, cond, null,
                         plan("naive", pipe.objective, len(pipe.model.blocks), steps, inversion=p.inversion), steps)
            rows.append({"model": kind, "inversion": p.inversion, "steps": steps,
                         "plain_psnr_db": float(np.mean(psnr(plain["edited"].clamp(-1, 1), images))),
                         "tic_source_branch_psnr_db": float(np.mean(psnr(tic["source_branch"].clamp(-1, 1), images)))})
            print(f"[bench] tic control {kind} {steps}: {rows[-1]}", flush=True)
    return rows


EDITS = [  # (model, method, inversion, knobs, steps)
    ("ddpm", "naive", "ddim", {}, None), ("ddpm", "naive", "bdia", {}, None), ("ddpm", "naive", "edict", {}, None), ("ddpm", "masactrl", "ddim", {}, None),
    ("ddpm", "masactrl", "ddim", {"start_step": 5}, None), ("ddpm", "tic", "ddim", {}, None),
    ("ddpm", "tic", "ddim", {"threshold": 2.0}, None),
    ("flow", "naive", "rf-solver", {}, None), ("flow", "naive", "euler", {}, None),
    ("flow", "masactrl", "euler", {}, None), ("flow", "masactrl", "euler", {"start_step": 5}, None),
    ("flow", "masactrl", "euler", {"start_step": 8}, None),
    ("flow", "tic", "euler", {}, None), ("flow", "tic", "euler", {"threshold": 2.0}, None),
    ("flow", "tic", "euler", {"start_step": 0, "start_layer": 0}, None),
    ("flow", "rf-edit", "rf-solver", {}, None), ("flow", "rf-edit", "rf-solver", {"inject": 10}, None),
    ("flow", "rf-edit", "rf-solver", {"inject": 10, "start_block": 0}, None),
    ("flow", "fireflow", "fireflow", {}, None), ("flow", "fireflow", "fireflow", {}, 8),
    ("flow", "rf-inversion", "rf-inversion", {}, None), ("flow", "rf-inversion", "rf-inversion", {"eta": 0.5, "stop": 0.5}, None),
]


def edit_table(pipes, images, labels, steps, cfg_scale):
    from ditk.edit.editors import edit, plan
    from ditk.edit.preserve import changed_strokes, digits_prototypes
    from ditk.edit.run import digits_classifier, edit_scores

    classify = digits_classifier()
    targets = (labels + 5) % 10
    changed = changed_strokes(images, digits_prototypes()[targets])  # the same pixels for every editor
    print(f"[bench] changed-stroke mask covers {float(changed.mean()):.3f} of the pixels", flush=True)
    rows = []
    for model_kind, method, inversion, knobs, own_steps in EDITS:
        pipe = pipes.get("ddpm" if model_kind == "ddpm" else "rectified-flow")
        if pipe is None:
            continue
        n_steps = own_steps or steps
        p = plan(method, pipe.objective, len(pipe.model.blocks), n_steps, knobs,
                 None if method == "rf-inversion" else inversion)
        src, tgt = pipe.conditioner.cond(labels), pipe.conditioner.cond(targets)
        null = pipe.conditioner.uncond(len(labels))
        res = edit(pipe.model, pipe.objective, images, src, tgt, null, p, n_steps, cfg_scale=cfg_scale)
        scores = edit_scores(images, res["edited"].clamp(-1, 1), targets.tolist(), classify, changed)
        mean = {k: float(np.mean([min(s[k], 99.0) for s in scores])) for k in
                ("psnr_db", "ssim", "psnr_outside_changed_db", "ssim_outside_changed", "mask_changed_fraction",
                 "feature_distance", "changed_fraction", "success")}
        row = {"model": pipe.cfg.objective.name, "method": method, "inversion": p.inversion,
               "knobs": knobs, "steps": n_steps, **mean, "nfe": res["nfe"],
               "seconds_per_image": res["seconds"] / len(images), "feature_cache_mb": res["feature_cache_mb"]}
        rows.append(row)
        print(f"[bench] edit {row['model']:14s} {method:12s} {json.dumps(knobs):24s} success {mean['success']:.2f} "
              f"PSNR {mean['psnr_db']:.2f} outside {mean['psnr_outside_changed_db']:.2f} / SSIM {mean['ssim_outside_changed']:.3f} feat {mean['feature_distance']:.2f}",
              flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ddpm", help="run directory of digits-dit (DDPM)")
    ap.add_argument("--flow", help="run directory of digits-dit-flow (rectified flow)")
    ap.add_argument("--num-invert", type=int, default=20)
    ap.add_argument("--num-edit", type=int, default=20)
    ap.add_argument("--steps", default="10,25,50")
    ap.add_argument("--edit-steps", type=int, default=25)
    ap.add_argument("--cfg-scale", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="bench_edit.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from ditk.generate import load_pipeline

    pipes = {}
    if args.ddpm:
        pipes["ddpm"] = load_pipeline(args.ddpm, device="cpu")
    if args.flow:
        pipes["rectified-flow"] = load_pipeline(args.flow, device="cpu")
    images, labels = held_out(args.num_invert)
    inv = inversion_table(pipes, images, labels, [int(s) for s in args.steps.split(",")])
    tic = tic_control_table(pipes, images, labels, [int(s) for s in args.steps.split(",")])
    images, labels = held_out(args.num_edit)
    ed = edit_table(pipes, images, labels, args.edit_steps, args.cfg_scale)

    print("\n| method | steps | NFE (invert + reconstruct) | PSNR dB | SSIM | latent MSE | s/image |")
    print("|---|---|---|---|---|---|---|")
    for r in inv:
        print(f"| `{r['method']}` | {r['steps']} | {r['nfe']} | {r['psnr_db']:.2f} | {r['ssim']:.4f} | "
              f"{r['latent_mse']:.2e} | {r['seconds_per_image']:.3f} |")
    print("\n| model | inversion | steps | plain reconstruction PSNR dB | TIC source branch (inversion K/V) PSNR dB |")
    print("|---|---|---|---|---|")
    for r in tic:
        print(f"| {r['model']} | {r['inversion']} | {r['steps']} | {r['plain_psnr_db']:.2f} | "
              f"{r['tic_source_branch_psnr_db']:.2f} |")
    print("\n| model | method | inversion | knobs | steps | edit success | PSNR dB | SSIM | PSNR outside changed dB | "
          "SSIM outside changed | px moved | feature dist. | NFE/image | s/image |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in ed:
        knobs = ", ".join(f"{k}={v}" for k, v in r["knobs"].items()) or "defaults"
        print(f"| {r['model']} | `{r['method']}` | {r['inversion']} | {knobs} | {r['steps']} | {r['success']:.2f} | "
              f"{r['psnr_db']:.2f} | {r['ssim']:.3f} | {r['psnr_outside_changed_db']:.2f} | {r['ssim_outside_changed']:.3f} | "
              f"{r['changed_fraction']:.2f} | "
              f"{r['feature_distance']:.2f} | {r['nfe']} | {r['seconds_per_image']:.3f} |")
    with open(args.json, "w") as f:
        json.dump({"settings": vars(args), "inversion": inv, "tic_control": tic, "edit": ed}, f, indent=2)


if __name__ == "__main__":
    main()
