"""The linear-time scans alone: CPU time and analytic GFLOP/s of the Mamba selective scan and the Bi-WKV at
the S sizes, next to a matmul of the same width; and where digits-dimba's time goes next to its DiT twin.

    python benchmarks/bench_scans.py [--threads 1]

Selective scan: one DiS-S/2 mixer's scan (both directions batched, d_inner 736, d_state 16, S4D-real A,
dt = softplus(N(-3, 1))) at 1,026 and 4,098 tokens, counted as 7 T d_inner d_state FLOPs per direction (as
`bench_backbones.py` counts it). Bi-WKV: DRWKV-S/2's (C = 384) at 1,024 and 4,096 tokens, 13 T C FLOPs
(the paper's count). Times: median process CPU time of 3 calls after a warm-up, no autograd. Dimba: the
tiny preset at 32 px (256 tokens) with its Mamba blocks, with them replaced by the identity, and its DiT
twin (medians of 3 x 30 forwards). Not part of the test suite.
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


def scans() -> None:
    from ditk.models.mamba import chunked_scan
    from ditk.models.rwkv import bi_wkv, bi_wkv_flops

    torch.manual_seed(0)
    groups, d, n = 2, 736, 16
    for tokens in (1026, 4098):
        delta = F.softplus(torch.randn(groups, tokens, d) - 3)
        du = delta * torch.randn(groups, tokens, d)
        A = -torch.arange(1, n + 1.0)[:, None].expand(groups, n, d).contiguous()
        B, C = torch.randn(groups, tokens, n), torch.randn(groups, tokens, n)
        with torch.no_grad():
            ms = cpu_ms(lambda: chunked_scan(delta, du, A, B, C))
        print(f"selective scan, DiS-S/2 mixer (2 directions), {tokens} tokens: {ms:.1f} ms, "
              f"{7 * groups * tokens * d * n / ms / 1e6:.2f} GFLOP/s")
    for tokens in (1024, 4096):
        k, v = torch.randn(1, tokens, 384), torch.randn(1, tokens, 384)
        w, u = torch.rand(384) / tokens, torch.rand(384) / tokens
        with torch.no_grad():
            ms = cpu_ms(lambda: bi_wkv(w, u, k, v))
        x, W = torch.randn(tokens, 384), torch.randn(384, 1536)
        mm = cpu_ms(lambda: x @ W)
        print(f"Bi-WKV, DRWKV-S/2 (C 384), {tokens} tokens: {ms:.1f} ms, {bi_wkv_flops(1, tokens, 384) / ms / 1e6:.3f} "
              f"GFLOP/s; a ({tokens} x 384) @ (384 x 1536) matmul: {2 * tokens * 384 * 1536 / mm / 1e6:.0f} GFLOP/s")


def dimba_floor() -> None:
    from bench_backbones import build, conditioning, dit_twin
    from ditk.config import resolve

    model = build({"preset": "digits-dimba", "overrides": ["model.input_size=32"]})
    cfg = resolve("digits-dimba", ["model.input_size=32"], allow_missing=("data", "autoencoder"))
    twin = build(dit_twin(cfg, len(model.blocks), 32))
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
            rows.append((full, without, cpu_ms(lambda: twin(x, t, y=y), 30)))
    full, without, dit = (statistics.median(c) for c in zip(*rows))
    print(f"digits-dimba @32px (256 tokens): {full:.2f} ms; without its Mamba blocks {without:.2f} ms; DiT twin "
          f"{dit:.2f} ms ({full / dit:.2f}x / {without / dit:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scans()
    dimba_floor()
    print(f"{args.threads} CPU thread(s), torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
