"""The Bi-WKV forward as one compiled CPU loop (inference), used by `ditk.models.rwkv.BiWKV` under no_grad.

The same algorithm as the Triton kernel (`_rwkv_triton.py`) and the official CUDA one: per sample, walk the
sequence left to right keeping RWKV's running-maximum state (a, b, o) = (sum e^{...-o} v, sum e^{...-o}, o)
of the tokens before t and store it (the maximum over k_i + i w rather than a maximum decayed step by step,
which drifts in float32: 1e-4 off after 256 tokens with large keys); walk right to left carrying the state
of the tokens after t, merge it with the stored one and the bonus e^{u + k_t} at their common maximum, and
write y_t. Every exponent is
taken relative to a running maximum, so nothing overflows for any keys or decays. The channels are the
inner, vectorised loop; O(T C) work in two passes, against ~45 PyTorch passes for the chunked form.
Forward only: training differentiates `ditk.models.rwkv.bi_wkv` (exact autograd).
"""

from __future__ import annotations

import ctypes

import torch

from . import _cpu_kernels

NAME = "bi_wkv"

SOURCE = _cpu_kernels.EXP_SOURCE + r"""
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

namespace {

template <typename T>
inline T max_(T x, T y) { return x > y ? x : y; }  // by value (std::max's references defeat vectorisation)
template <typename T>
inline T lowest();
template <>
inline float lowest<float>() { return -1e38f; }
template <>
inline double lowest<double>() { return -1e300; }

// One sample: w, u (C,); k, v, y (T, C); sa, sb, so (T, C) scratch for the left-to-right states.
// Token t's weight for source i < t is e^{-(t-1-i) w + k_i} = e^{-(t-1) w} e^{k_i + i w}: the running maximum
// is kept over e_i = k_i + i w (each computed once, so it does not drift as a maximum decayed step by step
// would in float32), and the shift -(t-1) w is added when the states are merged; mirrored for i > t with
// f_i = k_i - i w and e^{(t+1) w}.
template <typename T>
void bi_wkv(int64_t L, int64_t C, const T* __restrict w, const T* __restrict u, const T* __restrict k,
            const T* __restrict v, T* __restrict y, T* __restrict sa, T* __restrict sb, T* __restrict so) {
    std::vector<T> state(3 * C);
    T *a = state.data(), *b = a + C, *o = b + C;
    std::fill(a, a + 2 * C, T(0));
    std::fill(o, o + C, lowest<T>());
    for (int64_t t = 0; t < L; ++t) {  // sources i < t
        const T *kt = k + t * C, *vt = v + t * C;
        T *at = sa + t * C, *bt = sb + t * C, *ot = so + t * C;
        const T pos = T(t);
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
            at[c] = a[c];
            bt[c] = b[c];
            ot[c] = o[c];
            T e = kt[c] + pos * w[c];
            T no = max_(o[c], e);
            T x = exp_f(-std::fabs(o[c] - e));  // one of e^(o - no), e^(e - no) is 1: one exp, not two
            T e1 = o[c] >= e ? T(1) : x, e2 = o[c] >= e ? x : T(1);
            a[c] = e1 * a[c] + e2 * vt[c];
            b[c] = e1 * b[c] + e2;
            o[c] = no;
        }
    }
    std::fill(a, a + 2 * C, T(0));
    std::fill(o, o + C, lowest<T>());
    for (int64_t t = L - 1; t >= 0; --t) {  // sources i > t, merged with the stored left state and the bonus
        const T *kt = k + t * C, *vt = v + t * C, *at = sa + t * C, *bt = sb + t * C, *ot = so + t * C;
        T* yt = y + t * C;
        const T pos = T(t);
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
            T left = ot[c] - (pos - 1) * w[c], right = o[c] + (pos + 1) * w[c], s = u[c] + kt[c];
            // e^(left - m), e^(right - m), e^(s - m) at m = max of the three, with two exps: the larger of
            // left and right (l2) against s, and the smaller against the larger
            T l2 = max_(left, right), r = exp_f(-std::fabs(left - right)), q = exp_f(-std::fabs(l2 - s));
            T top = l2 >= s ? T(1) : q, e3 = l2 >= s ? q : T(1);
            T e1 = left >= right ? top : top * r, e2 = left >= right ? top * r : top;
            yt[c] = (e1 * at[c] + e2 * a[c] + e3 * vt[c]) / (e1 * bt[c] + e2 * b[c] + e3);
            T f = kt[c] - pos * w[c];
            T no = max_(o[c], f);
            T x = exp_f(-std::fabs(o[c] - f));
            T f1 = o[c] >= f ? T(1) : x, f2 = o[c] >= f ? x : T(1);
            a[c] = f1 * a[c] + f2 * vt[c];
            b[c] = f1 * b[c] + f2;
            o[c] = no;
        }
    }
}

template <typename T>
void bi_wkv_all(int64_t B, int64_t L, int64_t C, const T* w, const T* u, const T* k, const T* v, T* y) {
    std::unique_ptr<T[]> scratch(new T[3 * L * C]);  // written before it is read: not zeroed
    for (int64_t q = 0; q < B; ++q)
        bi_wkv<T>(L, C, w, u, k + q * L * C, v + q * L * C, y + q * L * C, scratch.get(), scratch.get() + L * C,
                  scratch.get() + 2 * L * C);
}

}  // namespace

// w, u (C,); k, v, y (B, T, C), contiguous.
extern "C" {
void bi_wkv_f32(int64_t B, int64_t L, int64_t C, const float* w, const float* u, const float* k, const float* v,
                float* y) {
    bi_wkv_all<float>(B, L, C, w, u, k, v, y);
}
void bi_wkv_f64(int64_t B, int64_t L, int64_t C, const double* w, const double* u, const double* k,
                const double* v, double* y) {
    bi_wkv_all<double>(B, L, C, w, u, k, v, y);
}
}
"""

_I64 = ctypes.c_int64


def library():
    """The compiled Bi-WKV library, or None (no compiler, disabled, or the build failed)."""
    return _cpu_kernels.load(NAME, SOURCE)


def bi_wkv_cpu(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Same contract as `ditk.models.rwkv.bi_wkv` (w, u (C,); k, v (B, T, C); computed in at least float32,
    returned in v's dtype), forward only: CPU tensors, no autograd."""
    bsz, t_len, chans = k.shape
    out_dtype = v.dtype
    dtype = torch.promote_types(k.dtype, torch.float32)
    w, u, k, v = (x.detach().to(dtype).contiguous() for x in (w, u, k, v))
    y = torch.empty_like(v)
    p = _cpu_kernels.ptr
    getattr(library(), "bi_wkv_f64" if dtype == torch.float64 else "bi_wkv_f32")(
        _I64(bsz), _I64(t_len), _I64(chans), p(w), p(u), p(k), p(v), p(y))
    return y.to(out_dtype)
