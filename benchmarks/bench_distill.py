"""Few-step students against their teacher, side by side in one run: digits FID, NFE and seconds per image.

    python benchmarks/bench_distill.py --teacher runs/digits-dit --students runs/digits-dit-cd,runs/digits-dit-dmd2 \
        [--num 1000] [--steps 1,2,4] [--teacher-steps 100] [--json out.jsonl]

Rows: the teacher with its own solver at --teacher-steps (digits-dit: ancestral DDPM, 100 steps, CFG 2), the same
teacher with DDIM at the students' step counts (what the step count gives without distillation), and every student
with its preset's solver at each of --steps (a student written RUN@S1+S2 is measured at those step counts only:
e.g. a kd student at its teacher's 100 steps, a 1-step generator at 1). For each row:
  FID      `ditk evaluate-fid --run RUN --num N --steps S [--solver X]` (digits feature extractor, against the
           1,618 training digits; same seeds 0..N-1 and class labels i mod 10 for every row)
  NFE      model evaluations per image: steps x 2 with classifier-free guidance (one doubled batch per step is two
           evaluations; a student with an embedded guidance scale, model.guidance_embed, takes cfg as its input
           in one evaluation), x 2 for Heun
  s/image  CPU time (time.process_time, one thread) to sample 100 images in one batch with `ditk.generate`,
           after one warm-up batch: on one thread this is the wall time of an idle machine and is not inflated
           by other jobs sharing the cores
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def fid(run: str, num: int, steps: int, solver: str | None, out: Path) -> float:
    cmd = ["ditk", "evaluate-fid", "--run", run, "--num", str(num), "--steps", str(steps), "--no-kid",
           "--no-progress", "--samples-dir", str(out)]
    if solver:
        cmd += ["--solver", solver]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout)["fid"]


def seconds_per_image(run: str, steps: int, solver: str | None, n: int = 100) -> tuple[float, dict, bool]:
    import torch

    from ditk.generate import load_pipeline, sample_images

    torch.set_num_threads(1)
    overrides = [f"sample.steps={steps}"] + ([f"sample.solver={solver}"] if solver else [])
    pipe = load_pipeline(run, overrides=overrides, device="cpu")
    sample_images(pipe, list(range(8)))  # warm-up
    start = time.process_time()
    sample_images(pipe, list(range(n)))
    return (time.process_time() - start) / n, dict(pipe.cfg.sample), bool(pipe.cfg.model.get("guidance_embed"))


def nfe(sample_cfg: dict, embedded: bool = False) -> int:
    per_step = 2 if float(sample_cfg["cfg_scale"]) != 1.0 and not embedded else 1
    return int(sample_cfg["steps"]) * per_step * (2 if sample_cfg["solver"] == "heun" else 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--students", default="", help="comma-separated student runs")
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--steps", default="1,2,4")
    parser.add_argument("--teacher-steps", type=int, default=100)
    parser.add_argument("--baseline-solver", default="ddim", help="the teacher's solver at the students' step counts")
    parser.add_argument("--work", default="bench-distill", help="folder for the sampled images")
    parser.add_argument("--json", help="append one JSON line per row")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    steps = [int(s) for s in args.steps.split(",")]
    work = Path(args.work)
    rows = [(args.teacher, None, args.teacher_steps, "teacher")]
    rows += [(args.teacher, args.baseline_solver, s, f"teacher, {args.baseline_solver}") for s in steps]
    for spec in filter(None, args.students.split(",")):
        run, _, own = spec.partition("@")
        rows += [(run, None, s, "student") for s in ([int(x) for x in own.split("+")] if own else steps)]
    results = []
    for run, solver, s, role in rows:
        sec, sample_cfg, embedded = seconds_per_image(run, s, solver)
        name = Path(run).name
        value = fid(run, args.num, s, solver, work / f"{name}-{sample_cfg['solver']}{s}")
        row = {"run": name, "role": role, "solver": sample_cfg["solver"], "steps": s, "cfg": sample_cfg["cfg_scale"],
               "embedded_cfg": embedded, "nfe": nfe(sample_cfg, embedded), "fid": round(value, 3), "s_per_image": sec,
               "num": args.num}
        results.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    base = results[0]
    print(f"| run | solver | steps | CFG | NFE | FID ({args.num} images) | ms / image (1 CPU thread) | speed-up vs teacher |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        cfg = f"{r['cfg']:g}" + (" (embedded)" if r["embedded_cfg"] else "")
        print(f"| {r['run']} ({r['role']}) | {r['solver']} | {r['steps']} | {cfg} | {r['nfe']} | {r['fid']:.2f} | "
              f"{1000 * r['s_per_image']:.2f} | {base['s_per_image'] / r['s_per_image']:.0f}x |")


if __name__ == "__main__":
    main()
