"""The selective scan as one compiled CPU loop (forward and backward), used by `ditk.models.mamba.scan`.

    delta_t = softplus(dt_t + bias),  h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t,  y_t = C_t . h_t + D u_t
                                                                               (per channel d, state n)

The PyTorch chunked form needs ~7 full passes over the (T, d_state, d_inner) elements (decay exponent, exp,
du*B, divide, prefix sum, multiply, contraction). Here the recurrence runs token by token as Algorithm 2 of
the Mamba paper writes it, for a block of 64 channels at a time: the block's state (d_state x 64 values) and
decays stay in L1, and per element there is one exp and three multiply-adds, vectorised over the channels.
Being the plain recurrence, it is exact for any decay (no factorised form that could overflow). The work per
token and channel (softplus, delta*u, D*u) is done in the same pass; sequences can be scanned from their
end (the reversed branch of a bidirectional mixer, without flipped copies); `ConvSilu` is the mixer's
depthwise conv + SiLU for both directions (causal and anti-causal), and `Gate` its output gate (sum of the
directions, optional 1/2, SiLU(z)), each with its backward. `conv_silu`, `compiled_scan` and `gate` call the
kernels without an autograd node when no gradient is needed: in small mixers (Dimba's tiny model) the
Python and ctypes overhead of each call is as large as its arithmetic.

Backward: the forward keeps the state entering every chunk of CHUNK tokens (T/CHUNK states). For each chunk, from
the last, the backward recomputes the chunk's states and decays into a small buffer and runs the adjoint
recurrence g_t = C_t grad_y_t + a_{t+1} g_{t+1} back through it, accumulating
    dL/ddu_t = sum_n g_t B_t,   dL/dB_t = sum_d g_t du_t,   dL/dC_t = sum_d grad_y_t h_t,
    dL/d(delta_t A) = g_t a_t h_{t-1}  ->  dL/ddelta_t = sum_n (.) A + dL/ddu_t u_t,   dL/dA = sum_t (.) delta_t,
and through the softplus (dL/ddt = dL/ddelta sigmoid(dt + bias)), D and bias.
float32 uses a vectorisable exp (Cody-Waite reduction, degree-7 Taylor: ~1e-7 relative); float64 the C
library's exp (tests compare it with a float64 loop to 1e-10).
"""

from __future__ import annotations

import ctypes

import torch

from . import _cpu_kernels

NAME = "selective_scan"
CHUNK = 64  # tokens between saved states (backward recomputes one chunk at a time)

