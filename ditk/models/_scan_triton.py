"""The selective scan as a Triton kernel, forward and backward (CUDA; `model.scan_backend=triton`, or `auto` on
CUDA when mamba_ssm is not installed). Never required: without Triton the PyTorch scan runs.

    delta_t = softplus(dt_t + bias),  h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t,  y_t = C_t . h_t + D u_t
                                                                               (per channel d, state n)

Same contract as the compiled CPU loop (`ditk.models._scan_cpu.CompiledScan`): token-major dt, u (G, L, d);
A (G, n, d); B, C (G, L, n); bias, D (G, d) or None; sequences g >= reverse_from are scanned from their last
token to the first (the reversed branch of a bidirectional mixer), so both directions go through one launch.

Forward: one program owns one sequence and a block of BLOCK_D channels with the full d_state, keeps the
(d_state, BLOCK_D) state in registers and walks the sequence token by token, as Mamba's Algorithm 2 (the
work per token and channel, softplus, delta*u, D*u, in the same pass). Accumulation is float32 (float64 for
float64 inputs). When a gradient is needed it also writes the state entering every chunk of K ~ sqrt(L)
tokens (L/K states per sequence).

Backward: for each chunk, from the last, the program recomputes the chunk's states from its saved entering
state into a small per-sequence work buffer (K + 1 states), then runs the adjoint recurrence
g_t = C_t grad_y_t + a_{t+1} g_{t+1} back through it, accumulating
    dL/ddu_t = sum_n g_t B_t,   dL/dB_t = sum_d g_t du_t,   dL/dC_t = sum_d grad_y_t h_t,
    dL/d(delta_t A) = g_t a_t h_{t-1}  ->  dL/ddelta_t = sum_n (.) A + dL/ddu_t u_t,   dL/dA = sum_t (.) delta_t,
and through the softplus, D and bias. dB and dC sum over channels, which are split across programs: each
program writes its partial sums and they are added afterwards (deterministic, no atomics). Memory for a
gradient: ~2 sqrt(L) states per sequence instead of L.

Tested on CPU through Triton's interpreter (TRITON_INTERPRET=1; tests/test_mamba_triton.py) against a float64
token-by-token loop and autograd through it, and inside the DiS / Dimba mixers against the PyTorch scan.
"""

from __future__ import annotations

import math

import torch

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs may lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BLOCK_D = 32  # channels per program: a (16, 32) float32 state is 4 registers per thread with 4 warps


def available() -> bool:
    return triton is not None


