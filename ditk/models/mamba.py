"""Mamba (selective state space) layers in plain PyTorch, for DiS and Dimba.

The selective scan (Gu & Dao 2023, Alg. 2) runs, per channel d and state n,

    h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t,      y_t = C_t . h_t + D u_t,      out_t = y_t * silu(z_t)

with dt_t = softplus(dt_t + dt_bias). `chunked_scan` solves it chunk by chunk: inside a chunk of L tokens all
states at once in the factorised form h_t = P_t (h_in + sum_{s<=t} dt_s u_s B_s / P_s), P_t = exp(A S_t) and S_t
the in-chunk cumulative sum of dt (Mamba-2's chunked SSD adapted to Mamba-1's per-channel diagonal A: one exp,
a prefix-sum matmul and elementwise products on cache-sized tiles), the last state carried into the next chunk;
no Python loop over tokens. Chunks are shortened where fast decays would overflow the factorised form, so the
result is exact for any input. Its backward is written out: forward keeps only the state entering each chunk,
backward recomputes each chunk and runs the adjoint recurrence the same way from the end. Both directions of
the bidirectional mixer, and all samples, are scanned as one batch.

On a CPU with a C++ compiler, `scan` (and the mixer) run the compiled loop of `ditk.models._scan_cpu` instead
(`scan_backend="auto"` or "compiled"): the recurrence token by token with the softplus, Δ·u and D·u fused, ~4x
faster than the chunked form; `chunked_scan` stays the PyTorch form everywhere else. On CUDA, when the
optional `mamba_ssm` package is installed, `selective_scan` calls its fused kernel (`scan_backend="auto"`);
otherwise, with Triton (it ships with CUDA builds of PyTorch), `scan` runs the Triton kernel of
`ditk.models._scan_triton` (forward and backward; `scan_backend="auto"` or "triton"); none is ever required.
`Mamba` is the mixer layer: its parameter names and shapes are those of `mamba_ssm.modules.mamba_simple.Mamba`
and of transformers' `MambaMixer`, and the bidirectional variant adds Vision Mamba's "v2" backward branch
(`conv1d_b`, `x_proj_b`, `dt_proj_b`, `A_b_log`, `D_b`) as DiS and Dimba use it.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from . import _cpu_kernels, _scan_cpu
from .layers import HookPoint

SCAN_BACKENDS = ("auto", "torch", "compiled", "mamba_ssm", "triton")


#################################################################################
#                        Chunked selective scan (CPU / any device)              #
#################################################################################

# Elements of one sequence's (chunk, d_state, d_inner) tile, and of the tile of the sequences scanned together:
# the chunk loop works on four such tiles, which then stay in the L2 cache. Measured on a 2 MiB-L2 Xeon, one
# thread: exp / products / the prefix-sum matmul run 3-5x faster on cache-resident tiles than on full-size
# tensors (which also pay for fresh pages on every allocation), while shorter chunks cost more Python calls.
TILE_ELEMENTS = 1 << 16
GROUP_TILE_ELEMENTS = 1 << 17
MAX_CHUNK = 64
# Largest in-chunk decay exponent |A| * sum(dt) for which the factorised form below stays finite and exact:
# its terms b_s / P_s grow up to e^R (float32 overflows at e^88; R = 60 leaves room for |b| up to 1e12).
MAX_LOG_DECAY = {torch.float32: 60.0, torch.float64: 600.0}


def chunk_length(length: int, d: int, n: int, cap: int | None = None) -> int:
    """Tokens per chunk: as many as fit one sequence's tile of TILE_ELEMENTS (1 to MAX_CHUNK, or `cap`), spread
    evenly over the sequence so that the last chunk is nearly full. Independent of the batch size, so that a
    sequence gives the same result alone or in a batch."""
    if cap is None:
        cap = max(1, min(MAX_CHUNK, TILE_ELEMENTS // max(1, d * n)))
    cap = max(1, min(cap, length))
    k = -(-length // cap)
    return -(-length // k)


def in_chunk_cumsum(delta: torch.Tensor, lc: int) -> torch.Tensor:
    """S (G, K, lc, d): inclusive cumulative sums of delta (G, L, d) inside each chunk of lc tokens (zero-padded
    to K lc tokens), as one small matmul with a triangle of ones (torch.cumsum is slow over short axes)."""
    groups, length, d = delta.shape
    k = -(-length // lc)
    if k * lc != length:
        delta = F.pad(delta, (0, 0, 0, k * lc - length))
    lower = torch.ones(lc, lc, dtype=delta.dtype, device=delta.device).tril()
    return torch.matmul(lower, delta.reshape(groups, k, lc, d))


def stable_chunk_sums(delta: torch.Tensor, a_max: torch.Tensor, lc: int):
    """(S, lc): the in-chunk sums of delta (G, L, d) >= 0 for the longest chunk length <= lc whose decay range
    max_n |A| * sum_chunk(dt) stays within MAX_LOG_DECAY in every chunk and channel; a_max (G, d) = max_n |A|.
    Ordinary models keep lc (at init dt <= 0.1 and |A| <= 16: at most 1.6 per token); chunk length 1 is the
    plain recurrence, finite for any decay."""
    length, d = delta.shape[1:]
    limit = MAX_LOG_DECAY.get(delta.dtype, 60.0)
    while True:
        S = in_chunk_cumsum(delta, lc)
        if lc == 1 or float((S[:, :, -1] * a_max[:, None]).amax()) <= limit:
            return S, lc
        lc = chunk_length(length, d, 1, cap=lc // 2)


class _Chunk:
    """Chunk k of a (G, L, c) tensor as a (G, lc, c) view; the last, partial chunk zero-padded (a small copy)."""

    def __init__(self, lc: int, length: int):
        self.lc, self.length = lc, length
        self.count = -(-length // lc)

    def __call__(self, x: torch.Tensor, k: int) -> torch.Tensor:
        start = k * self.lc
        if start + self.lc <= self.length:
            return x[:, start:start + self.lc]
        part = x.new_zeros(x.shape[0], self.lc, x.shape[2])
        part[:, :self.length - start] = x[:, start:]
        return part


def _unchunk(x: torch.Tensor, length: int) -> torch.Tensor:
    """(K, G, lc, c) -> (G, length, c)."""
    k, groups, lc, c = x.shape
    return x.transpose(0, 1).reshape(groups, k * lc, c)[:, :length]


class _Tiles:
    """The (G, lc, n, d) buffers of one scan call, reused by every chunk (they stay in cache), and the
    cumulative-sum matrices. States are laid out (n, d): the long d_inner axis innermost vectorises the
    broadcast products, and y_t = C_t . h_t is a row-vector-times-matrix product."""

    def __init__(self, like: torch.Tensor, groups: int, lc: int, n: int, d: int):
        new = lambda *shape: like.new_empty(groups, *shape)  # noqa: E731
        self.P, self.X, self.H = new(lc, n, d), new(lc, n, d), new(lc, n, d)
        # row 0: the state entering the chunk, rows 1..lc: b_s / P_s; ext_lower @ rows = h + prefix sums
        self.ext = new(lc + 1, n * d)
        ones = torch.ones(lc, lc + 1, dtype=like.dtype, device=like.device)
        self.ext_lower = ones.tril(1).expand(groups, lc, lc + 1).contiguous()
        self.upper = ones[:, 1:].triu().expand(groups, lc, lc).contiguous()  # inclusive suffix sums


def _chunk_states(s, du, B, A, tiles: _Tiles) -> None:
    """States of one chunk, all tokens at once: H_t = exp(A S_t) h + sum_{s<=t} exp(A (S_t - S_s)) du_s B_s.

    s (G, l, d): in-chunk inclusive cumsum of dt; du (G, l, d) = dt * u; B (G, l, n); A (G, 1, n, d); the state
    entering the chunk h (G, n d) is row 0 of tiles.ext. With P_t = exp(A S_t) (the decay from the chunk start
    through t, in (0, 1]), H_t = P_t (h + sum_{s<=t} b_s / P_s): one exp, a prefix sum (a small matmul that also
    adds h) and elementwise products instead of l dependent steps. Leaves P in tiles.P and b = du B in tiles.X.
    """
    P, X, H = tiles.P, tiles.X, tiles.H
    groups, lc, n, d = H.shape
    torch.mul(s.unsqueeze(-2), A, out=P).exp_()
    torch.mul(du.unsqueeze(-2), B.unsqueeze(-1), out=X)
    rows = tiles.ext[:, 1:].view(groups, lc, n, d)
    if lc == 1:  # the plain recurrence (only for decays too fast to factorise, see stable_chunk_sums)
        torch.addcmul(X, P, tiles.ext[:, :1].view(groups, 1, n, d), out=H)
        return
    torch.div(X, P, out=rows)
    torch.bmm(tiles.ext_lower, tiles.ext, out=H.view(groups, lc, n * d))
    H.mul_(P)


class _ChunkedScan(torch.autograd.Function):
    """y_t = C_t . h_t, h_t = exp(dt_t A) h_{t-1} + du_t B_t (h_{-1} = 0), for G independent sequences.

    S (G, K, lc, d): the in-chunk cumulative sums of delta (no gradient; see `stable_chunk_sums`); delta, du
    (G, L, d); A (G, n, d) (negative); B, C (G, L, n) -> y (G, L, d). Chunks of lc tokens are processed one after
    the other, the state carried across the boundary; inside a chunk all tokens at once (`_chunk_states`).
    Forward keeps only the state entering each chunk (K x (G, n, d)); backward recomputes each chunk's states
    from it and runs the adjoint recurrence g_t = C_t grad_y_t + a_{t+1} g_{t+1} the same way from the end."""

    @staticmethod
    def forward(ctx, S, delta, du, A, B, C):
        groups, k_num, lc, d = S.shape
        n = A.shape[-2]
        chunk = _Chunk(lc, delta.shape[1])
        A4 = A.unsqueeze(1).contiguous()
        tiles = _Tiles(delta, groups, lc, n, d)
        carry = tiles.ext[:, 0]
        carry.zero_()
        y = delta.new_empty(k_num, groups, lc, d)
        save = any(ctx.needs_input_grad)
        states = delta.new_empty(k_num, groups, n * d) if save else None
        for k in range(k_num):
            if save:
                states[k].copy_(carry)
            _chunk_states(S[:, k], chunk(du, k), chunk(B, k), A4, tiles)
            torch.bmm(chunk(C, k).reshape(-1, 1, n), tiles.H.view(-1, n, d), out=y[k].view(-1, 1, d))
            carry.copy_(tiles.H[:, -1].view(groups, n * d))
        ctx.save_for_backward(S, delta, du, A, B, C, states)
        return _unchunk(y, delta.shape[1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        S, delta, du, A, B, C, states = ctx.saved_tensors
        groups, k_num, lc, d = S.shape
        length, n = delta.shape[1], A.shape[-2]
        chunk = _Chunk(lc, length)
        A4 = A.unsqueeze(1).contiguous()
        tiles = _Tiles(delta, groups, lc, n, d)
        P, X, H = tiles.P, tiles.X, tiles.H
        W = tiles.ext[:, 1:].view(groups, lc, n, d)  # free once the states are computed
        g_delta, g_du = delta.new_empty(k_num, groups, lc, d), delta.new_empty(k_num, groups, lc, d)
        g_B, g_C = B.new_empty(k_num, groups, lc, n), C.new_empty(k_num, groups, lc, n)
        g_A = torch.zeros_like(H)  # sum over chunks of dt_t g_t a_t h_{t-1}, reduced over t at the end
        carry = delta.new_zeros(groups, n, d)  # dL/dh at this chunk's end from later chunks: a_next g_next
        for k in range(k_num - 1, -1, -1):
            tiles.ext[:, 0].copy_(states[k])
            du_k, B_k, C_k, gy = chunk(du, k), chunk(B, k), chunk(C, k), chunk(grad_y, k)
            _chunk_states(S[:, k], du_k, B_k, A4, tiles)  # P, b (in X), states H
            torch.bmm(H.view(-1, n, d), gy.reshape(-1, d, 1), out=g_C[k].view(-1, n, 1))  # sum_d grad_y h
            H.sub_(X)  # a_t h_{t-1}
            # adjoint g_t = sum_{s>=t} (P_s / P_t) e_s + (P_last / P_t) carry, e_s = C_s grad_y_s
            torch.mul(gy.unsqueeze(-2), C_k.unsqueeze(-1), out=X)
            if lc == 1:
                X.add_(carry.unsqueeze(1))
                torch.mul(X[:, 0], P[:, 0], out=carry)
            else:
                X.mul_(P)
                X[:, -1].addcmul_(P[:, -1], carry)
                torch.bmm(tiles.upper, X.view(groups, lc, n * d), out=W.view(groups, lc, n * d))
                carry.copy_(W[:, 0])  # = P_0 g_0 = dL/dh entering this chunk
                torch.div(W, P, out=X)
            # X = g = dL/db_t, b_t = du_t B_t
            torch.bmm(B_k.reshape(-1, 1, n), X.view(-1, n, d), out=g_du[k].view(-1, 1, d))
            torch.bmm(X.view(-1, n, d), du_k.reshape(-1, d, 1), out=g_B[k].view(-1, n, 1))
            # dL/d(log a_t) = g_t a_t h_{t-1}, log a_t = dt_t A
            H.mul_(X)
            g_A.addcmul_(H, chunk(delta, k).unsqueeze(-2))
            H.mul_(A4)
            torch.sum(H, -2, out=g_delta[k])
        return (None, _unchunk(g_delta, length), _unchunk(g_du, length), g_A.sum(1), _unchunk(g_B, length),
                _unchunk(g_C, length))


def chunked_scan(delta, du, A, B, C, chunk: int | None = None) -> torch.Tensor:
    """The selective scan core, token-major per sequence: delta, du (G, L, d); A (G, n, d) (note: state-major);
    B, C (G, L, n) -> y (G, L, d), y_t = C_t . h_t with h_t = exp(delta_t A) h_{t-1} + du_t B_t. Differentiable
    (own backward). `chunk` caps the chunk length (tests); by default it is sized to the cache and shortened
    where needed for the factorised form to stay finite (`stable_chunk_sums`)."""
    groups, length, d = delta.shape
    n = A.shape[-2]
    lc = chunk_length(length, d, n, cap=int(chunk) if chunk else None)
    per_call = max(1, GROUP_TILE_ELEMENTS // (lc * d * n))  # sequences scanned together
    delta, du, A, B, C = (x.contiguous() for x in (delta, du, A, B, C))
    a_max = A.detach().abs().amax(-2)
    outs = []
    for g in range(0, groups, per_call):
        part = slice(g, g + per_call)
        with torch.no_grad():
            S, _ = stable_chunk_sums(delta[part], a_max[part], lc)
        outs.append(_ChunkedScan.apply(S, delta[part], du[part], A[part], B[part], C[part]))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def scan(u, dt, A, B, C, D=None, dt_bias=None, softplus=False, backend: str = "auto",
         reverse_from: int | None = None) -> torch.Tensor:
    """The selective scan token-major, with the work per token and channel around it:

        delta = softplus(dt + dt_bias) (or dt + dt_bias),  y_t = C_t . h_t + D u_t,
        h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t,

    u, dt (G, L, d); A (G, n, d); B, C (G, L, n); D, dt_bias (d,) or (G, d) or None -> y (G, L, d).
    Sequences g >= reverse_from (None: none) are scanned from their last token to the first.
    Runs the compiled CPU loop (`ditk.models._scan_cpu`, everything above in one pass) where it applies:
    backend "auto" or "compiled", CPU tensors of one float dtype, and a C++ compiler to build it with (else
    "auto" falls back to PyTorch; "compiled" raises). "torch" (and "mamba_ssm", which is dispatched before
    this point) uses PyTorch: these elementwise steps and `chunked_scan`. On CUDA, "auto" (when Triton is
    installed) and "triton" run the Triton kernel (`ditk.models._scan_triton`, the same single pass, with its
    backward); "triton" also runs on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, tests)."""
    if _use_triton(backend, u):
        from . import _scan_triton
        return _scan_triton.triton_scan(dt, u, A, B, C, dt_bias, D, softplus, reverse_from)
    if backend in ("auto", "compiled") and _scan_cpu.supports(u, dt, A, B, C):
        if _scan_cpu.library() is not None:
            return _scan_cpu.compiled_scan(dt, u, A, B, C, dt_bias, D, softplus, reverse_from)
        if backend == "compiled":
            raise ConfigError("scan backend 'compiled' could not build its CPU kernel "
                              f"({_cpu_kernels.error(_scan_cpu.NAME) or 'DITK_CPU_KERNELS=0'}): install a C++ "
                              "compiler (g++) or use scan_backend=auto or torch")
    if reverse_from is not None and reverse_from < u.shape[0]:  # flip those sequences in time, scan, flip back
        flip = lambda x: torch.cat([x[:reverse_from], x[reverse_from:].flip(1)])  # noqa: E731
        return flip(scan(flip(u), flip(dt), A, flip(B), flip(C), D, dt_bias, softplus, backend))
    delta = dt if dt_bias is None else dt + dt_bias.unsqueeze(-2)
    if softplus:
        delta = F.softplus(delta)
    y = chunked_scan(delta, delta * u, A, B, C)
    return y if D is None else torch.addcmul(y, u, D.unsqueeze(-2))


class SelectiveScan(nn.Module):
    """Holds no weights: `scan` as a module of its own, so that profilers and `benchmarks/bench_backbones.py`
    can attribute its cost (like `ditk.models.rwkv.BiWKV`)."""

    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.backend = backend

    def compiled(self, x: torch.Tensor) -> bool:
        """Whether `scan` will run the compiled CPU kernel for tensors like x (see `scan`)."""
        return self.backend in ("auto", "compiled") and _scan_cpu.supports(x) and _scan_cpu.library() is not None

    def forward(self, u, dt, A, B, C, D=None, dt_bias=None, softplus=False, reverse_from=None):
        return scan(u, dt, A, B, C, D, dt_bias, softplus, self.backend, reverse_from)


#################################################################################
#                                Selective scan                                 #
#################################################################################


@functools.lru_cache(maxsize=1)
def _mamba_ssm_scan():
    """The fused CUDA selective scan of `mamba_ssm` if it is installed (an optional extra), else None."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # not installed, or built for another torch/CUDA: use the PyTorch scan
        return None
    return selective_scan_fn