SOURCE = _cpu_kernels.EXP_SOURCE + r"""
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t DB = 64;  // channels per block: the block's state and decays stay in L1

// softplus(x) as torch computes it (x above 20 passes through) and its derivative sigmoid(x), vectorisable:
// log(1 + e) with e = e^-|x| in (0, 1] is 2 atanh(s), s = e / (2 + e) <= 1/3, by its series to s^15
// (remainder < 1e-9).
inline float softplus_f(float x, float& sig) {
    float e = exp_f(-std::fabs(x));
    float s = e / (2.0f + e), s2 = s * s;
    float l = 2.0f * s * (1.0f + s2 * (1.0f / 3 + s2 * (1.0f / 5 + s2 * (1.0f / 7 + s2 * (1.0f / 9 + s2 * (1.0f / 11
              + s2 * (1.0f / 13 + s2 * (1.0f / 15))))))));
    float inv = 1.0f / (1.0f + e);
    sig = x >= 0.0f ? inv : e * inv;
    return x > 20.0f ? x : (x > 0.0f ? x : 0.0f) + l;
}
inline double softplus_f(double x, double& sig) {
    sig = 1.0 / (1.0 + std::exp(-x));
    return x > 20.0 ? x : std::log1p(std::exp(x));
}

// delta = softplus(dt + bias) (or dt + bias) and its derivative for one token's channel block.
template <typename T>
inline void token_delta(const T* __restrict dt, const T* __restrict bias, int softplus, int64_t w,
                        T* __restrict delta, T* __restrict slope) {
    for (int64_t j = 0; j < w; ++j) delta[j] = dt[j] + (bias ? bias[j] : T(0));
    if (softplus) {
#pragma omp simd
        for (int64_t j = 0; j < w; ++j) {
            T sig;
            delta[j] = softplus_f(delta[j], sig);
            slope[j] = sig;
        }
    } else {
        for (int64_t j = 0; j < w; ++j) slope[j] = 1;
    }
}

struct Args {  // one sequence's tensors, offset to the channel block; sizes shared by all
    int64_t L, d, n, K, w;
    int softplus, reverse;  // reverse: scan from the last token to the first
    const void *dt, *bias, *u, *A, *B, *C, *D;
};

// y_t = C_t . h_t + D u_t for one channel block of width W (W = DB, or 0: the last, narrower block) of one
// sequence, with h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t; the state entering every K-th token is saved.
template <typename T, int64_t W>
void forward_block(const Args& a, T* __restrict y, T* __restrict states, T* __restrict h) {
    const int64_t L = a.L, d = a.d, n = a.n, K = a.K, width = W > 0 ? W : a.w;
    const T *dt = (const T*)a.dt, *bias = (const T*)a.bias, *u = (const T*)a.u, *A = (const T*)a.A;
    const T *B = (const T*)a.B, *C = (const T*)a.C, *D = (const T*)a.D;
    for (int64_t step = 0; step < L; ++step) {
        const int64_t t = a.reverse ? L - 1 - step : step;
        if (states && step % K == 0)
            for (int64_t i = 0; i < n; ++i)
                std::memcpy(states + (step / K) * n * d + i * d, h + i * DB, sizeof(T) * width);
        T delta[DB], slope[DB], du[DB], acc[DB];
        const T* __restrict ut = u + t * d;
        token_delta<T>(dt + t * d, bias, a.softplus, width, delta, slope);
        for (int64_t j = 0; j < width; ++j) {
            du[j] = delta[j] * ut[j];
            acc[j] = D ? D[j] * ut[j] : T(0);
        }
        for (int64_t i = 0; i < n; ++i) {
            const T b = B[t * n + i], c = C[t * n + i];
            const T* __restrict ai = A + i * d;
            T* __restrict hi = h + i * DB;
#pragma omp simd
            for (int64_t j = 0; j < width; ++j) {
                T hv = exp_f(delta[j] * ai[j]) * hi[j] + du[j] * b;
                hi[j] = hv;
                acc[j] += c * hv;
            }
        }
        std::memcpy(y + t * d, acc, sizeof(T) * width);
    }
}

template <typename T>
struct Grads {  // one sequence's gradient outputs, offset to the channel block
    T *dt, *u, *A, *B, *C, *bias, *D;
};

// Gradients of one channel block of one sequence, chunk by chunk from the end: recompute the chunk's states
// and decays from the saved state, then run the adjoint g_t = C_t gy_t + a_{t+1} g_{t+1} back through it.
// g.B, g.C (L, n) must be zero on entry (summed over channel blocks); the rest is written.
template <typename T>
void backward_block(const Args& a, const T* __restrict states, const T* __restrict gy, const Grads<T>& g,
                    T* __restrict H, T* __restrict Ad, T* __restrict gh, T* __restrict gA) {
    const int64_t L = a.L, d = a.d, n = a.n, K = a.K, w = a.w, nd = n * DB;
    const T *dt = (const T*)a.dt, *bias = (const T*)a.bias, *u = (const T*)a.u, *A = (const T*)a.A;
    const T *B = (const T*)a.B, *C = (const T*)a.C, *D = (const T*)a.D;
    std::fill(gh, gh + nd, T(0));
    std::fill(gA, gA + nd, T(0));
    T g_bias[DB] = {}, g_D[DB] = {};
    const int64_t chunks = (L + K - 1) / K;
    for (int64_t c = chunks - 1; c >= 0; --c) {
        const int64_t t0 = c * K, t1 = std::min(t0 + K, L);  // steps (tokens, or reversed tokens)
        for (int64_t i = 0; i < n; ++i) std::memcpy(H + i * DB, states + (c * n + i) * d, sizeof(T) * w);
        for (int64_t step = t0; step < t1; ++step) {  // H[s + 1] = state after step s = step - t0, Ad[s] its decay
            const int64_t s = step - t0, t = a.reverse ? L - 1 - step : step;
            T delta[DB], slope[DB], du[DB];
            const T* __restrict ut = u + t * d;
            token_delta<T>(dt + t * d, bias, a.softplus, w, delta, slope);
            for (int64_t j = 0; j < w; ++j) du[j] = delta[j] * ut[j];
            for (int64_t i = 0; i < n; ++i) {
                const T b = B[t * n + i];
                const T* __restrict ai = A + i * d;
                const T* __restrict hp = H + s * nd + i * DB;
                T* __restrict hn = H + (s + 1) * nd + i * DB;
                T* __restrict as = Ad + s * nd + i * DB;
#pragma omp simd
                for (int64_t j = 0; j < w; ++j) {
                    T av = exp_f(delta[j] * ai[j]);
                    as[j] = av;
                    hn[j] = av * hp[j] + du[j] * b;
                }
            }
        }
        for (int64_t step = t1 - 1; step >= t0; --step) {
            const int64_t s = step - t0, t = a.reverse ? L - 1 - step : step;
            T delta[DB], slope[DB], du[DB], g_delta[DB] = {}, g_du[DB] = {};
            const T* __restrict ut = u + t * d;
            const T* __restrict gyt = gy + t * d;
            token_delta<T>(dt + t * d, bias, a.softplus, w, delta, slope);
            for (int64_t j = 0; j < w; ++j) du[j] = delta[j] * ut[j];
            for (int64_t i = 0; i < n; ++i) {
                const T b = B[t * n + i], cc = C[t * n + i];
                const T* __restrict ai = A + i * d;
                const T* __restrict hp = H + s * nd + i * DB;
                const T* __restrict hc = H + (s + 1) * nd + i * DB;
                const T* __restrict as = Ad + s * nd + i * DB;
                T* __restrict gi = gh + i * DB;
                T* __restrict gai = gA + i * DB;
                T sum_b = 0, sum_c = 0;
#pragma omp simd reduction(+ : sum_b, sum_c)
                for (int64_t j = 0; j < w; ++j) {
                    sum_c += gyt[j] * hc[j];
                    T gv = gi[j] + cc * gyt[j];  // dL/dh_t
                    g_du[j] += gv * b;
                    sum_b += gv * du[j];
                    T gl = gv * as[j] * hp[j];  // dL/d(delta_t A)
                    g_delta[j] += gl * ai[j];
                    gai[j] += gl * delta[j];
                    gi[j] = gv * as[j];  // carried to h_{t-1}
                }
                g.B[t * n + i] += sum_b;
                g.C[t * n + i] += sum_c;
            }
            T* __restrict gdt = g.dt + t * d;
            T* __restrict gu = g.u + t * d;
            for (int64_t j = 0; j < w; ++j) {
                T gx = (g_delta[j] + g_du[j] * ut[j]) * slope[j];  // du = delta u; delta = softplus(dt + bias)
                gdt[j] = gx;
                g_bias[j] += gx;
                gu[j] = g_du[j] * delta[j] + (D ? gyt[j] * D[j] : T(0));
                g_D[j] += gyt[j] * ut[j];
            }
        }
    }
    for (int64_t i = 0; i < n; ++i) std::memcpy(g.A + i * d, gA + i * DB, sizeof(T) * w);
    std::memcpy(g.bias, g_bias, sizeof(T) * w);
    std::memcpy(g.D, g_D, sizeof(T) * w);
}

// Offsets of sequence q's tensors and of channel block d0 (bias and D are per sequence (G, d), or null).
template <typename T>
Args at(const Args& base, int64_t q, int64_t d0) {
    const int64_t L = base.L, d = base.d, n = base.n;
    Args a = base;
    a.w = std::min(DB, d - d0);
    a.dt = (const T*)base.dt + q * L * d + d0;
    a.u = (const T*)base.u + q * L * d + d0;
    a.A = (const T*)base.A + q * n * d + d0;
    a.B = (const T*)base.B + q * L * n;
    a.C = (const T*)base.C + q * L * n;
    a.bias = base.bias ? (const T*)base.bias + q * d + d0 : nullptr;
    a.D = base.D ? (const T*)base.D + q * d + d0 : nullptr;
    a.reverse = q >= base.reverse;  // base.reverse: the first sequence scanned in reverse
    return a;
}

#if defined(__AVX512F__) && defined(__AVX512DQ__)
// float32 forward with AVX-512 intrinsics, for d_state 4, 8 or 16 (DiS, Dimba): a block of 16 channels (one
// vector; the last block masked) keeps its whole state, d_state vectors, in registers for the whole sequence,
// so per token and state there is no load or store of the state, only the recurrence:
//     a = 2^(delta A log2 e) (one rounding, a degree-5 polynomial on [-1/2, 1/2] and vscalefps),
//     h = a h + (delta u) B_t,   y += C_t h
// = 12 vector instructions per 16 elements. 2^f's polynomial (minimax fit, relative weight) is within 2e-7 of
// 2^f in float32 arithmetic; scalef(p, k) = p 2^k is exact and underflows to 0 / overflows to inf like e^x.
#include <immintrin.h>

constexpr float LOG2E = 1.44269504088896341f;
constexpr int64_t TOKENS = 32;  // tokens per chunk of `forward_avx512` (its row buffers: 3 x 32 x d floats)

// 2^f for f in [0, 1): degree-5 polynomial (minimax for the relative error), within 1.6e-7 of 2^f in float32.
inline __m512 exp2_poly(__m512 f) {
    __m512 p = _mm512_set1_ps(0.0018784016137942672f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.008987345732748508f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.05582799017429352f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24015305936336517f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931531429290771f));
    return _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.9999999403953552f));
}

// 2^x = 2^(x - floor x) 2^floor(x): vreduceps gives x - floor(x) exactly, vscalefps multiplies by 2^floor(x)
// (exactly; 0 below float32's range, inf above). 8 instructions for 16 values.
inline __m512 exp2_v(__m512 x) {
    return _mm512_scalef_ps(exp2_poly(_mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC)), x);
}

inline __m512 exp_v(__m512 x) {  // e^x for finite x
    return exp2_v(_mm512_mul_ps(x, _mm512_set1_ps(LOG2E)));
}

// softplus(x) as torch computes it (x above 20 passes through): max(x, 0) + log(1 + e), e = e^-|x| in (0, 1],
// log(1 + e) = 2 atanh(s), s = e / (2 + e) <= 1/3, by its series to s^15 (as `softplus_f`).
inline __m512 softplus_v(__m512 x) {
    const __m512 ax = _mm512_abs_ps(x);
    const __m512 e = exp_v(_mm512_sub_ps(_mm512_setzero_ps(), ax));
    const __m512 s = _mm512_div_ps(e, _mm512_add_ps(_mm512_set1_ps(2.0f), e)), s2 = _mm512_mul_ps(s, s);
    __m512 p = _mm512_set1_ps(1.0f / 15);
    const float coef[] = {1.0f / 13, 1.0f / 11, 1.0f / 9, 1.0f / 7, 1.0f / 5, 1.0f / 3, 1.0f};
    for (float c : coef) p = _mm512_fmadd_ps(p, s2, _mm512_set1_ps(c));
    __m512 out = _mm512_fmadd_ps(_mm512_add_ps(s, s), p, _mm512_max_ps(x, _mm512_setzero_ps()));
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(20.0f), _CMP_GT_OQ), out, x);
}

// Per sequence, tokens in chunks of TOKENS. (1) The chunk's per-token work for all channels at once, row by
// row (contiguous loads the hardware prefetches): delta (clamped for the decay, see below), delta u and
// D u into row buffers that stay in L2. (2) For each 16-channel block (one vector; the last one masked) the
// recurrence over the chunk, with the block's state, d_state vectors, in registers; it adds C_t . h_t to
// the D u row and saves the entering state every K tokens. (3) The chunk's rows are copied to y.
// Scanning each block over the whole sequence instead reads one cache line per token and tensor, d floats
// apart, a new page every token or two: measured ~2.5x slower, it waits on memory.
template <int N>
void recurrence_avx512(int64_t s0, int64_t s1, int64_t dp, int64_t K, int64_t d, const float* __restrict A2,
                       const float* __restrict B, const float* __restrict C, int64_t n, int reverse, int64_t L,
                       const float* __restrict dc, const float* __restrict du, float* __restrict yd,
                       float* __restrict h_mem, float* __restrict states, __mmask16 m) {
    __m512 h[N];
    for (int i = 0; i < N; ++i) h[i] = _mm512_load_ps(h_mem + i * 16);
    for (int64_t step = s0; step < s1; ++step) {
        const int64_t t = reverse ? L - 1 - step : step, s = step - s0;
        if (states && step % K == 0)
            for (int i = 0; i < N; ++i) _mm512_mask_storeu_ps(states + (step / K) * n * d + i * d, m, h[i]);
        const __m512 dlt = _mm512_load_ps(dc + s * dp), dut = _mm512_load_ps(du + s * dp);
        __m512 acc0 = _mm512_load_ps(yd + s * dp), acc1 = _mm512_setzero_ps();
        const float* __restrict Bt = B + t * n;
        const float* __restrict Ct = C + t * n;
#pragma GCC unroll 16
        for (int i = 0; i < N; ++i) {
            const __m512 decay = exp2_v(_mm512_mul_ps(dlt, _mm512_load_ps(A2 + i * dp)));  // e^(delta A)
            h[i] = _mm512_fmadd_ps(decay, h[i], _mm512_mul_ps(dut, _mm512_set1_ps(Bt[i])));
            if (i % 2 == 0)
                acc0 = _mm512_fmadd_ps(_mm512_set1_ps(Ct[i]), h[i], acc0);
            else
                acc1 = _mm512_fmadd_ps(_mm512_set1_ps(Ct[i]), h[i], acc1);
        }
        _mm512_store_ps(yd + s * dp, _mm512_add_ps(acc0, acc1));
    }
    for (int i = 0; i < N; ++i) _mm512_store_ps(h_mem + i * 16, h[i]);
}

using RecurrenceFn = decltype(&recurrence_avx512<1>);
constexpr RecurrenceFn AVX512_RECURRENCE[] = {
    recurrence_avx512<1>, recurrence_avx512<2>, recurrence_avx512<3>, recurrence_avx512<4>,
    recurrence_avx512<5>, recurrence_avx512<6>, recurrence_avx512<7>, recurrence_avx512<8>,
    recurrence_avx512<9>, recurrence_avx512<10>, recurrence_avx512<11>, recurrence_avx512<12>,
    recurrence_avx512<13>, recurrence_avx512<14>, recurrence_avx512<15>, recurrence_avx512<16>};

inline __mmask16 lanes(int64_t w) { return w >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << w) - 1); }

// The float32 forward of all sequences for d_state <= 16 (one register per state and 16 channels);
// returns false (nothing done) for larger d_state.
inline bool forward_avx512(int64_t G, const Args& base, float* y, float* states) {
    const int64_t L = base.L, d = base.d, n = base.n, K = base.K, chunks = (L + K - 1) / K;
    if (n < 1 || n > 16) return false;
    const int64_t dp = (d + 15) / 16 * 16, blocks = dp / 16;
    // 64-byte aligned scratch: A log2 e (n, dp), clamp (dp), states (blocks, n, 16), three chunk row buffers
    std::vector<float> scratch(n * dp + dp + blocks * n * 16 + 3 * TOKENS * dp + 16);
    float* base_ptr = scratch.data() + (16 - (reinterpret_cast<uintptr_t>(scratch.data()) / 4) % 16) % 16;
    float *A2 = base_ptr, *dmax = A2 + n * dp, *h_mem = dmax + dp, *dc = h_mem + blocks * n * 16;
    float *du = dc + TOKENS * dp, *yd = du + TOKENS * dp;
    // Flush denormals to zero (FTZ, DAZ) while the kernel runs: decays below e^-87 would otherwise produce
    // denormal states, each a microcode assist of ~100 cycles; they differ from 0 by < 1.2e-38.
    const unsigned csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040);
    for (int64_t q = 0; q < G; ++q) {
        const Args a = at<float>(base, q, 0);
        const float *dt = (const float*)a.dt, *bias = (const float*)a.bias, *u = (const float*)a.u;
        const float *A = (const float*)a.A, *B = (const float*)a.B, *C = (const float*)a.C;
        const float* D = (const float*)a.D;
        // A log2 e, and the largest |delta| for which |delta A log2 e| < 2^21 (the rounding trick's range;
        // beyond it e^(delta A) is 0 or inf in float32 anyway)
        for (int64_t c = 0; c < dp; c += 16) {
            const __mmask16 m = lanes(d - c);
            __m512 amax = _mm512_set1_ps(1e-30f);
            for (int64_t i = 0; i < n; ++i) {
                const __m512 ai = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, A + i * d + c), _mm512_set1_ps(LOG2E));
                _mm512_store_ps(A2 + i * dp + c, ai);
                amax = _mm512_max_ps(amax, _mm512_abs_ps(ai));
            }
            _mm512_store_ps(dmax + c, _mm512_div_ps(_mm512_set1_ps(2097152.0f), amax));
        }
        std::fill(h_mem, h_mem + blocks * n * 16, 0.0f);
        for (int64_t s0 = 0; s0 < L; s0 += TOKENS) {
            const int64_t s1 = std::min(L, s0 + TOKENS);
            for (int64_t step = s0; step < s1; ++step) {  // (1) per-token work, row by row
                const int64_t t = a.reverse ? L - 1 - step : step, s = step - s0;
                for (int64_t c = 0; c < dp; c += 16) {
                    const __mmask16 m = lanes(d - c);
                    __m512 delta = _mm512_maskz_loadu_ps(m, dt + t * d + c);
                    if (bias) delta = _mm512_add_ps(delta, _mm512_maskz_loadu_ps(m, bias + c));
                    if (a.softplus) delta = softplus_v(delta);
                    const __m512 ut = _mm512_maskz_loadu_ps(m, u + t * d + c), lim = _mm512_load_ps(dmax + c);
                    _mm512_store_ps(du + s * dp + c, _mm512_mul_ps(delta, ut));
                    _mm512_store_ps(yd + s * dp + c, D ? _mm512_mul_ps(_mm512_maskz_loadu_ps(m, D + c), ut)
                                                       : _mm512_setzero_ps());
                    _mm512_store_ps(dc + s * dp + c, _mm512_max_ps(_mm512_min_ps(delta, lim),
                                                                   _mm512_sub_ps(_mm512_setzero_ps(), lim)));
                }
            }
            for (int64_t c = 0; c < dp; c += 16)  // (2) the recurrence, block by block
                AVX512_RECURRENCE[n - 1](s0, s1, dp, K, d, A2 + c, B, C, n, a.reverse, L, dc + c, du + c, yd + c,
                                         h_mem + (c / 16) * n * 16,
                                         states ? states + q * chunks * n * d + c : nullptr, lanes(d - c));
            for (int64_t step = s0; step < s1; ++step) {  // (3) rows out
                const int64_t t = a.reverse ? L - 1 - step : step;
                std::memcpy(y + (q * L + t) * d, yd + (step - s0) * dp, sizeof(float) * d);
            }
        }
    }
    _mm_setcsr(csr);
    return true;
}
#endif

template <typename T>
void forward_all(int64_t G, const Args& base, T* y, T* states) {
#if defined(__AVX512F__) && defined(__AVX512DQ__)
    if constexpr (std::is_same_v<T, float>)
        if (forward_avx512(G, base, y, states)) return;
#endif
    const int64_t L = base.L, d = base.d, n = base.n, chunks = (L + base.K - 1) / base.K;
    std::vector<T> h(n * DB);
    for (int64_t q = 0; q < G; ++q)
        for (int64_t d0 = 0; d0 < d; d0 += DB) {
            Args a = at<T>(base, q, d0);
            std::fill(h.begin(), h.end(), T(0));
            T* st = states ? states + q * chunks * n * d + d0 : nullptr;
            if (a.w == DB)
                forward_block<T, DB>(a, y + q * L * d + d0, st, h.data());
            else
                forward_block<T, 0>(a, y + q * L * d + d0, st, h.data());
        }
}

template <typename T>
void backward_all(int64_t G, const Args& base, const T* states, const T* gy, const Grads<T>& out) {
    const int64_t L = base.L, d = base.d, n = base.n, K = base.K, chunks = (L + K - 1) / K, nd = n * DB;
    std::vector<T> H((K + 1) * nd), Ad(K * nd), gh(nd), gA(nd);
    for (int64_t q = 0; q < G; ++q)
        for (int64_t d0 = 0; d0 < d; d0 += DB) {
            Args a = at<T>(base, q, d0);
            Grads<T> g{out.dt + q * L * d + d0, out.u + q * L * d + d0, out.A + q * n * d + d0, out.B + q * L * n,
                       out.C + q * L * n, out.bias + q * d + d0, out.D + q * d + d0};
            backward_block<T>(a, states + q * chunks * n * d + d0, gy + q * L * d + d0, g, H.data(), Ad.data(),
                              gh.data(), gA.data());
        }
}

// The mixer's depthwise convolution (kernel k) + SiLU for every direction at once, token-major: direction 0
// is causal (u_t from x_{t-k+1..t}), directions >= 1 anti-causal (x_{t..t+k-1}, weights mirrored): the
// backward branch of a bidirectional mixer computed on the sequence as it is, instead of flipped.
// x (N, L, d) with token stride ldx and sequence stride ldn; w (nd, k, d); bias (nd, d) or null;
// u (nd, N, L, d).
inline int64_t source(int64_t t, int64_t j, int64_t k, int64_t dir) {
    return dir == 0 ? t - (k - 1) + j : t + (k - 1) - j;
}

// The pre-activation of token t of sequence q in direction dir, bias + sum_j w_j x_source(t, j), into a (d).
// The backward recomputes it rather than storing it.
template <typename T>
inline void conv_pre(int64_t dir, int64_t q, int64_t t, int64_t L, int64_t d, int64_t k, int64_t ldn, int64_t ldx,
                     const T* x, const T* w, const T* bias, T* __restrict a) {
    for (int64_t c = 0; c < d; ++c) a[c] = bias ? bias[dir * d + c] : T(0);
    for (int64_t j = 0; j < k; ++j) {
        const int64_t src = source(t, j, k, dir);
        if (src < 0 || src >= L) continue;
        const T* __restrict xs = x + q * ldn + src * ldx;
        const T* __restrict wj = w + (dir * k + j) * d;
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) a[c] += wj[c] * xs[c];
    }
}

template <typename T>
void conv_silu_forward(int64_t nd, int64_t N, int64_t L, int64_t d, int64_t k, int64_t ldn, int64_t ldx, const T* x,
                       const T* w, const T* bias, T* u) {
    for (int64_t dir = 0; dir < nd; ++dir)
        for (int64_t q = 0; q < N; ++q)
            for (int64_t t = 0; t < L; ++t) {
                T* __restrict ut = u + ((dir * N + q) * L + t) * d;
                conv_pre(dir, q, t, L, d, k, ldn, ldx, x, w, bias, ut);
#pragma omp simd
                for (int64_t c = 0; c < d; ++c) ut[c] = ut[c] / (T(1) + exp_f(-ut[c]));
            }
}

// Gradients: g_x (N, L, d) contiguous, zeroed by the caller (both directions add to it); g_w (nd, k, d) and
// g_bias (nd, d) zeroed by the caller. The pre-activation is recomputed; silu'(a) = s (1 + a (1 - s)).
template <typename T>
void conv_silu_backward(int64_t nd, int64_t N, int64_t L, int64_t d, int64_t k, int64_t ldn, int64_t ldx,
                        const T* x, const T* w, const T* bias, const T* gu, T* g_x, T* g_w, T* g_bias) {
    std::vector<T> pre(d);
    T* __restrict a = pre.data();
    for (int64_t dir = 0; dir < nd; ++dir)
        for (int64_t q = 0; q < N; ++q)
            for (int64_t t = 0; t < L; ++t) {
                const T* __restrict gut = gu + ((dir * N + q) * L + t) * d;
                conv_pre(dir, q, t, L, d, k, ldn, ldx, x, w, bias, a);
                T* __restrict gb = g_bias + dir * d;
#pragma omp simd
                for (int64_t c = 0; c < d; ++c) {
                    T sig = T(1) / (T(1) + exp_f(-a[c]));
                    a[c] = gut[c] * sig * (T(1) + a[c] * (T(1) - sig));  // now dL/d(pre-activation)
                    gb[c] += a[c];
                }
                for (int64_t j = 0; j < k; ++j) {
                    const int64_t src = source(t, j, k, dir);
                    if (src < 0 || src >= L) continue;
                    const T* __restrict xs = x + q * ldn + src * ldx;
                    const T* __restrict wj = w + (dir * k + j) * d;
                    T* __restrict gx = g_x + (q * L + src) * d;
                    T* __restrict gw = g_w + (dir * k + j) * d;
#pragma omp simd
                    for (int64_t c = 0; c < d; ++c) {
                        gx[c] += wj[c] * a[c];
                        gw[c] += a[c] * xs[c];
                    }
                }
            }
}

// The mixer's output gate for every direction at once: out (N, L, d) = scale (y_0 + ... + y_{nd-1}) silu(z),
// y (nd, N, L, d) contiguous (the scan's output per direction), z (N, L, d) with sequence stride ldn and token
// stride ldz (a view of in_proj's output), scale 1 or 1/2 (`divide_out`).
template <typename T>
void gate_forward(int64_t nd, int64_t N, int64_t L, int64_t d, int64_t ldn, int64_t ldz, T scale, const T* y,
                  const T* z, T* out) {
    const int64_t plane = N * L * d;
    for (int64_t q = 0; q < N; ++q)
        for (int64_t t = 0; t < L; ++t) {
            const int64_t row = (q * L + t) * d;
            const T* __restrict zr = z + q * ldn + t * ldz;
            T* __restrict o = out + row;
            for (int64_t c = 0; c < d; ++c) o[c] = y[row + c];
            for (int64_t j = 1; j < nd; ++j) {
                const T* __restrict yj = y + j * plane + row;
#pragma omp simd
                for (int64_t c = 0; c < d; ++c) o[c] += yj[c];
            }
#pragma omp simd
            for (int64_t c = 0; c < d; ++c) o[c] = scale * o[c] * (zr[c] / (T(1) + exp_f(-zr[c])));
        }
}

// Gradients: g_y (N, L, d), the same for every direction (scale silu(z) g), and g_z (N, L, d) contiguous;
// silu'(z) = s (1 + z (1 - s)), s = sigmoid(z).
template <typename T>
void gate_backward(int64_t nd, int64_t N, int64_t L, int64_t d, int64_t ldn, int64_t ldz, T scale, const T* y,
                   const T* z, const T* g, T* g_y, T* g_z) {
    const int64_t plane = N * L * d;
    for (int64_t q = 0; q < N; ++q)
        for (int64_t t = 0; t < L; ++t) {
            const int64_t row = (q * L + t) * d;
            const T* __restrict zr = z + q * ldn + t * ldz;
            const T* __restrict gr = g + row;
            T* __restrict gz = g_z + row;
            for (int64_t c = 0; c < d; ++c) gz[c] = y[row + c];
            for (int64_t j = 1; j < nd; ++j) {
                const T* __restrict yj = y + j * plane + row;
#pragma omp simd
                for (int64_t c = 0; c < d; ++c) gz[c] += yj[c];
            }
            T* __restrict gy = g_y + row;
#pragma omp simd
            for (int64_t c = 0; c < d; ++c) {
                const T sig = T(1) / (T(1) + exp_f(-zr[c])), gs = scale * gr[c];
                gy[c] = gs * zr[c] * sig;
                gz[c] = gs * gz[c] * sig * (T(1) + zr[c] * (T(1) - sig));
            }
        }
}

}  // namespace

// G sequences: dt, u (G, L, d); A (G, n, d); B, C (G, L, n); bias, D (G, d) or null; y (G, L, d);
// states (G, ceil(L/K), n, d) or null; sequences q >= reverse are scanned from their last token to the first.
// Backward: gradients of the same shapes (g_B, g_C zeroed by the caller;
// g_bias, g_D always written).
extern "C" {
// 1 if float32 forwards with d_state <= 16 take the AVX-512 path (`forward_avx512`), else 0.
int scan_forward_vectorised() {
#if defined(__AVX512F__) && defined(__AVX512DQ__)
    return 1;
#else
    return 0;
#endif
}
#define DITK_SCAN_API(T, SUF)                                                                                  \
    void scan_forward_##SUF(int64_t G, int64_t L, int64_t d, int64_t n, int64_t K, int softplus, int reverse,   \
                            const T* dt, const T* bias, const T* u, const T* A, const T* B, const T* C,         \
                            const T* D, T* y, T* states) {                                                     \
        Args a{L, d, n, K, 0, softplus, reverse, dt, bias, u, A, B, C, D};                                     \
        forward_all<T>(G, a, y, states);                                                                       \
    }                                                                                                          \
    void scan_backward_##SUF(int64_t G, int64_t L, int64_t d, int64_t n, int64_t K, int softplus, int reverse,  \
                             const T* dt, const T* bias, const T* u, const T* A, const T* B, const T* C,        \
                             const T* D, const T* states, const T* gy, T* g_dt, T* g_u, T* g_A, T* g_B,         \
                             T* g_C, T* g_bias, T* g_D) {                                                      \
        Args a{L, d, n, K, 0, softplus, reverse, dt, bias, u, A, B, C, D};                                     \
        backward_all<T>(G, a, states, gy, Grads<T>{g_dt, g_u, g_A, g_B, g_C, g_bias, g_D});                    \
    }
DITK_SCAN_API(float, f32)
DITK_SCAN_API(double, f64)
#define DITK_CONV_API(T, SUF)                                                                                  \
    void conv_silu_forward_##SUF(int64_t nd, int64_t N, int64_t L, int64_t d, int64_t k, int64_t ldn,          \
                                 int64_t ldx, const T* x, const T* w, const T* bias, T* u) {                   \
        conv_silu_forward<T>(nd, N, L, d, k, ldn, ldx, x, w, bias, u);                                         \
    }                                                                                                          \
    void conv_silu_backward_##SUF(int64_t nd, int64_t N, int64_t L, int64_t d, int64_t k, int64_t ldn,         \
                                  int64_t ldx, const T* x, const T* w, const T* bias, const T* gu, T* g_x,     \
                                  T* g_w, T* g_bias) {                                                         \
        conv_silu_backward<T>(nd, N, L, d, k, ldn, ldx, x, w, bias, gu, g_x, g_w, g_bias);                     \
    }
DITK_CONV_API(float, f32)
DITK_CONV_API(double, f64)
#define DITK_GATE_API(T, SUF)                                                                                  \
    void gate_forward_##SUF(int64_t nd, int64_t N, int64_t L, int64_t d, int64_t ldn, int64_t ldz, T scale,    \
                            const T* y, const T* z, T* out) {                                                  \
        gate_forward<T>(nd, N, L, d, ldn, ldz, scale, y, z, out);                                              \
    }                                                                                                          \
    void gate_backward_##SUF(int64_t nd, int64_t N, int64_t L, int64_t d, int64_t ldn, int64_t ldz, T scale,   \
                             const T* y, const T* z, const T* g, T* g_y, T* g_z) {                             \
        gate_backward<T>(nd, N, L, d, ldn, ldz, scale, y, z, g, g_y, g_z);                                     \
    }
DITK_GATE_API(float, f32)
DITK_GATE_API(double, f64)
}
"""