def interpreted() -> bool:
    """Whether the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return triton is not None and type(_scan_fwd_kernel).__name__ == "InterpretedFunction"


def usable(x: torch.Tensor) -> bool:
    """Whether the Triton scan can run on tensors like x: CUDA tensors, or CPU tensors under the interpreter."""
    return available() and (x.is_cuda or (interpreted() and x.device.type == "cpu"))


def chunk_for(length: int) -> int:
    """Tokens between saved states: ~sqrt(L) balances the saved states (L/K) against the work buffer (K)."""
    return max(1, math.isqrt(max(1, length - 1)) + 1)


if triton is not None:

    @triton.jit
    def _delta(dt_ptr, bias, off, cmask, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, ACC: tl.constexpr):
        """delta = softplus(dt + bias) (or dt + bias) of one token's channel block, and d delta / d dt.

        softplus(x) as torch computes it (x above 20 passes through; slope sigmoid(x), or 1 above 20). log(1 + e),
        e = e^-|x| in (0, 1], without log1p: Goldberg's log(w) e / (w - 1), w = 1 + e rounded, is accurate to an
        ulp also where w rounds to 1. (One helper, not two: each nested call costs the interpreter ~ms.)"""
        x = tl.load(dt_ptr + off, mask=cmask, other=0.0).to(ACC)
        if HAS_BIAS:
            x = x + bias
        if SOFTPLUS:
            e = tl.exp(-tl.abs(x))
            w = 1.0 + e
            w1 = w - 1.0
            log1p = tl.where(w1 == 0.0, e, tl.log(w) * (e / tl.where(w1 == 0.0, 1.0, w1)))
            big = x > 20.0
            delta = tl.where(big, x, tl.maximum(x, 0.0) + log1p)
            slope = tl.where(big, 1.0, tl.where(x >= 0.0, 1.0 / w, e / w))
        else:
            delta, slope = x, tl.full(x.shape, 1.0, ACC)
        return delta, slope

    @triton.jit
    def _scan_fwd_kernel(dt_ptr, u_ptr, A_ptr, B_ptr, C_ptr, bias_ptr, D_ptr, y_ptr, states_ptr,
                         L, d, n, K, reverse_from,
                         HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr, SOFTPLUS: tl.constexpr, SAVE: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
        ACC: tl.constexpr = y_ptr.dtype.element_ty
        g = tl.program_id(0).to(tl.int64)
        cs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        ns = tl.arange(0, BLOCK_N)
        cmask, nmask = cs < d, ns < n
        mask2 = nmask[:, None] & cmask[None, :]
        off2 = ns[:, None] * d + cs[None, :]  # (n, d) layout of A and of a state
        A = tl.load(A_ptr + g * n * d + off2, mask=mask2, other=0.0).to(ACC)
        bias = tl.load(bias_ptr + g * d + cs, mask=cmask, other=0.0).to(ACC) if HAS_BIAS else 0.0
        Dv = tl.load(D_ptr + g * d + cs, mask=cmask, other=0.0).to(ACC) if HAS_D else 0.0
        rev = (tl.program_id(0) >= reverse_from).to(tl.int64)
        n_chunks = tl.cdiv(L, K)
        h = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
        for s in range(0, L):
            if SAVE:
                if s % K == 0:  # the state entering chunk s / K
                    tl.store(states_ptr + (g * n_chunks + s // K) * n * d + off2, h, mask=mask2)
            t = s + rev * (L - 1 - 2 * s)  # token of scan step s
            off = (g * L + t) * d + cs
            delta, _ = _delta(dt_ptr, bias, off, cmask, HAS_BIAS, SOFTPLUS, ACC)
            uv = tl.load(u_ptr + off, mask=cmask, other=0.0).to(ACC)
            Bv = tl.load(B_ptr + (g * L + t) * n + ns, mask=nmask, other=0.0).to(ACC)
            Cv = tl.load(C_ptr + (g * L + t) * n + ns, mask=nmask, other=0.0).to(ACC)
            h = tl.exp(delta[None, :] * A) * h + (delta * uv)[None, :] * Bv[:, None]
            y = tl.sum(h * Cv[:, None], axis=0)
            if HAS_D:
                y += Dv * uv
            tl.store(y_ptr + off, y, mask=cmask)

    @triton.jit
    def _scan_bwd_kernel(dt_ptr, u_ptr, A_ptr, B_ptr, C_ptr, bias_ptr, D_ptr, states_ptr, gy_ptr, work_ptr,
                         g_dt_ptr, g_u_ptr, g_A_ptr, g_B_ptr, g_C_ptr, g_bias_ptr, g_D_ptr,
                         L, d, n, K, reverse_from,
                         HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr, SOFTPLUS: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
        ACC: tl.constexpr = g_dt_ptr.dtype.element_ty
        g = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1).to(tl.int64)
        n_blk = tl.num_programs(1)
        cs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        ns = tl.arange(0, BLOCK_N)
        cmask, nmask = cs < d, ns < n
        mask2 = nmask[:, None] & cmask[None, :]
        off2 = ns[:, None] * d + cs[None, :]
        A = tl.load(A_ptr + g * n * d + off2, mask=mask2, other=0.0).to(ACC)
        bias = tl.load(bias_ptr + g * d + cs, mask=cmask, other=0.0).to(ACC) if HAS_BIAS else 0.0
        Dv = tl.load(D_ptr + g * d + cs, mask=cmask, other=0.0).to(ACC) if HAS_D else 0.0
        rev = (tl.program_id(0) >= reverse_from).to(tl.int64)
        n_chunks = tl.cdiv(L, K)
        work = work_ptr + g * (K + 1) * n * d  # this sequence's K + 1 states; the program owns its channels
        part = (g * n_blk + blk) * L * n  # this program's partial sums of dB, dC: (L, n)

        gh = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)  # dL/dh_s from the steps after s: a_{s+1} g_{s+1}
        gA = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
        g_bias = tl.zeros([BLOCK_D], dtype=ACC)
        g_D = tl.zeros([BLOCK_D], dtype=ACC)
        for kk in range(0, n_chunks):
            k = n_chunks - 1 - kk
            s0 = k * K
            length = tl.minimum(K, L - s0)
            # Recompute the chunk's states: work[j] = the state before step s0 + j.
            h = tl.load(states_ptr + (g * n_chunks + k) * n * d + off2, mask=mask2, other=0.0)
            tl.store(work + off2, h, mask=mask2)
            for j in range(0, length):
                s = s0 + j
                t = s + rev * (L - 1 - 2 * s)
                off = (g * L + t) * d + cs
                delta, _ = _delta(dt_ptr, bias, off, cmask, HAS_BIAS, SOFTPLUS, ACC)
                uv = tl.load(u_ptr + off, mask=cmask, other=0.0).to(ACC)
                Bv = tl.load(B_ptr + (g * L + t) * n + ns, mask=nmask, other=0.0).to(ACC)
                h = tl.exp(delta[None, :] * A) * h + (delta * uv)[None, :] * Bv[:, None]
                tl.store(work + (j + 1) * n * d + off2, h, mask=mask2)
            tl.debug_barrier()  # the work buffer's stores are visible to every thread of the program
            # The adjoint recurrence back through the chunk.
            for jj in range(0, length):
                j = length - 1 - jj
                s = s0 + j
                t = s + rev * (L - 1 - 2 * s)
                off = (g * L + t) * d + cs
                delta, slope = _delta(dt_ptr, bias, off, cmask, HAS_BIAS, SOFTPLUS, ACC)
                uv = tl.load(u_ptr + off, mask=cmask, other=0.0).to(ACC)
                gy = tl.load(gy_ptr + off, mask=cmask, other=0.0).to(ACC)
                Bv = tl.load(B_ptr + (g * L + t) * n + ns, mask=nmask, other=0.0).to(ACC)
                Cv = tl.load(C_ptr + (g * L + t) * n + ns, mask=nmask, other=0.0).to(ACC)
                h_prev = tl.load(work + j * n * d + off2, mask=mask2, other=0.0)
                h_next = tl.load(work + (j + 1) * n * d + off2, mask=mask2, other=0.0)
                a = tl.exp(delta[None, :] * A)
                du = delta * uv
                tl.store(g_C_ptr + part + t * n + ns, tl.sum(h_next * gy[None, :], axis=1), mask=nmask)
                G = Cv[:, None] * gy[None, :] + gh  # dL/dh_t
                tl.store(g_B_ptr + part + t * n + ns, tl.sum(G * du[None, :], axis=1), mask=nmask)
                g_du = tl.sum(G * Bv[:, None], axis=0)
                g_log_a = G * a * h_prev  # dL/d(delta_t A)
                gA += g_log_a * delta[None, :]
                g_delta = tl.sum(g_log_a * A, axis=0) + g_du * uv
                g_u = g_du * delta
                if HAS_D:
                    g_u += gy * Dv
                    g_D += gy * uv
                g_x = g_delta * slope  # dL/d(dt + bias)
                g_bias += g_x
                tl.store(g_dt_ptr + off, g_x, mask=cmask)
                tl.store(g_u_ptr + off, g_u, mask=cmask)
                gh = G * a
            tl.debug_barrier()  # every read of this chunk's states is done before the next chunk overwrites them
        tl.store(g_A_ptr + g * n * d + off2, gA, mask=mask2)
        tl.store(g_bias_ptr + g * d + cs, g_bias, mask=cmask)
        tl.store(g_D_ptr + g * d + cs, g_D, mask=cmask)


def _blocks(n: int, block_d: int | None):
    """(channels, states) per program: BLOCK_D channels (or block_d) and d_state rounded up to a power of 2."""
    return int(block_d or BLOCK_D), max(2, triton.next_power_of_2(n))


class TritonScan(torch.autograd.Function):
    """y = scan + D u (see the module docstring); same arguments as `_scan_cpu.CompiledScan`, plus the chunk
    length (None: ~sqrt(L)) and the channel block (None: BLOCK_D)."""

    @staticmethod
    def forward(ctx, dt, u, A, B, C, bias, D, softplus, reverse_from, chunk=None, block_d=None):
        f = torch.promote_types(dt.dtype, torch.float32)  # float32, or float64 for float64 inputs
        dt, u, A, B, C = (x.to(f).contiguous() for x in (dt, u, A, B, C))
        bias, D = (None if x is None else x.to(f).contiguous() for x in (bias, D))
        groups, length, d = dt.shape
        n = A.shape[1]
        K = int(chunk or chunk_for(length))
        bd, bn = _blocks(n, block_d)
        save = any(ctx.needs_input_grad)
        y = torch.empty_like(dt)
        # without SAVE the kernel never touches `states`: any valid pointer will do, so no buffer is allocated
        states = dt.new_empty(groups, -(-length // K), n, d) if save else y
        grid = (groups, triton.cdiv(d, bd))
        _scan_fwd_kernel[grid](dt, u, A, B, C, dt if bias is None else bias, dt if D is None else D, y, states,
                               length, d, n, K, reverse_from, HAS_BIAS=bias is not None, HAS_D=D is not None,
                               SOFTPLUS=bool(softplus), SAVE=save, BLOCK_D=bd, BLOCK_N=bn)
        ctx.softplus, ctx.reverse_from, ctx.K, ctx.blocks = bool(softplus), reverse_from, K, (bd, bn)
        ctx.has = (bias is not None, D is not None)
        ctx.save_for_backward(dt, u, A, B, C, bias, D, states if save else None)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        dt, u, A, B, C, bias, D, states = ctx.saved_tensors
        groups, length, d = dt.shape
        n = A.shape[1]
        bd, bn = ctx.blocks
        K = ctx.K
        gy = grad_y.to(dt.dtype).contiguous()
        n_blk = triton.cdiv(d, bd)
        work = dt.new_empty(groups, K + 1, n, d)
        g_dt, g_u, g_A = torch.empty_like(dt), torch.empty_like(u), torch.empty_like(A)
        g_B_part, g_C_part = dt.new_empty(groups, n_blk, length, n), dt.new_empty(groups, n_blk, length, n)
        g_bias, g_D = dt.new_empty(groups, d), dt.new_empty(groups, d)
        _scan_bwd_kernel[(groups, n_blk)](
            dt, u, A, B, C, dt if bias is None else bias, dt if D is None else D, states, gy, work,
            g_dt, g_u, g_A, g_B_part, g_C_part, g_bias, g_D, length, d, n, K, ctx.reverse_from,
            HAS_BIAS=ctx.has[0], HAS_D=ctx.has[1], SOFTPLUS=ctx.softplus, BLOCK_D=bd, BLOCK_N=bn)
        return (g_dt, g_u, g_A, g_B_part.sum(1), g_C_part.sum(1), g_bias if ctx.has[0] else None,
                g_D if ctx.has[1] else None, None, None, None, None)


def triton_scan(dt, u, A, B, C, bias=None, D=None, softplus=False, reverse_from=None, chunk=None, block_d=None):
    """`TritonScan` with bias and D (d,) (shared) or (G, d); sequences g >= reverse_from (none by default) are
    scanned from their last token to the first. Returns y (G, L, d) in float32 (float64 for float64 inputs)."""
    if not available():
        raise RuntimeError("Triton is not installed")
    groups, _, d = dt.shape
    bias, D = (None if x is None else x.expand(groups, d) for x in (bias, D))
    reverse_from = groups if reverse_from is None else int(reverse_from)
    return TritonScan.apply(dt, u, A, B, C, bias, D, bool(softplus), reverse_from, chunk, block_d)