def kernels_available() -> bool:
    return torch.cuda.is_available() and _mamba_ssm_scan() is not None


def _use_triton(backend: str, x: torch.Tensor) -> bool:
    """Whether `scan` runs the Triton kernel: "triton" (which insists), or "auto" on CUDA with Triton. Triton is
    imported only then (importing it takes ~0.5 s)."""
    if backend != "triton" and not (backend == "auto" and x.is_cuda):
        return False
    from . import _scan_triton
    if backend == "triton":
        if not _scan_triton.usable(x):
            need = f"CUDA tensors (got {x.device.type})" if _scan_triton.available() else "the triton package"
            raise ConfigError(f"scan backend 'triton' needs {need}: use scan_backend=auto or torch")
        return True
    return _scan_triton.available()


def _use_kernel(backend: str, x: torch.Tensor) -> bool:
    if backend not in SCAN_BACKENDS:
        raise ConfigError(f"unknown scan backend '{backend}': use one of {', '.join(SCAN_BACKENDS)}")
    if backend in ("auto", "mamba_ssm") and x.is_cuda and _mamba_ssm_scan() is not None:
        return True
    if backend == "mamba_ssm":
        raise ConfigError("scan backend 'mamba_ssm' needs the mamba_ssm package and a CUDA device: "
                          "use 'auto' or 'torch'")
    return False


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, backend="auto",
                   chunk=None):
    """Mamba's selective scan with the signature of `mamba_ssm`'s `selective_scan_fn`.

    u, delta, z: (batch, d, L); A: (d, n) (negative real); B, C: (batch, n, L); D, delta_bias: (d,).
    Returns y (batch, d, L) in u's dtype; the recurrence runs in float32 (as the CUDA kernel does; float64 inputs
    stay float64).
    backend: "auto" (mamba_ssm's kernel on CUDA when installed, else the Triton kernel when Triton is; the
    compiled loop on CPU when a C++ compiler is there; else PyTorch), "torch", "compiled", "mamba_ssm" or
    "triton" (see `scan`).
    """
    if _use_kernel(backend, u):
        return _mamba_ssm_scan()(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    dtype = u.dtype
    f = torch.promote_types(dtype, torch.float32)  # float32, or float64 for float64 inputs
    u, delta = u.to(f).transpose(1, 2), delta.to(f).transpose(1, 2)  # (batch, L, d)
    A = A.to(f).t().expand(u.shape[0], A.shape[1], A.shape[0])
    B, C = B.to(f).transpose(1, 2), C.to(f).transpose(1, 2)
    D, delta_bias = (None if x is None else x.to(f) for x in (D, delta_bias))
    if chunk:  # the PyTorch form with a given chunk length (tests)
        if delta_bias is not None:
            delta = delta + delta_bias
        if delta_softplus:
            delta = F.softplus(delta)
        y = chunked_scan(delta, delta * u, A, B, C, chunk)
        y = y if D is None else y + D * u
    else:
        y = scan(u, delta, A, B, C, D, delta_bias, delta_softplus, backend)
    if z is not None:
        y = y * F.silu(z.to(f).transpose(1, 2))
    return y.transpose(1, 2).to(dtype)


#################################################################################
#                                  Mixer layer                                  #
#################################################################################


class Mamba(nn.Module):
    """The Mamba mixer: in_proj -> (x, z); x -> causal depthwise conv -> SiLU -> selective scan, gated by SiLU(z);
    out_proj. (N, L, D) -> (N, L, D).

    bidirectional=True is Vision Mamba's "v2" (DiS, Dimba): a second conv/x_proj/dt_proj/A/D set scans the
    reversed sequence with the same x and z, the two gated outputs are summed (divided by 2 if `divide_out`),
    and in_proj/out_proj are shared. Hook point `out_hook` sees the gated scan output (N, L, d_inner) before
    out_proj, like `Attention.out_hook`.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank: int | None = None,
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4, conv_bias: bool = True,
                 bias: bool = False, bidirectional: bool = False, divide_out: bool = False,
                 scan_backend: str = "auto"):
        super().__init__()
        if scan_backend not in SCAN_BACKENDS:
            raise ConfigError(f"unknown model.scan_backend '{scan_backend}': use one of {', '.join(SCAN_BACKENDS)}")
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if not dt_rank else int(dt_rank)
        self.bidirectional, self.divide_out, self.scan_backend = bidirectional, divide_out, scan_backend
        self._dt_range = (dt_min, dt_max, dt_init_floor)

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D = self._direction(conv_bias)
        if bidirectional:
            self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b = self._direction(conv_bias)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        self.out_hook = HookPoint()
        self.scan = SelectiveScan(scan_backend)

    def _direction(self, conv_bias: bool):
        """One scan direction's parameters, initialised as in mamba_ssm."""
        d, n, r = self.d_inner, self.d_state, self.dt_rank
        conv = nn.Conv1d(d, d, kernel_size=self.d_conv, groups=d, padding=self.d_conv - 1, bias=conv_bias)
        x_proj = nn.Linear(d, r + 2 * n, bias=False)
        dt_proj = nn.Linear(r, d, bias=True)
        dt_min, dt_max, floor = self._dt_range
        with torch.no_grad():
            std = r**-0.5  # keeps the variance of dt_proj's output at initialisation
            nn.init.uniform_(dt_proj.weight, -std, std)
            # dt = softplus(bias) log-uniform in [dt_min, dt_max]; bias = softplus^-1(dt) = dt + log(1 - exp(-dt)).
            dt = torch.exp(torch.rand(d) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        dt_proj.bias._no_reinit = True  # model-level inits that zero Linear biases must keep this one
        # S4D-real: A = -(1, 2, ..., n) for every channel, stored as log(-A) so A stays negative.
        A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(d, 1))
        D = nn.Parameter(torch.ones(d))
        return conv, x_proj, dt_proj, A_log, D

    def _directions(self):
        """(conv1d, x_proj, dt_proj, A_log, D) of each scan direction: forward, then reversed if bidirectional."""
        dirs = [(self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)]
        if self.bidirectional:
            dirs.append((self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b))
        return dirs

    def _ssm(self, x, z, conv, x_proj, dt_proj, A_log, D):
        """One direction through `selective_scan` (the mamba_ssm kernel path): x, z (N, d_inner, L)."""
        x = F.silu(causal_conv1d(x, conv.weight, conv.bias))
        dt, B, C = torch.split(x_proj(x.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = (dt @ dt_proj.weight.t()).transpose(1, 2)  # dt_proj's bias is added inside the scan (delta_bias)
        A = -torch.exp(A_log.to(torch.promote_types(A_log.dtype, torch.float32)))
        return selective_scan(x, dt, A, B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(), D, z=z,
                              delta_bias=dt_proj.bias, delta_softplus=True, backend=self.scan_backend)

    def _forward_kernel(self, hidden_states: torch.Tensor) -> torch.Tensor:
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (N, 2 d_inner, L)
        x, z = xz.chunk(2, dim=1)
        y = self._ssm(x, z, *self._directions()[0])
        if self.bidirectional:
            y = y + self._ssm(x.flip(-1), z.flip(-1), *self._directions()[1]).flip(-1)
            if self.divide_out:
                y = y / 2
        return self.out_proj(self.out_hook(y.transpose(1, 2)))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if _use_kernel(self.scan_backend, hidden_states):
            return self._forward_kernel(hidden_states)
        if self.scan.compiled(hidden_states):
            return self._forward_compiled(hidden_states)
        # PyTorch path: token-major (N, L, .) throughout, both directions stacked as one batch of 2N sequences
        # (the reversed one flipped in time) so that every step below is one call for both.
        n_seq, length, _ = hidden_states.shape
        d, n, r = self.d_inner, self.d_state, self.dt_rank
        dirs = self._directions()
        nd = len(dirs)
        x, z = self.in_proj(hidden_states).chunk(2, dim=-1)  # (N, L, d_inner) each
        conv_w = torch.stack([c.weight[:, 0] for c, *_ in dirs])  # (nd, d, k)
        conv_b = torch.stack([c.bias for c, *_ in dirs]) if dirs[0][0].bias is not None else None
        xs = x.unsqueeze(0) if nd == 1 else torch.stack([x, x.flip(1)])  # (nd, N, L, d)
        u = F.silu(causal_conv_tokens(xs, conv_w, conv_b))  # (nd, N, L, d)
        proj = torch.matmul(u.view(nd, -1, d), torch.stack([p.weight for _, p, *_ in dirs]).transpose(1, 2))
        dt, B, C = torch.split(proj, [r, n, n], dim=-1)  # (nd, N L, .)
        dt_w = torch.stack([p.weight for _, _, p, *_ in dirs]).transpose(1, 2)  # (nd, r, d)
        f = torch.promote_types(u.dtype, torch.float32)  # the scan runs in float32 (float64 stays float64)
        dt = torch.bmm(dt, dt_w).to(f).view(nd * n_seq, length, d)  # dt_proj's bias is added inside the scan

        def per_seq(x):  # (nd, ...) per direction -> (nd N, ...) per scanned sequence
            return x.to(f).unsqueeze(1).expand(nd, n_seq, *x.shape[1:]).reshape(nd * n_seq, *x.shape[1:])

        dt_b = per_seq(torch.stack([p.bias for _, _, p, *_ in dirs]))  # (nd N, d)
        D = per_seq(torch.stack([dd for *_, dd in dirs]))  # (nd N, d)
        A = per_seq(-torch.exp(torch.stack([a for *_, a, _ in dirs]).to(f)).transpose(1, 2))  # (nd N, n, d)
        uf = u.to(f).view(nd * n_seq, length, d)
        # y = scan + D u, delta = softplus(dt + dt_bias): one call
        y = self.scan(uf, dt, A, B.to(f).reshape(nd * n_seq, length, n), C.to(f).reshape(nd * n_seq, length, n),
                      D, dt_b, True).view(nd, n_seq, length, d)
        if nd == 2:
            y = y[0] + y[1].flip(1)
            if self.divide_out:
                y = y / 2
        else:
            y = y[0]
        y = (y * F.silu(z.to(f))).to(hidden_states.dtype)
        return self.out_proj(self.out_hook(y))

    def _forward_compiled(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`forward` with the compiled CPU kernels (float32/64 CPU tensors, `ditk.models._scan_cpu`): the
        reversed direction is computed on the unflipped sequence (anti-causal conv, scan from the end), so
        nothing is flipped, the scan runs in the input's dtype (no casts), and without gradients the kernels are
        called without autograd nodes. Same maths as the PyTorch path, in as few calls as possible: in small
        mixers (Dimba's tiny model: d_inner 128, d_state 4, 256 tokens) a PyTorch or ctypes call costs
        2-10 us, as much as a step's arithmetic."""
        n_seq, length, _ = hidden_states.shape
        d, n, r = self.d_inner, self.d_state, self.dt_rank
        dirs = self._directions()
        nd, groups = len(dirs), len(dirs) * n_seq
        x, z = self.in_proj(hidden_states).chunk(2, dim=-1)  # (N, L, d_inner) each, views with unit stride
        conv_w = torch.stack([c.weight for c, *_ in dirs]).view(nd, d, -1).transpose(1, 2)  # (nd, k, d)
        conv_b = None if self.conv1d.bias is None else torch.stack([c.bias for c, *_ in dirs])
        u = _scan_cpu.conv_silu(x, conv_w, conv_b)  # (nd, N, L, d): conv + SiLU of both directions
        proj = torch.matmul(u.view(nd, -1, d), torch.stack([p.weight for _, p, *_ in dirs]).transpose(1, 2))
        dt = torch.bmm(proj[..., :r], torch.stack([p.weight for _, _, p, *_ in dirs]).transpose(1, 2))
        B = proj[..., r:r + n].reshape(groups, length, n)  # views: (nd, N L, .) -> (nd N, L, .)
        C = proj[..., r + n:].reshape(groups, length, n)

        def per_seq(x):  # (nd, ...) per direction -> (nd N, ...) per scanned sequence
            return x if n_seq == 1 else x.repeat_interleave(n_seq, dim=0)

        A = per_seq(-torch.exp(torch.stack([a for *_, a, _ in dirs])).transpose(1, 2))  # (nd N, n, d)
        dt_b = per_seq(torch.stack([p.bias for _, _, p, *_ in dirs]))  # (nd N, d)
        D = per_seq(torch.stack([dd for *_, dd in dirs]))  # (nd N, d)
        # y = scan + D u, delta = softplus(dt + dt_bias): one compiled pass; sequences >= N scanned from the end
        y = self.scan(u.view(groups, length, d), dt.view(groups, length, d), A, B, C, D, dt_b, True,
                      reverse_from=n_seq).view(nd, n_seq, length, d)
        # (y_fwd + y_rev) (/ 2) * silu(z): one compiled pass
        y = _scan_cpu.gate(y, z, 0.5 if nd == 2 and self.divide_out else 1.0)
        return self.out_proj(self.out_hook(y))


def causal_conv_tokens(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`causal_conv1d` token-major and per group: x (G, N, L, d), weight (G, d, k), bias (G, d) or None ->
    (G, N, L, d), out_t = bias + sum_j w_j x_{t-k+1+j} (zero before the start)."""
    k, length = weight.shape[-1], x.shape[2]
    xp = F.pad(x, (0, 0, k - 1, 0))
    w = weight[:, None, None]  # (G, 1, 1, d, k)
    if bias is None:
        out = xp[:, :, :length] * w[..., 0]
    else:
        out = torch.addcmul(bias[:, None, None], xp[:, :, :length], w[..., 0])
    for j in range(1, k):
        out.addcmul_(xp[:, :, j:j + length], w[..., j])
    return out


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Depthwise causal convolution, x (N, d, L), weight (d, 1, k): out_t = bias + sum_j w_j x_{t-k+1+j}.

    Equal to the first L outputs of `nn.Conv1d(d, d, k, groups=d, padding=k-1)` (mamba_ssm's conv1d), written as
    k shifted multiply-adds: the depthwise convolution's backward is slow on CPUs and k is 4."""
    k, length = weight.shape[-1], x.shape[-1]
    xp = F.pad(x, (k - 1, 0))
    out = xp[..., :length] * weight[:, 0, 0, None]
    for j in range(1, k):
        out = torch.addcmul(out, xp[..., j:j + length], weight[:, 0, j, None])
    return out if bias is None else out + bias[:, None]


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability p in training, rescale by 1/(1-p)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p:g}"


class MambaBlock(nn.Module):
    """Vision-Mamba's pre-norm block, residual stream kept apart (as mamba_ssm's fused add+norm does):

        residual <- residual + drop_path(hidden)     (residual = hidden for the first block)
        hidden   <- mixer(RMSNorm(residual))

    forward(hidden, residual, skip=None) -> (hidden, residual). With `skip` (DiS's long skips), the incoming
    hidden is first replaced by skip_linear([hidden, skip]). The model's state after the block is
    residual + hidden.
    """

    def __init__(self, dim: int, mixer: nn.Module, drop_path: float = 0.0, skip: bool = False, norm_eps: float = 1e-5):
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm = nn.RMSNorm(dim, eps=norm_eps)
        self.mixer = mixer
        self.drop_path = DropPath(drop_path)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None = None, skip: torch.Tensor | None = None):
        if self.skip_linear is not None:
            if skip is None:
                raise ValueError("this block has a long skip connection: pass skip=")
            hidden = self.skip_linear(torch.cat([hidden, skip], dim=-1))
        residual = hidden if residual is None else residual + self.drop_path(hidden)
        return self.mixer(self.norm(residual)), residual


def rescale_prenorm_residual_(model: nn.Module, n_layer: int, names=("out_proj.weight",)) -> None:
    """mamba_ssm's `_init_weights`: zero every Linear bias (but dt_proj's), N(0, 0.02) embeddings, and re-draw the
    residual-branch output weights (`names`, module-relative) kaiming-uniform divided by sqrt(n_layer) (GPT-2)."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.bias is not None and not getattr(module.bias, "_no_reinit", False):
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        for name, p in module.named_parameters(recurse=True):
            if name in names:
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
                with torch.no_grad():
                    p /= math.sqrt(n_layer)


def mamba_fields(sd, prefix: str) -> dict:
    """Config fields (d_state, expand, d_conv, dt_rank) that the Mamba mixer under `prefix` (e.g.
    "blocks.0.mixer.") reveals in a state dict; {} if it is not there. For load errors that name the fix."""
    fields = {}
    if (a_log := sd.get(prefix + "A_log")) is not None:  # (d_inner, d_state)
        fields["d_state"] = int(a_log.shape[1])
    if (w := sd.get(prefix + "in_proj.weight")) is not None and w.shape[1]:  # (2 d_inner, d_model)
        fields["expand"] = int(w.shape[0]) // (2 * int(w.shape[1]))
    if (conv := sd.get(prefix + "conv1d.weight")) is not None:  # (d_inner, 1, d_conv)
        fields["d_conv"] = int(conv.shape[-1])
    if (dt := sd.get(prefix + "dt_proj.weight")) is not None:  # (d_inner, dt_rank)
        fields["dt_rank"] = int(dt.shape[1])
    return fields
