"""Prefix-diffusion vs. an autoregressive captioner of about the same size, trained on the same data in one run.

Trains `digits-caption` (Diffusion-LM over word embeddings with an image prefix) and `digits-caption-ar` (the same
data, tokenizer, vocabulary, image encoder, mapping network and width; causal layers, next-token loss) for the same
number of steps with the same batch and seed, then captions the same held-out digits K times each (caption k of
image i from seed (seed, i, k)) and scores both: class-word accuracy and BLEU-4 against the four reference phrasings
of each digit, attribute accuracy (the measured thickness / slant / size levels named), distinct-1/2 and self-BLEU
over the K captions of an image, parameters, seconds per caption.

    OMP_NUM_THREADS=1 python benchmarks/bench_caption.py --steps 1000 --images 100 --k 5 --sheet docs/digits-caption-sheet.png

Prints a Markdown table (stderr: progress) and one JSON object (stdout). Measurements, never part of the tests.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def train(preset: str, root: Path, steps: int, extra: list[str]) -> Path:
    cmd = [sys.executable, "-m", "ditk", "train", preset, f"run.dir={root}", f"train.max_steps={steps}",
           f"train.ckpt_every={steps}", "--no-progress", *extra]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    print(f"[bench] trained {preset} ({steps} steps) in {time.perf_counter() - start:.0f}s", file=sys.stderr)
    return root / preset


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000, help="training steps of each model")
    parser.add_argument("--images", type=int, default=100, help="held-out digits captioned (the split has 179)")
    parser.add_argument("--k", type=int, default=5, help="captions per image")
    parser.add_argument("--sample-steps", type=int, default=100, help="denoising steps of the diffusion captioner")
    parser.add_argument("--solver", default="ddpm")
    parser.add_argument("--runs", default=None, help="folder for the two runs (default: a temporary folder)")
    parser.add_argument("--sheet", default=None, help="also write a contact sheet of 16 held-out digits (diffusion, K=3)")
    parser.add_argument("--train-args", nargs="*", default=[], help="extra KEY=VALUE overrides for both trainings")
    args = parser.parse_args(argv)

    import torch

    from ditk.caption.generate import caption_images, contact_sheet, held_out
    from ditk.caption.metrics import caption_report
    from ditk.data.digits_caption import attribute_accuracy
    from ditk.generate import load_pipeline

    root = Path(args.runs or tempfile.mkdtemp(prefix="bench-caption-"))
    results = {}
    for preset in ("digits-caption", "digits-caption-ar"):
        run = train(preset, root, args.steps, args.train_args)
        pipe = load_pipeline(str(run), overrides=[f"sample.steps={args.sample_steps}", f"sample.solver={args.solver}"]
                             if preset == "digits-caption" else [])
        images, refs, labels, class_of = held_out(pipe.cfg, args.images)
        start = time.perf_counter()
        groups = caption_images(pipe, images, list(range(len(images))), args.k)
        seconds = time.perf_counter() - start
        report = caption_report(groups, refs, labels, class_of)
        report["attribute_accuracy"] = round(attribute_accuracy(groups, refs), 4)
        report["parameters"] = sum(p.numel() for p in pipe.model.parameters())
        report["seconds_per_caption"] = round(seconds / (len(images) * args.k), 5)
        report["examples"] = groups[:3]
        results[preset] = report
        if args.sheet and preset == "digits-caption":
            sheet_groups = caption_images(pipe, images[:16], list(range(16)), 3)
            contact_sheet(images[:16], sheet_groups, Path(args.sheet))
            print(f"[bench] contact sheet -> {args.sheet}", file=sys.stderr)

    d, a = results["digits-caption"], results["digits-caption-ar"]
    rows = [("class-word accuracy (chance 0.1)", "class_word_accuracy"),
            ("attribute accuracy (chance 1/3)", "attribute_accuracy"), ("BLEU-4", "bleu4"), ("distinct-1", "distinct_1"),
            ("distinct-2", "distinct_2"), ("self-BLEU (lower = more diverse)", "self_bleu"),
            ("parameters", "parameters"), ("s / caption", "seconds_per_caption")]
    lines = ["| | Prefix-diffusion (`digits-caption`) | autoregressive (`digits-caption-ar`) |", "|---|---|---|"]
    for name, key in rows:
        fmt = (lambda v: f"{v:,}") if key == "parameters" else (lambda v: f"{v:.4f}")
        lines.append(f"| {name} | {fmt(d[key])} | {fmt(a[key])} |")
    print("\n".join(lines), file=sys.stderr)
    settings = {"steps": args.steps, "images": args.images, "k": args.k, "sample_steps": args.sample_steps,
                "solver": args.solver, "threads": torch.get_num_threads(), "runs": str(root)}
    print(json.dumps({"settings": settings, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