_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_I64 = ctypes.c_int64


def library():
    """The compiled scan library, or None (no compiler, disabled, or the build failed)."""
    lib = _cpu_kernels.load(NAME, SOURCE)
    if lib is not None and not getattr(lib, "_ditk_typed", False):
        _declare(lib)
    return lib


_P = ctypes.c_void_p


def _declare(lib) -> None:
    """Argument types of the exported functions, so that calls pass Python ints and data pointers straight
    through (building a ctypes object per argument costs ~1 us each, noticeable in small mixers)."""
    i64, i32 = _I64, ctypes.c_int
    for suf in _SUFFIX.values():
        getattr(lib, "scan_forward_" + suf).argtypes = [i64] * 5 + [i32] * 2 + [_P] * 9
        getattr(lib, "scan_backward_" + suf).argtypes = [i64] * 5 + [i32] * 2 + [_P] * 15
        getattr(lib, "conv_silu_forward_" + suf).argtypes = [i64] * 7 + [_P] * 4
        getattr(lib, "conv_silu_backward_" + suf).argtypes = [i64] * 7 + [_P] * 7
        real = ctypes.c_float if suf == "f32" else ctypes.c_double
        getattr(lib, "gate_forward_" + suf).argtypes = [i64] * 6 + [real] + [_P] * 3
        getattr(lib, "gate_backward_" + suf).argtypes = [i64] * 6 + [real] + [_P] * 5
    lib._ditk_typed = True


