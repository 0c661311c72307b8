"""Optional fused Bi-WKV forward kernel in Triton (CUDA inference only; never required).

One program owns one sample and a block of channels and walks the sequence twice, keeping RWKV's
running-maximum state (a, b, o) = (sum e^{...-o} v, sum e^{...-o}, o), as the official CUDA kernel does:
left to right it stores the state of the tokens before each t, right to left it carries the state of
the tokens after t and writes y_t. O(T C) work, fp32 state. An inference kernel, without a backward: training
uses `ditk.models.rwkv.bi_wkv` (exact autograd), so this kernel only runs under torch.no_grad().
Tested against the float64 reference through Triton's CPU interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs may lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _bi_wkv_fwd_kernel(w_ptr, u_ptr, k_ptr, v_ptr, y_ptr, sa_ptr, sb_ptr, so_ptr, T, C,
                           BLOCK_C: tl.constexpr):
        pid_b = tl.program_id(0)
        pid_c = tl.program_id(1)
        cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = cs < C
        w = tl.load(w_ptr + cs, mask=mask, other=0.0)
        u = tl.load(u_ptr + cs, mask=mask, other=0.0)
        base = pid_b * T * C

        # Left to right: the state of tokens i < t, weights e^{-(t-1-i) w + k_i}, stored per t.
        a = tl.zeros([BLOCK_C], dtype=tl.float32)
        b = tl.zeros([BLOCK_C], dtype=tl.float32)
        o = tl.full([BLOCK_C], -1e38, dtype=tl.float32)
        for t in range(0, T):
            off = base + t * C + cs
            tl.store(sa_ptr + off, a, mask=mask)
            tl.store(sb_ptr + off, b, mask=mask)
            tl.store(so_ptr + off, o, mask=mask)
            kt = tl.load(k_ptr + off, mask=mask, other=0.0)
            vt = tl.load(v_ptr + off, mask=mask, other=0.0)
            decayed = o - w
            no = tl.maximum(decayed, kt)
            e1 = tl.exp(decayed - no)
            e2 = tl.exp(kt - no)
            a = e1 * a + e2 * vt
            b = e1 * b + e2
            o = no

        # Right to left: the state of tokens i > t, merged with the stored left state and the bonus term.
        c = tl.zeros([BLOCK_C], dtype=tl.float32)
        d = tl.zeros([BLOCK_C], dtype=tl.float32)
        p = tl.full([BLOCK_C], -1e38, dtype=tl.float32)
        for tt in range(0, T):
            off = base + (T - 1 - tt) * C + cs
            kt = tl.load(k_ptr + off, mask=mask, other=0.0)
            vt = tl.load(v_ptr + off, mask=mask, other=0.0)
            at = tl.load(sa_ptr + off, mask=mask, other=0.0)
            bt = tl.load(sb_ptr + off, mask=mask, other=0.0)
            ot = tl.load(so_ptr + off, mask=mask, other=-1e38)
            s = u + kt
            no = tl.maximum(tl.maximum(ot, p), s)
            e1 = tl.exp(ot - no)
            e2 = tl.exp(p - no)
            e3 = tl.exp(s - no)
            y = (e1 * at + e2 * c + e3 * vt) / (e1 * bt + e2 * d + e3)
            tl.store(y_ptr + off, y, mask=mask)
            decayed = p - w
            np_ = tl.maximum(decayed, kt)
            f1 = tl.exp(decayed - np_)
            f2 = tl.exp(kt - np_)
            c = f1 * c + f2 * vt
            d = f1 * d + f2
            p = np_


def bi_wkv_triton(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_c: int = 64) -> torch.Tensor:
    """Same contract as `ditk.models.rwkv.bi_wkv` (w, u (C,); k, v (B, T, C)), forward only."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    bsz, t_len, chans = k.shape
    out_dtype = v.dtype
    w, u = w.float().contiguous(), u.float().contiguous()
    k, v = k.float().contiguous(), v.float().contiguous()
    y = torch.empty_like(v)
    state = torch.empty((3, bsz, t_len, chans), device=v.device, dtype=torch.float32)
    grid = (bsz, triton.cdiv(chans, block_c))
    _bi_wkv_fwd_kernel[grid](w, u, k, v, y, state[0], state[1], state[2], t_len, chans, BLOCK_C=block_c)
    return y.to(out_dtype)
