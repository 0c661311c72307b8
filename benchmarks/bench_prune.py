"""Depth pruning side by side on the deep digits DiT (8 -> 4 blocks), every method at the same recovery budget.

    ditk train digits-dit-deep                                  # the source (once)
    python benchmarks/bench_prune.py [--source runs/digits-dit-deep] [--recover-steps 200] [--num 400] [--steps 50]

For the source and for each method (TinyFusion `learnable` 1:2 and 4-of-8, `score` with Block Influence and with the oracle
loss increase, `index` = the first 4 blocks, `random`; and attention-head pruning `heads`, 2 of 4 heads per block or
16 of the 32 ranked over all blocks, at full depth), prunes with `ditk prune digits-dit-prune` plus
`prune.recover_steps` of KD, then measures in this one process: digits FID (digits extractor, against the 1,618
training digits) of the pruned model before recovery (checkpoint step 0) and after it (the EMA at the last
step), parameters, GFLOPs per image (torch flop counter) and sampling seconds per image (--steps DDPM steps,
cfg 2, batch 250). Prints one JSON line per row and a Markdown table. Not part of the test suite.
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROWS = [  # (label, run name, overrides)
    ("learnable (TinyFusion 1:2)", "learnable-1of2", ["prune.method=learnable", "prune.pattern='1:2'", "prune.keep=0"]),
    ("learnable (4 of 8, one group)", "learnable-4of8", ["prune.method=learnable"]),
    ("score: Block Influence", "score-bi", ["prune.method=score", "prune.criterion=bi"]),
    ("score: oracle loss", "score-oracle", ["prune.method=score", "prune.criterion=oracle"]),
    ("index: first 4", "index-first4", ["prune.method=index", "prune.keep_indices=[0,1,2,3]", "prune.keep=0"]),
    ("random (seed 0)", "random", ["prune.method=random"]),
    # width, not depth: half the attention heads (2 of 4) by Taylor importance, every block / ranked globally
    ("heads: Taylor, 2 of 4 per block", "heads-block", ["prune.method=heads", "prune.heads_keep=2"]),
    ("heads: Taylor, 16 of 32 global", "heads-global", ["prune.method=heads", "prune.heads_keep=2",
                                                         "prune.heads_scope=global"]),
]


def fid_of(source: str, ref, handle, num: int, out: Path, steps: int) -> tuple[float, float]:
    """(FID, sampling seconds per image) of `num` class-balanced samples of a run or checkpoint."""
    from ditk.generate import generate
    from ditk.metrics import fid as fid_lib

    if out.exists():
        shutil.rmtree(out)
    start = time.perf_counter()
    npz = generate(source, num, seed=0, batch_size=250, out_dir=str(out), overrides=["sample.class_labels=uniform", f"sample.steps={steps}"],
                   progress=False)
    seconds = (time.perf_counter() - start) / num
    result = fid_lib.evaluate(str(npz), ref, handle, kid=False, num_workers=0, progress=False)
    return result["fid"], seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="runs/digits-dit-deep")
    parser.add_argument("--recover-steps", type=int, default=200)
    parser.add_argument("--num", type=int, default=400, help="images per FID")
    parser.add_argument("--steps", type=int, default=50, help="DDPM sampling steps for FID and timing")
    parser.add_argument("--out", default="runs/bench-prune")
    parser.add_argument("--only", nargs="*", help="run names (prefixes) of the rows to run, e.g. score random")
    args = parser.parse_args()

    from ditk.config import resolve
    from ditk.metrics.extractors import ExtractorHandle
    from ditk.metrics.from_run import dataset_images
    from ditk.prune.run import prune
    from ditk.runs import RunDir

    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    handle = ExtractorHandle("digits", mode="clean", weights_dir=None, device="cpu")
    ref = dataset_images(args.source)
    rows = []

    fid, spi = fid_of(args.source, ref, handle, args.num, root / "samples-source", args.steps)
    cfg = resolve("digits-dit-deep")
    from ditk.build import build_model
    from ditk.prune.surgery import count_params

    rows.append({"method": "source (8 blocks)", "params": count_params(build_model(cfg)), "fid_before": fid,
                 "fid_after": fid, "s_per_image": spi})
    print(json.dumps(rows[-1]), flush=True)
    for label, name, overrides in ROWS:
        if args.only and not any(name.startswith(o) for o in args.only):
            continue
        out = root / name
        if out.exists():
            shutil.rmtree(out)
        cfg = resolve("digits-dit-prune", [f"prune.source={args.source}", *overrides,
                                           f"prune.recover_steps={args.recover_steps}", f"run.dir={root}",
                                           f"run.name={name}", "train.log_every=50", "sample.num=16",
                                           "sample.batch_size=16"])
        start = time.perf_counter()
        report = prune(cfg, out, progress=False)
        seconds = time.perf_counter() - start
        run = RunDir(out)
        before, _ = fid_of(str(out / "checkpoints" / "step-000000"), ref, handle, args.num, root / f"samples-{name}-0",
                           args.steps)
        after, spi = fid_of(str(run.latest_checkpoint()), ref, handle, args.num, root / f"samples-{name}-rec",
                              args.steps)
        kept = report.get("kept_blocks") or f"heads {report['block_heads']}"
        rows.append({"method": label, "kept": kept, "params": report["params_after"],
                     "params_before": report["params_before"], "gflops": report["gflops_after"],
                     "gflops_before": report["gflops_before"], "fid_before": before, "fid_after": after,
                     "s_per_image": spi, "prune_and_recover_seconds": round(seconds, 1)})
        print(json.dumps(rows[-1]), flush=True)

    src = rows[0]
    print(f"\n| method | kept blocks | params | GFLOPs/image | FID pruned | FID after {args.recover_steps} KD steps "
          f"| s/image |\n|---|---|---|---|---|---|---|")
    for r in rows:
        gflops = r.get("gflops", rows[1]["gflops_before"] if len(rows) > 1 else float("nan"))
        print(f"| {r['method']} | {r.get('kept', list(range(8)))} | {r['params'] / 1e6:.3f}M | {gflops:.4f} | "
              f"{r['fid_before']:.2f} | {r['fid_after']:.2f} | {r['s_per_image'] * 1000:.2f} ms |")
    print(f"\nsource FID {src['fid_before']:.2f}; {args.num} images per FID ({args.steps} DDPM steps, cfg 2), "
          "digits extractor", file=sys.stderr)


if __name__ == "__main__":
    main()