def _addr(t):
    """A contiguous tensor's data pointer as an int for a typed call (None -> NULL)."""
    return None if t is None else t.data_ptr()


def scan_forward(lib, dt, u, A, B, C, bias, D, softplus: bool, reverse_from: int, states=None):
    """One call of the forward kernel on contiguous tensors of one dtype (no autograd): y (G, L, d), and the
    chunk-entry states written into `states` (G, ceil(L/CHUNK), n, d) when it is given."""
    groups, length, d = dt.shape
    y = torch.empty_like(dt)
    getattr(lib, "scan_forward_" + _SUFFIX[dt.dtype])(
        groups, length, d, A.shape[1], CHUNK, int(softplus), reverse_from, dt.data_ptr(), _addr(bias),
        u.data_ptr(), A.data_ptr(), B.data_ptr(), C.data_ptr(), _addr(D), y.data_ptr(), _addr(states))
    return y


def conv_silu_forward(lib, x, weight, bias):
    """One call of the conv + SiLU kernel (no autograd): x (N, L, d) with unit channel stride, weight (nd, k, d)
    and bias (nd, d) contiguous -> u (nd, N, L, d)."""
    nd, k, d = weight.shape
    n_seq, length = x.shape[:2]
    u = x.new_empty(nd, n_seq, length, d)
    getattr(lib, "conv_silu_forward_" + _SUFFIX[x.dtype])(
        nd, n_seq, length, d, k, x.stride(0), x.stride(1), x.data_ptr(), weight.data_ptr(), _addr(bias),
        u.data_ptr())
    return u


