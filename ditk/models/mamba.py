"""Mamba (selective state space) layers in plain PyTorch, for DiS and Dimba.

The selective scan (Gu & Dao 2023, Alg. 2) runs, per channel d and state n,

    h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t,      y_t = C_t . h_t + D u_t,      out_t = y_t * silu(z_t)

with dt_t = softplus(dt_t + dt_bias). It is a first-order linear recurrence h_t = a_t h_{t-1} + b_t, which
`linear_scan` solves chunk-parallel: all chunks of ~sqrt(L) tokens are scanned at once, the chunk boundary
states are carried, and the chunks are finished at once, so O(sqrt(L)) vectorised steps instead of L (and,
unlike a Hillis-Steele scan, O(L) work, which is what counts on a CPU). Its backward pass is the same
recurrence run from the end, so `linear_scan` and the selective scan are custom autograd functions that keep
only the decays and the states for backward (about the memory of the sequential loop).

On CUDA, when the optional `mamba_ssm` package is installed, `selective_scan` calls its fused kernel
instead (`scan_backend="auto"`); it is never required. `Mamba` is the mixer layer: its parameter names and
shapes are those of `mamba_ssm.modules.mamba_simple.Mamba` and of transformers' `MambaMixer`, and the
bidirectional variant adds Vision Mamba's "v2" backward branch (`conv1d_b`, `x_proj_b`, `dt_proj_b`,
`A_b_log`, `D_b`) as DiS and Dimba use it.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .layers import HookPoint

SCAN_BACKENDS = ("auto", "torch", "mamba_ssm")


#################################################################################
#                       Linear recurrence h_t = a_t h_{t-1} + b_t                #
#################################################################################


def _scan(a: torch.Tensor, b: torch.Tensor, reverse: bool = False, initial: torch.Tensor | None = None,
          out: torch.Tensor | None = None) -> torch.Tensor:
    """All states of h_t = a_t h_{t-1} + b_t along dim 0 (reverse=True: h_t = a_t h_{t+1} + b_t, from the end),
    starting from `initial` (zeros if None). No autograd.

    Chunked scan, chunk length T = isqrt(L): (1) every chunk is scanned from a zero state, all chunks at once,
    keeping only its final state and total decay; (2) the state entering each chunk is carried chunk by chunk;
    (3) every chunk is scanned again from its entering state, all chunks at once, writing the states. That is
    about 2T + L/T vectorised steps and three passes over the data (the sequential loop: L steps, one pass).
    """
    length = a.shape[0]
    h = torch.empty_like(b) if out is None else out
    if length == 0:
        return h
    t_len = max(1, math.isqrt(length))
    k_num = length // t_len
    rest = length - k_num * t_len
    main = slice(rest, length) if reverse else slice(0, k_num * t_len)
    tail = range(rest - 1, -1, -1) if reverse else range(k_num * t_len, length)
    am, bm, hm = (x[main].view(k_num, t_len, *x.shape[1:]) for x in (a, b, h))
    order = range(t_len - 1, -1, -1) if reverse else range(t_len)

    # (1) chunk summaries: final state from zero, and the product of the decays
    state, decay = bm[:, order[0]].clone(), am[:, order[0]].clone()
    for t in order[1:]:
        state = torch.addcmul(bm[:, t], am[:, t], state)
        decay.mul_(am[:, t])
    # (2) the state entering each chunk
    carry = torch.empty_like(state)
    c = torch.zeros_like(state[0]) if initial is None else initial
    for k in (range(k_num - 1, -1, -1) if reverse else range(k_num)):
        carry[k] = c
        c = torch.addcmul(state[k], decay[k], c)
    # (3) all states, every chunk from its entering state
    prev = carry
    for t in order:
        torch.addcmul(bm[:, t], am[:, t], prev, out=hm[:, t])
        prev = hm[:, t]
    # the last L mod T steps continue from the state after the chunks
    for t in tail:
        torch.addcmul(b[t], a[t], c, out=h[t])
        c = h[t]
    return h


class _LinearScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        with torch.no_grad():
            h = _scan(a, b)
        ctx.save_for_backward(a, h)
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_h):
        a, h = ctx.saved_tensors
        grad_h = grad_h.contiguous()
        # dL/db_t = g_t, where g_t = grad_h_t + a_{t+1} g_{t+1}: the same recurrence run from the end.
        g = torch.empty_like(grad_h)
        g[-1] = grad_h[-1]
        _scan(a[1:], grad_h[:-1], reverse=True, initial=g[-1], out=g[:-1])
        grad_a = None
        if ctx.needs_input_grad[0]:  # dL/da_t = g_t h_{t-1}, h_{-1} = 0
            grad_a = torch.empty_like(g)
            grad_a[0] = 0
            torch.mul(g[1:], h[:-1], out=grad_a[1:])
        return grad_a, g if ctx.needs_input_grad[1] else None


def linear_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """All states h_t = a_t * h_{t-1} + b_t (h_{-1} = 0) along dim 0 of a, b (L, ...); differentiable.

    Time is the leading dimension so that each step reads and writes contiguous memory."""
    a, b = torch.broadcast_tensors(a, b)
    return _LinearScan.apply(a.contiguous(), b.contiguous())


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


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, backend="auto"):
    """Mamba's selective scan with the signature of `mamba_ssm`'s `selective_scan_fn`.

    u, delta, z: (batch, d, L); A: (d, n) (negative real); B, C: (batch, n, L); D, delta_bias: (d,).
    Returns y (batch, d, L) in u's dtype; the recurrence runs in float32 (as the CUDA kernel does; float64 inputs
    stay float64).
    backend: "auto" (mamba_ssm's kernel on CUDA when installed, else PyTorch), "torch" or "mamba_ssm".
    """
    if backend not in SCAN_BACKENDS:
        raise ConfigError(f"unknown scan backend '{backend}': use one of {', '.join(SCAN_BACKENDS)}")
    if backend != "torch" and u.is_cuda:
        kernel = _mamba_ssm_scan()
        if kernel is not None:
            return kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if backend == "mamba_ssm":
        raise ConfigError("scan backend 'mamba_ssm' needs the mamba_ssm package and a CUDA device: "
                          "use 'auto' or 'torch'")
    dtype = u.dtype
    f = torch.promote_types(dtype, torch.float32)  # float32, or float64 for float64 inputs
    u, delta = u.to(f), delta.to(f)
    # Time-major (L, batch, ...) so that the scan's steps touch contiguous memory.
    delta = delta.permute(2, 0, 1).contiguous()
    if delta_bias is not None:
        delta = delta + delta_bias.to(f)
    if delta_softplus:
        delta = F.softplus(delta)
    y = _SelectiveScan.apply(delta, u.permute(2, 0, 1), A.to(f), B.to(f).permute(2, 0, 1),
                             C.to(f).permute(2, 0, 1)).permute(1, 2, 0)
    if D is not None:
        y = y + D.to(f)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(f))
    return y.to(dtype)


class _SelectiveScan(torch.autograd.Function):
    """y_t = C_t . h_t with h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t, time-major: delta, u (L, batch, d); A (d, n);
    B, C (L, batch, n) -> y (L, batch, d). Written out (rather than left to autograd) so that backward reuses one
    (L, batch, d, n) buffer and keeps only the decays and states: the memory of the fused kernel's reference."""

    @staticmethod
    def forward(ctx, delta, u, A, B, C):
        delta, u, B, C = delta.contiguous(), u.contiguous(), B.contiguous(), C.contiguous()
        decay = (delta.unsqueeze(-1) * A).exp_()  # zero-order hold: exp(dt A), (L, batch, d, n)
        du = delta * u
        h = du.unsqueeze(-1) * B.unsqueeze(2)  # Euler: dt u B, turned into the states in place
        _scan(decay, h, out=h)
        ctx.save_for_backward(delta, u, A, B, C, decay, h)
        return _bmm(h, C.unsqueeze(-1)).squeeze(-1)  # sum over n of h C

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        delta, u, A, B, C, decay, h = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        grad_C = _bmm(grad_y.unsqueeze(-2), h).squeeze(-2)  # sum over d of grad_y h (row vector: reads h in order)
        g = grad_y.unsqueeze(-1) * C.unsqueeze(2)  # dL/dh, then in place dL/d(drive): g_t += a_{t+1} g_{t+1}
        _scan(decay[1:], g[:-1], reverse=True, initial=g[-1], out=g[:-1])
        du = delta * u
        grad_du = _bmm(g, B.unsqueeze(-1)).squeeze(-1)
        grad_B = _bmm(du.unsqueeze(-2), g).squeeze(-2)
        # dL/d(dt A) = g_t h_{t-1} exp(dt_t A), in the same buffer (h_{-1} = 0)
        q = g
        q[1:].mul_(h[:-1]).mul_(decay[1:])
        q[0].zero_()
        grad_delta = grad_du * u + (q * A).sum(-1)
        grad_A = (q * delta.unsqueeze(-1)).sum((0, 1))
        return grad_delta, grad_du * delta, grad_A, grad_B, grad_C


def _bmm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Batched matmul over the leading (L, batch) dims without copying x: (L, b, i, j) @ (L, b, j, k)."""
    lead = x.shape[:2]
    out = torch.bmm(x.flatten(0, 1), y.flatten(0, 1))
    return out.view(*lead, *out.shape[1:])


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

    def _ssm(self, x, z, conv, x_proj, dt_proj, A_log, D):
        """x, z: (N, d_inner, L) -> gated scan output (N, d_inner, L)."""
        x = F.silu(causal_conv1d(x, conv.weight, conv.bias))
        dt, B, C = torch.split(x_proj(x.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = (dt @ dt_proj.weight.t()).transpose(1, 2)  # dt_proj's bias is added inside the scan (delta_bias)
        A = -torch.exp(A_log.to(torch.promote_types(A_log.dtype, torch.float32)))
        return selective_scan(x, dt, A, B.transpose(1, 2), C.transpose(1, 2), D, z=z,
                              delta_bias=dt_proj.bias, delta_softplus=True, backend=self.scan_backend)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (N, 2 d_inner, L)
        x, z = xz.chunk(2, dim=1)
        y = self._ssm(x, z, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)
        if self.bidirectional:
            y_b = self._ssm(x.flip(-1), z.flip(-1), self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log,
                            self.D_b)
            y = y + y_b.flip(-1)
            if self.divide_out:
                y = y / 2
        y = self.out_hook(y.transpose(1, 2))
        return self.out_proj(y)


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
