"""What checkpoint integrity costs: save (files + fsync + manifest) and verify, against a plain save.

    python benchmarks/bench_checkpoint.py --preset dit-s-2 --repeats 2

Builds the preset's model (random weights, CPU), takes an AdamW state of the same size (two moments), and
prints, side by side in one run: a plain save (safetensors x2 + torch.save, no fsync, no manifest), ditk's
`save_checkpoint` (the same + fsync + xxh3-128 manifest + atomic rename), and `verify_checkpoint` (all files,
and the EMA file only, as `ditk sample` does), plus the checksum throughput of xxh3-128 and sha256.
"""

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="dit-s-2")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from safetensors.torch import save_file

    from ditk import runs
    from ditk.build import build_model
    from ditk.config import resolve

    cfg = resolve(args.preset, allow_missing=("data", "autoencoder"))
    model = build_model(cfg)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    state = {"step": 1, "optimizer": {"state": {i: {"exp_avg": p.detach().clone(), "exp_avg_sq": p.detach().clone()}
                                                for i, p in enumerate(model.parameters())}}}
    n_bytes = sum(v.numel() * v.element_size() for v in sd.values())
    print(f"{args.preset}: {n_bytes / 2**20:.1f} MiB of weights (x2 with the EMA), optimizer state "
          f"{2 * n_bytes / 2**20:.1f} MiB; best of {args.repeats}")

    with tempfile.TemporaryDirectory(dir=".") as root:
        root = Path(root)

        def plain():
            folder = root / "plain"
            folder.mkdir(exist_ok=True)
            save_file(sd, str(folder / "model.safetensors"))
            save_file(sd, str(folder / "ema.safetensors"))
            torch.save(state, folder / "state.pt")

        run = runs.RunDir(root / "run")
        t_plain = best_of(plain, args.repeats)
        t_ditk = best_of(lambda: runs.save_checkpoint(run, 1, sd, sd, state), args.repeats)
        ckpt = run.checkpoints / "step-000001"

        def verify(files=None):
            runs._VERIFIED.clear()  # measure the hashing, not the in-process cache
            assert runs.verify_checkpoint(ckpt, files) is None

        t_verify = best_of(verify, args.repeats)
        t_verify_ema = best_of(lambda: verify(("ema.safetensors",)), args.repeats)
        total = sum(p.stat().st_size for p in ckpt.iterdir())
        blob = os.urandom(256 << 20)
        t_xxh = best_of(lambda: xxhash.xxh3_128(blob).hexdigest(), args.repeats)
        t_sha = best_of(lambda: hashlib.sha256(blob).hexdigest(), args.repeats)

    print(f"checkpoint on disk: {total / 2**20:.1f} MiB")
    print(f"plain save (no fsync, no manifest): {t_plain:7.2f} s")
    print(f"ditk save_checkpoint:               {t_ditk:7.2f} s  ({t_ditk / t_plain:.2f}x the plain save)")
    print(f"verify, all files:                  {t_verify:7.2f} s")
    print(f"verify, ema.safetensors only:       {t_verify_ema:7.2f} s")
    print(f"checksum throughput from memory:    xxh3-128 {256 / t_xxh:7.0f} MB/s, sha256 {256 / t_sha:7.0f} MB/s "
          f"({t_sha / t_xxh:.1f}x)")


if __name__ == "__main__":
    main()
