"""The selective scan on a GPU: the Triton kernel next to the PyTorch chunked scan and (when installed) mamba_ssm's
CUDA kernel, forward and forward + backward, at DiS-S/2 mixer sizes.

    python benchmarks/bench_scan_triton.py [--batch 8] [--tokens 1026,4098] [--d-inner 736] [--d-state 16]
                                           [--repeats 20] [--json out.jsonl]

Inputs as one bidirectional DiS-S/2 mixer sees them: 2 x batch sequences (both directions) of --tokens tokens,
d_inner 736, d_state 16, S4D-real A, dt = N(-3, 1) before the softplus, D skip and dt bias. Each backend runs
the same token-major contract `ditk.models.mamba.scan` dispatches (softplus, bias, D fused; mamba_ssm through
`selective_scan`'s (batch, d, L) layout, so its time includes those transposes). Printed per length: the
median of --repeats timings (CUDA-synchronised wall time after 3 warm-ups), analytic GFLOP/s (7 T d_inner
d_state per sequence forward, 3x that forward + backward, as bench_scans.py counts), the ratio to the PyTorch
scan, the peak CUDA memory of the call, and the largest difference to the PyTorch output. Not part of the
test suite. Needs a CUDA device; `--device cpu` runs it through Triton's interpreter (TRITON_INTERPRET=1,
tiny sizes only: a smoke test of this script, not a timing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch


def timed(fn, repeats: int, device: torch.device):
    """(median seconds, peak bytes above the start) of fn() over `repeats` runs after 3 warm-ups."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else 0
    return statistics.median(times), peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="images per batch (2x sequences: both directions)")
    parser.add_argument("--tokens", default="1026,4098", help="comma-separated sequence lengths")
    parser.add_argument("--d-inner", type=int, default=736, help="channels (DiS-S/2: 736)")
    parser.add_argument("--d-state", type=int, default=16, help="state size per channel")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per measurement (median)")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu under TRITON_INTERPRET=1 (smoke test)")
    parser.add_argument("--json", default=None, help="append one JSON line per measurement to this file")
    args = parser.parse_args()

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from ditk.models import _scan_triton, mamba

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device (use --device cpu with TRITON_INTERPRET=1 for a smoke test)", file=sys.stderr)
        return 2
    if not _scan_triton.usable(torch.empty(0, device=device)):
        print("error: Triton is not installed, or --device cpu without TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    backends = ["torch", "triton"] + (["mamba_ssm"] if device.type == "cuda" and mamba.kernels_available() else [])
    if "mamba_ssm" not in backends:
        print("note: mamba_ssm is not installed: Triton and PyTorch only", file=sys.stderr)
    g = torch.Generator(device="cpu").manual_seed(0)
    groups, d, n = 2 * args.batch, args.d_inner, args.d_state
    for tokens in (int(t) for t in args.tokens.split(",")):
        r = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
        dt, u, B, C = r(groups, tokens, d) - 3, r(groups, tokens, d), r(groups, tokens, n), r(groups, tokens, n)
        A = -torch.arange(1, n + 1.0, device=device)[:, None].expand(groups, n, d).contiguous()
        D, bias = torch.ones(d, device=device), torch.zeros(d, device=device)
        leaves = [x.requires_grad_() for x in (dt, u, B, C)]

        def run(backend):
            if backend == "mamba_ssm":  # its (batch, d, L) layout, one direction's A (the same for all here)
                return mamba.selective_scan(u.transpose(1, 2), dt.transpose(1, 2), A[0].t(), B.transpose(1, 2),
                                            C.transpose(1, 2), D, None, bias, True, backend).transpose(1, 2)
            return mamba.scan(u, dt, A, B, C, D, bias, True, backend=backend)

        with torch.no_grad():
            ref = run("torch")
        flops = 7 * groups * tokens * d * n
        base = {}
        for backend in backends:
            with torch.no_grad():
                diff = (run(backend) - ref).abs().max().item()
                fwd, fwd_mem = timed(lambda: run(backend), args.repeats, device)
            w = torch.randn_like(ref)
            train, train_mem = timed(lambda: torch.autograd.grad((run(backend) * w).sum(), leaves), args.repeats,
                                     device)
            base.setdefault("fwd", fwd)
            base.setdefault("train", train)
            row = dict(backend=backend, tokens=tokens, sequences=groups, d_inner=d, d_state=n,
                       fwd_ms=1e3 * fwd, fwd_gflops=flops / fwd / 1e9, train_ms=1e3 * train,
                       train_gflops=3 * flops / train / 1e9, fwd_peak_mb=fwd_mem / 2**20,
                       train_peak_mb=train_mem / 2**20, max_abs_diff_to_torch=diff, device=str(device))
            print(f"T={tokens:5d} {backend:9s} fwd {row['fwd_ms']:8.2f} ms ({row['fwd_gflops']:7.1f} GFLOP/s, "
                  f"{fwd / base['fwd']:.2f}x torch, {row['fwd_peak_mb']:.0f} MB)  fwd+bwd {row['train_ms']:8.2f} ms "
                  f"({row['train_gflops']:7.1f} GFLOP/s, {train / base['train']:.2f}x torch, "
                  f"{row['train_peak_mb']:.0f} MB)  |diff| {diff:.1e}", flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
