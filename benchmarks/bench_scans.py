"""The linear-time scans alone, PyTorch form next to the compiled CPU kernel: CPU time and analytic GFLOP/s
of the Mamba selective scan and the Bi-WKV at the S sizes, next to a matmul of the same width; and where
digits-dimba's time goes next to its DiT twin.

    python benchmarks/bench_scans.py [--threads 1] [--rounds 5]

Selective scan: one DiS-S/2 mixer's scan (both directions, d_inner 736, d_state 16, S4D-real A,
dt = softplus(N(-3, 1)), with the softplus and the D skip that the compiled kernel fuses) at 1,026 and 4,098
tokens, counted as 7 T d_inner d_state FLOPs per direction (as `bench_backbones.py` counts it; 3x that for
forward + backward). Bi-WKV: DRWKV-S/2's (C = 384) at 1,024 and 4,096 tokens, 13 T C FLOPs (the paper's
count), forward only (the compiled kernel is an inference kernel). The two forms are timed alternately,
--rounds times (half as many for forward + backward), after a warm-up each; printed: median process CPU
times and the median of the per-round ratios. Dimba: the tiny preset at 32 px (256 tokens) with its Mamba
blocks, with them replaced by the identity, and its DiT twin (4 heads as the model, and 1 head of 64 channels
as `bench_backbones.py` paired it before 2026-12-03; medians of 3 x 30 forwards). Not part of the
test suite.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def cpu_ms(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return 1e3 * statistics.median(times)


def side_by_side(fns: dict, rounds: int) -> dict:
    """{name: [ms per round]}: each round times every fn once (CPU time, after one warm-up each), alternating."""
    for fn in fns.values():
        fn()
    out = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.process_time()
            fn()
            out[name].append(1e3 * (time.process_time() - start))
    return out


def report(label: str, flops: float, times: dict) -> None:
    """Median time and analytic GFLOP/s of each implementation, and the median of the per-round ratios."""
    (a, ta), (b, tb) = times.items()
    ratio = statistics.median(x / y for x, y in zip(ta, tb))
    parts = [f"{name} {statistics.median(t):.1f} ms ({flops / statistics.median(t) / 1e6:.2f} GFLOP/s)"
             for name, t in times.items()]
    print(f"{label}: {'; '.join(parts)}; {a} / {b} = {ratio:.2f}x", flush=True)


def scans(rounds: int) -> None:
    from ditk.models import _scan_cpu, _wkv_cpu
    from ditk.models.mamba import chunked_scan
    from ditk.models.rwkv import bi_wkv, bi_wkv_flops

    if _scan_cpu.library() is None or _wkv_cpu.library() is None:
        print("note: no C++ compiler: only the PyTorch forms are timed", file=sys.stderr)
    torch.manual_seed(0)
    groups, d, n = 2, 736, 16
    for tokens in (1026, 4098):
        dt = torch.randn(groups, tokens, d) - 3
        u = torch.randn(groups, tokens, d)
        A = -torch.arange(1, n + 1.0)[:, None].expand(groups, n, d).contiguous()
        B, C = torch.randn(groups, tokens, n), torch.randn(groups, tokens, n)
        D, bias = torch.ones(groups, d), torch.zeros(groups, d)

        def torch_form():  # what the mixer's PyTorch path runs: softplus, the chunked scan, the D skip
            delta = F.softplus(dt + bias[:, None])
            return torch.addcmul(chunked_scan(delta, delta * u, A, B, C), u, D[:, None])

        def compiled():  # the same in the compiled loop (second direction scanned from the end, as in the mixer)
            return _scan_cpu.compiled_scan(dt, u, A, B, C, bias, D, softplus=True, reverse_from=1)

        fns = {"pytorch": torch_form}
        if _scan_cpu.library() is not None:
            fns["compiled"] = compiled
        flops = 7 * groups * tokens * d * n
        with torch.no_grad():
            times = side_by_side(fns, rounds)
        if len(times) == 2:
            report(f"selective scan, DiS-S/2 mixer (2 directions), {tokens} tokens, forward", flops, times)
        grads = [x.requires_grad_() for x in (dt, u, A, B, C, D, bias)]
        gy = torch.randn(groups, tokens, d)
        train = {name: (lambda fn=fn: fn().backward(gy)) for name, fn in fns.items()}
        times = side_by_side(train, max(1, rounds // 2))
        for x in grads:
            x.requires_grad_(False)
        if len(times) == 2:
            report(f"selective scan, {tokens} tokens, forward + backward", 3 * flops, times)
    for tokens in (1024, 4096):
        k, v = torch.randn(1, tokens, 384), torch.randn(1, tokens, 384)
        w, u = torch.rand(384) / tokens, torch.rand(384) / tokens
        fns = {"pytorch": lambda: bi_wkv(w, u, k, v)}
        if _wkv_cpu.library() is not None:
            fns["compiled"] = lambda: _wkv_cpu.bi_wkv_cpu(w, u, k, v)
        with torch.no_grad():
            times = side_by_side(fns, rounds)
        if len(times) == 2:
            report(f"Bi-WKV, DRWKV-S/2 (C 384), {tokens} tokens, forward", bi_wkv_flops(1, tokens, 384), times)
        x, W = torch.randn(tokens, 384), torch.randn(384, 1536)
        mm = cpu_ms(lambda: x @ W)
        print(f"  a ({tokens} x 384) @ (384 x 1536) matmul: {2 * tokens * 384 * 1536 / mm / 1e6:.0f} GFLOP/s")


def dimba_floor() -> None:
    from bench_backbones import build, conditioning, dit_twin
    from ditk.config import resolve

    model = build({"preset": "digits-dimba", "overrides": ["model.input_size=32"]})
    cfg = resolve("digits-dimba", ["model.input_size=32"], allow_missing=("data", "autoencoder"))
    twin = build(dit_twin(cfg, len(model.blocks), 32))  # 4 heads, as the model
    spec = dit_twin(cfg, len(model.blocks), 32)
    one_head = build({"dit": {**spec["dit"], "num_heads": 1}})  # the twin of the runs before 2026-12-03
    x, t, cond = torch.randn(1, 1, 32, 32), torch.full((1,), 500.0), conditioning(model, 1, 16)
    y = torch.zeros(1, dtype=torch.long)

    class Identity(torch.nn.Module):  # a MambaBlock's interface: (hidden, residual) -> (hidden, residual)
        def forward(self, hidden, residual=None):
            return hidden, (hidden if residual is None else residual + hidden)

    rows = []
    with torch.no_grad():
        for _ in range(3):
            full = cpu_ms(lambda: model(x, t, **cond), 30)
            mambas = [block.mamba for block in model.blocks]
            for block in model.blocks:
                block.mamba = Identity()
            without = cpu_ms(lambda: model(x, t, **cond), 30)
            for block, mamba in zip(model.blocks, mambas):
                block.mamba = mamba
            rows.append((full, without, cpu_ms(lambda: twin(x, t, y=y), 30), cpu_ms(lambda: one_head(x, t, y=y), 30)))
    full, without, dit, dit1 = (statistics.median(c) for c in zip(*rows))
    print(f"digits-dimba @32px (256 tokens): {full:.2f} ms; without its Mamba blocks {without:.2f} ms; DiT twin "
          f"(4 heads) {dit:.2f} ms ({full / dit:.2f}x / {without / dit:.2f}x); with 1 head of 64 {dit1:.2f} ms "
          f"({full / dit1:.2f}x / {without / dit1:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5, help="alternating timed rounds per comparison")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scans(args.rounds)
    dimba_floor()
    print(f"{args.threads} CPU thread(s), torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