def vectorised_forward() -> bool:
    """Whether float32 forwards with d_state <= 16 run the AVX-512 kernel (built where the CPU has AVX-512)."""
    lib = library()
    return lib is not None and bool(lib.scan_forward_vectorised())


def supports(*tensors: torch.Tensor) -> bool:
    """Whether the compiled scan can take these tensors: CPU, float32 or float64, one dtype."""
    dtype = tensors[0].dtype
    return dtype in _SUFFIX and all(t.device.type == "cpu" and t.dtype == dtype for t in tensors)


class CompiledScan(torch.autograd.Function):
    """y = scan + D u, token-major: dt, u (G, L, d); A (G, n, d); B, C (G, L, n); bias, D (G, d) or None;
    delta = softplus(dt + bias) if `softplus` else dt + bias; sequences g >= reverse_from scanned from the end.
    Returns y (G, L, d)."""

    @staticmethod
    def forward(ctx, dt, u, A, B, C, bias, D, softplus, reverse_from):
        dt, u, A, B, C = (x.contiguous() for x in (dt, u, A, B, C))
        bias, D = (None if x is None else x.contiguous() for x in (bias, D))
        groups, length, d = dt.shape
        n = A.shape[1]
        states = dt.new_empty(groups, -(-length // CHUNK), n, d) if any(ctx.needs_input_grad) else None
        y = scan_forward(library(), dt, u, A, B, C, bias, D, softplus, reverse_from, states)
        ctx.softplus, ctx.reverse_from = softplus, reverse_from
        ctx.has = (bias is not None, D is not None)
        ctx.save_for_backward(dt, u, A, B, C, bias, D, states)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        dt, u, A, B, C, bias, D, states = ctx.saved_tensors
        groups, length, d = dt.shape
        n = A.shape[1]
        gy = grad_y.contiguous().to(dt.dtype)
        g_dt, g_u, g_A = torch.empty_like(dt), torch.empty_like(u), torch.empty_like(A)
        g_B, g_C = torch.zeros_like(B), torch.zeros_like(C)
        g_bias, g_D = dt.new_empty(groups, d), dt.new_empty(groups, d)
        p = _cpu_kernels.ptr
        getattr(library(), "scan_backward_" + _SUFFIX[dt.dtype])(
            _I64(groups), _I64(length), _I64(d), _I64(n), _I64(CHUNK), ctypes.c_int(int(ctx.softplus)),
            ctypes.c_int(ctx.reverse_from), p(dt), p(bias), p(u), p(A), p(B), p(C), p(D), p(states), p(gy), p(g_dt),
            p(g_u), p(g_A), p(g_B), p(g_C),
            p(g_bias), p(g_D))
        return (g_dt, g_u, g_A, g_B, g_C, g_bias if ctx.has[0] else None, g_D if ctx.has[1] else None, None, None)


def compiled_scan(dt, u, A, B, C, bias=None, D=None, softplus=False, reverse_from=None):
    """See `CompiledScan`; bias and D may be (d,) (shared) or (G, d). Sequences g >= reverse_from (none by
    default) are scanned from their last token to the first (the backward branch of a bidirectional mixer,
    without flipping any tensor)."""
    groups, _, d = dt.shape
    bias, D = (None if x is None else x.to(dt.dtype).expand(groups, d) for x in (bias, D))
    reverse_from = groups if reverse_from is None else int(reverse_from)
    if not _needs_grad(dt, u, A, B, C, bias, D):  # inference: the kernel alone, no autograd node
        dt, u, A, B, C, bias, D = (None if x is None else x.contiguous() for x in (dt, u, A, B, C, bias, D))
        return scan_forward(library(), dt, u, A, B, C, bias, D, bool(softplus), reverse_from)
    return CompiledScan.apply(dt, u, A, B, C, bias, D, bool(softplus), reverse_from)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class ConvSilu(torch.autograd.Function):
    """u (nd, N, L, d) = silu(depthwise conv of x (N, L, d) with weight (nd, k, d) + bias (nd, d)); direction 0
    causal, directions >= 1 anti-causal (the reversed branch, on the unflipped sequence). x may be a view
    with unit channel stride (e.g. half of in_proj's output)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        if x.stride(-1) != 1:
            x = x.contiguous()
        weight = weight.contiguous()
        bias = None if bias is None else bias.contiguous()
        u = conv_silu_forward(library(), x, weight, bias)
        ctx.save_for_backward(x, weight, bias)
        return u

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_u):
        x, weight, bias = ctx.saved_tensors
        nd, k, d = weight.shape
        n_seq, length = x.shape[:2]
        gu = grad_u.contiguous().to(x.dtype)
        g_x, g_w, g_b = x.new_zeros(n_seq, length, d), torch.zeros_like(weight), x.new_zeros(nd, d)
        p = _cpu_kernels.ptr
        getattr(library(), "conv_silu_backward_" + _SUFFIX[x.dtype])(
            _I64(nd), _I64(n_seq), _I64(length), _I64(d), _I64(k), _I64(x.stride(0)), _I64(x.stride(1)), p(x),
            p(weight), p(bias), p(gu), p(g_x), p(g_w), p(g_b))
        return g_x, g_w, (g_b if bias is not None else None)


def conv_silu(x, weight, bias=None):
    """`ConvSilu` (see there), without an autograd node when no gradient is needed (inference)."""
    if _needs_grad(x, weight, bias):
        return ConvSilu.apply(x, weight, bias)
    if x.stride(-1) != 1:
        x = x.contiguous()
    return conv_silu_forward(library(), x, weight.contiguous(), None if bias is None else bias.contiguous())


class Gate(torch.autograd.Function):
    """out (N, L, d) = scale * (sum over directions of y (nd, N, L, d)) * silu(z): the mixer's output gate in one
    pass. z (N, L, d) may be a view with unit channel stride (the second half of in_proj's output)."""

    @staticmethod
    def forward(ctx, y, z, scale):
        y = y.contiguous()
        if z.stride(-1) != 1:
            z = z.contiguous()
        ctx.scale = scale
        ctx.save_for_backward(y, z)
        return gate_forward(library(), y, z, scale)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        y, z = ctx.saved_tensors
        nd, n_seq, length, d = y.shape
        g = grad.contiguous().to(y.dtype)
        g_y, g_z = torch.empty_like(g), torch.empty_like(g)
        getattr(library(), "gate_backward_" + _SUFFIX[y.dtype])(
            nd, n_seq, length, d, z.stride(0), z.stride(1), ctx.scale, y.data_ptr(), z.data_ptr(), g.data_ptr(),
            g_y.data_ptr(), g_z.data_ptr())
        return g_y.unsqueeze(0).expand(nd, n_seq, length, d), g_z, None


def gate_forward(lib, y, z, scale: float):
    """One call of the gate kernel (no autograd): y (nd, N, L, d) contiguous, z (N, L, d) unit channel stride."""
    nd, n_seq, length, d = y.shape
    out = y.new_empty(n_seq, length, d)
    getattr(lib, "gate_forward_" + _SUFFIX[y.dtype])(
        nd, n_seq, length, d, z.stride(0), z.stride(1), scale, y.data_ptr(), z.data_ptr(), out.data_ptr())
    return out


def gate(y, z, scale: float = 1.0):
    """`Gate` (see there), without an autograd node when no gradient is needed (inference)."""
    if _needs_grad(y, z):
        return Gate.apply(y, z, float(scale))
    return gate_forward(library(), y.contiguous(), z if z.stride(-1) == 1 else z.contiguous(), float(scale))
