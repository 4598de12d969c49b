// CPU decode kernel: each row runs only its own experts, reading only their weights.
//
// Contract (one layer, one rank), as vllm_griffin/ops/reference.py:
//   x [T, H] float32; gate, up and down-transposed rows of neuron j at
//   w_gate + j*stride, w_up + j*stride, w_down + j*stride (float32 or bfloat16):
//   separate [D, H] matrices (stride H) or one interleaved [D, 3, H] (stride 3H);
//   experts [T, K] int64, sorted ascending per row; counts [T] int64; out [T, H] float32.
//
// Two loop orders:
//   rows:  for each row, its experts four at a time (eight independent dot chains
//          keep the core busy while weights stream in);
//   union: over the union of the step's experts, in blocks of 16 ascending neurons, so
//          each neuron's weights come from memory once for all rows (weight traffic =
//          |union|) and are then reused from L1/L2 by register-tiled micro-kernels that
//          do only the rows' own products (no work for a row that does not keep a
//          neuron): per row, the gate/up dots of 8 of its neurons at a time over a chunk
//          of 256 columns (16 accumulators; the block's chunk stays in L1 for all rows),
//          then its down projection 128 columns at a time (8 accumulators) while its
//          neurons of the block are added in ascending order.
// Both produce the same bits for a row: every (row, neuron) dot product is one
// KLANES-lane accumulator over H (columns in ascending order, whatever the chunking),
// then ksum's fixed tree, then the scalar tail; h = act_mul (lane and scalar code agree);
// every output element adds its row's experts' down values with one FMA each, in
// ascending neuron order, starting from 0. A row never touches a neuron it does not
// keep, so its output never depends on which rows share its step.
// Compiled at first use by vllm_griffin/ops/cpu_kernel.py (cc -O3 -march=native): 16 lanes
// where the compiler targets AVX-512, 8 with AVX2 + FMA, 1 otherwise (bits differ between
// those builds, never between the loop orders of one build).

#include <float.h>
#include <stddef.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define GRIFFIN_AVX2 1
#endif

static inline float act_fn(float g, int act) {
    if (act == 0) return g / (1.0f + expf(-g));                       // SiLU
    if (act == 1) {                                                     // GELU, tanh form
        float inner = 0.7978845608028654f * (g + 0.044715f * g * g * g);
        return 0.5f * g * (1.0f + tanhf(inner));
    }
    if (act == 2) return g > 0.0f ? g : 0.0f;                          // ReLU
    return 0.5f * g * (1.0f + erff(g * 0.7071067811865476f));          // GELU, exact
}

static inline float bf16_to_f32(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}
static inline float f32_id(float v) { return v; }

// Vectors of the prefill capture and masked-path kernels below (8 lanes with AVX2).
#ifdef GRIFFIN_AVX2
#define LANES 8
typedef __m256 vec;
static inline vec vzero(void) { return _mm256_setzero_ps(); }
static inline vec vset1(float v) { return _mm256_set1_ps(v); }
static inline vec vloadx(const float* p) { return _mm256_loadu_ps(p); }
static inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
static inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
static inline vec load_f32(const float* p) { return _mm256_loadu_ps(p); }
static inline vec load_bf16(const uint16_t* p) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
static inline float vsum(vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#else  // portable fallback: one lane
#define LANES 1
typedef float vec;
static inline vec vzero(void) { return 0.0f; }
static inline vec vset1(float v) { return v; }
static inline vec vloadx(const float* p) { return *p; }
static inline void vstore(float* p, vec v) { *p = v; }
static inline vec vfma(vec a, vec b, vec c) { return fmaf(a, b, c); }
static inline vec vadd(vec a, vec b) { return a + b; }
static inline vec vmul(vec a, vec b) { return a * b; }
static inline vec load_f32(const float* p) { return *p; }
static inline vec load_bf16(const uint16_t* p) { return bf16_to_f32(*p); }
static inline float vsum(vec v) { return v; }
#endif

// SiLU and the GELU tanh form as g * sigmoid(a) (a = g, or a = 2 * sqrt(2/pi) *
// (g + 0.044715 g^3)), with exp from a range reduction and a degree-7 polynomial (Cephes'
// expf, within 2 ulp). The lane code and the scalar code do the same IEEE operations in
// the same order, so a value's bits do not depend on its position or on AVX2: the decode
// kernels' activations (act_mul) and the masked path's (griffin_act_keep_*).
#define EXP_HI 88.3762626647949f
#define EXP_LO -87.3365478515625f
#define LOG2E 1.44269504088896341f
#define LN2_HI 0.693359375f
#define LN2_LO -2.12194440e-4f
#define GELU_A 1.5957691216057308f   /* 2 * sqrt(2 / pi) */
#define GELU_B 0.0713548162726009f   /* 2 * sqrt(2 / pi) * 0.044715 */
static const float EXP_POLY[6] = {1.9875691500E-4f, 1.3981999507E-3f, 8.3334519073E-3f,
                                  4.1665795894E-2f, 1.6666665459E-1f, 5.0000001201E-1f};

static inline float exp_scalar(float x) {
    x = x > EXP_LO ? x : EXP_LO;          // fmaxf, fminf (inlined); the result's NaN comes from g
    x = x < EXP_HI ? x : EXP_HI;
    float n = nearbyintf(x * LOG2E);
    float r = fmaf(-n, LN2_HI, x);
    r = fmaf(-n, LN2_LO, r);
    float p = EXP_POLY[0];
    for (int i = 1; i < 6; i++) p = fmaf(p, r, EXP_POLY[i]);
    p = fmaf(p, r * r, r) + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}
static inline float gated_act_scalar(float g, float u, int act) {
    float a = act == 0 ? g : g * fmaf(GELU_B, g * g, GELU_A);
    return g / (1.0f + exp_scalar(-a)) * u;
}
#ifdef GRIFFIN_AVX2
static inline __m256 exp_lanes(__m256 x) {
    // As exp_scalar's clamps except for NaN (kept here; there g carries it to the result).
    x = _mm256_min_ps(_mm256_set1_ps(EXP_HI), _mm256_max_ps(_mm256_set1_ps(EXP_LO), x));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    __m256 p = _mm256_set1_ps(EXP_POLY[0]);
    for (int i = 1; i < 6; i++) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_POLY[i]));
    p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
    __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}
static inline __m256 gated_act_lanes(__m256 g, __m256 u, int act) {
    __m256 a = act == 0 ? g : _mm256_mul_ps(g, _mm256_fmadd_ps(_mm256_set1_ps(GELU_B), _mm256_mul_ps(g, g),
                                                               _mm256_set1_ps(GELU_A)));
    __m256 den = _mm256_add_ps(_mm256_set1_ps(1.0f), exp_lanes(_mm256_sub_ps(_mm256_setzero_ps(), a)));
    return _mm256_mul_ps(_mm256_div_ps(g, den), u);
}
#endif

// h[k] = act(g[k]) * u[k], k < n: every expert kernel's activation, so a (row, neuron)'s h
// has the same bits in each (whatever its position in g: lanes and scalar agree).
static void act_mul(const float* g, const float* u, float* h, int n, int act) {
    int k = 0;
    if (act <= 1) {
#ifdef GRIFFIN_AVX2
        for (; k + 8 <= n; k += 8)
            _mm256_storeu_ps(h + k, gated_act_lanes(_mm256_loadu_ps(g + k), _mm256_loadu_ps(u + k), act));
#endif
        for (; k < n; k++) h[k] = gated_act_scalar(g[k], u[k], act);
    } else {
        for (; k < n; k++) h[k] = act_fn(g[k], act) * u[k];
    }
}

// Vectors of the decode expert kernels: the widest the build allows.
#if defined(GRIFFIN_AVX2) && defined(__AVX512F__)
#define KLANES 16
typedef __m512 kvec;
static inline kvec kzero(void) { return _mm512_setzero_ps(); }
static inline kvec kset1(float v) { return _mm512_set1_ps(v); }
static inline kvec kloadx(const float* p) { return _mm512_loadu_ps(p); }
static inline void kstore(float* p, kvec v) { _mm512_storeu_ps(p, v); }
static inline kvec kfma(kvec a, kvec b, kvec c) { return _mm512_fmadd_ps(a, b, c); }
static inline kvec kload_f32(const float* p) { return _mm512_loadu_ps(p); }
static inline kvec kload_bf16(const uint16_t* p) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
static inline float ksum(kvec v) {  // lanes i + (i + 8), then vsum's tree on those 8
    __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    return vsum(_mm256_add_ps(_mm512_castps512_ps256(v), hi));
}
#elif defined(GRIFFIN_AVX2)
#define KLANES 8
typedef __m256 kvec;
static inline kvec kzero(void) { return _mm256_setzero_ps(); }
static inline kvec kset1(float v) { return _mm256_set1_ps(v); }
static inline kvec kloadx(const float* p) { return _mm256_loadu_ps(p); }
static inline void kstore(float* p, kvec v) { _mm256_storeu_ps(p, v); }
static inline kvec kfma(kvec a, kvec b, kvec c) { return _mm256_fmadd_ps(a, b, c); }
static inline kvec kload_f32(const float* p) { return load_f32(p); }
static inline kvec kload_bf16(const uint16_t* p) { return load_bf16(p); }
static inline float ksum(kvec v) { return vsum(v); }
#else
#define KLANES 1
typedef float kvec;
static inline kvec kzero(void) { return 0.0f; }
static inline kvec kset1(float v) { return v; }
static inline kvec kloadx(const float* p) { return *p; }
static inline void kstore(float* p, kvec v) { *p = v; }
static inline kvec kfma(kvec a, kvec b, kvec c) { return fmaf(a, b, c); }
static inline kvec kload_f32(const float* p) { return *p; }
static inline kvec kload_bf16(const uint16_t* p) { return bf16_to_f32(*p); }
static inline float ksum(kvec v) { return v; }
#endif

// The union kernel (griffin_experts_union_*) works on blocks of U_BLOCK union neurons;
// per row and block, its gate/up dots in tiles of UA_TILE of the row's neurons (2 *
// UA_TILE accumulators), U_CHUNK columns at a time (the block's gate/up chunk stays in
// L1 for all rows); its down projection UB_VECS vectors of columns at a time (in
// registers while the row's neurons of the block are added). Up to 64 rows per pass
// (U_GROUP: one bit each). Tiles: 16 + 1 of AVX-512's 32 registers, 12 + 1 of AVX2's 16.
// No software prefetch: the hardware's follows the block's chunks (measured: prefetching
// the next block from the inner loops was slower on a 1-core stream).
#if KLANES == 16
#define UA_TILE 8
#define UB_VECS 8
#elif KLANES == 8
#define UA_TILE 6
#define UB_VECS 8
#else
#define UA_TILE 4
#define UB_VECS 4
#endif
#ifndef U_BLOCK
#define U_BLOCK 16
#endif
#ifndef U_CHUNK
#define U_CHUNK 256
#endif
#define U_GROUP 64

// Hides p's value from the optimizer: the loads at p + constant then use one register
// (not one offset per constant, hoisted out of the loop and spilled).
#define OPAQUE(p) __asm__("" : "+r"(p))

// The union kernel's micro-kernels name their accumulators (ag0.., au0.., a0..) rather
// than index arrays, so they stay in registers; tile sizes are constants after inlining
// and the unused names drop out.
#define RD_LOAD(k) if (k < np) { ag##k = kloadx(acc + (2 * k) * KLANES); au##k = kloadx(acc + (2 * k + 1) * KLANES); }
#define RD_STEP(k, LOAD) if (k < np) { ag##k = kfma(LOAD(gates[k] + i), xv, ag##k); \
    au##k = kfma(LOAD(gates[k] + du + i), xv, au##k); }
#define RD_SAVE(k) if (k < np) { kstore(acc + (2 * k) * KLANES, ag##k); kstore(acc + (2 * k + 1) * KLANES, au##k); }
#define RW_LOAD(k) if (k < nv) a##k = kloadx(y + k * KLANES);
#define RW_STEP(k, LOAD) if (k < nv) a##k = kfma(LOAD(d + k * KLANES), hv, a##k);
#define RW_SAVE(k) if (k < nv) kstore(y + k * KLANES, a##k);

#define DEFINE_KERNELS(SUFFIX, WT, LOAD, TOF)                                                    \
/* g = gate_n . x and u = up_n . x for one row and up to four neurons. */                                 \
static inline __attribute__((always_inline)) void dots_neurons_##SUFFIX(const WT* const* gates, \
        const WT* const* ups, const float* x, int nn, int64_t H, float* g, float* u) {          \
    kvec ag[4] = {kzero(), kzero(), kzero(), kzero()}, au[4] = {kzero(), kzero(), kzero(), kzero()}; \
    int64_t i = 0;                                                                              \
    for (; i + KLANES <= H; i += KLANES) {                                                      \
        kvec xv = kloadx(x + i);                                                                \
        for (int n = 0; n < nn; n++) {                                                          \
            ag[n] = kfma(LOAD(gates[n] + i), xv, ag[n]);                                        \
            au[n] = kfma(LOAD(ups[n] + i), xv, au[n]);                                          \
        }                                                                                       \
    }                                                                                           \
    for (int n = 0; n < nn; n++) {                                                              \
        float gs = ksum(ag[n]), us = ksum(au[n]);                                               \
        for (int64_t k = i; k < H; k++) {                                                       \
            gs = fmaf(TOF(gates[n][k]), x[k], gs);                                              \
            us = fmaf(TOF(ups[n][k]), x[k], us);                                                \
        }                                                                                       \
        g[n] = gs; u[n] = us;                                                                   \
    }                                                                                           \
}                                                                                               \
/* y_r += h_r * down_j for up to four rows (one neuron). */                                     \
static inline __attribute__((always_inline)) void axpy_rows_##SUFFIX(float* const* ys, const float* h, \
        int nr, const WT* down, int64_t H) {                                                    \
    int64_t i = 0;                                                                              \
    for (; i + KLANES <= H; i += KLANES) {                                                      \
        kvec w = LOAD(down + i);                                                                \
        for (int r = 0; r < nr; r++) kstore(ys[r] + i, kfma(w, kset1(h[r]), kloadx(ys[r] + i))); \
    }                                                                                           \
    for (int r = 0; r < nr; r++)                                                                \
        for (int64_t k = i; k < H; k++) ys[r][k] = fmaf(TOF(down[k]), h[r], ys[r][k]);          \
}                                                                                               \
/* y += h_n * down_n for up to four neurons in ascending order (one row). */                    \
static inline __attribute__((always_inline)) void axpy_neurons_##SUFFIX(float* y, const float* h, \
        int nn, const WT* const* downs, int64_t H) {                                            \
    int64_t i = 0;                                                                              \
    for (; i + KLANES <= H; i += KLANES) {                                                      \
        kvec acc = kloadx(y + i);                                                               \
        for (int n = 0; n < nn; n++) acc = kfma(LOAD(downs[n] + i), kset1(h[n]), acc);          \
        kstore(y + i, acc);                                                                     \
    }                                                                                           \
    for (int64_t k = i; k < H; k++)                                                             \
        for (int n = 0; n < nn; n++) y[k] = fmaf(TOF(downs[n][k]), h[n], y[k]);                 \
}                                                                                               \
/* The helpers above for a run-time count of 1-4: each case a constant, so the                  \
   compiler keeps the accumulators in registers. */                                             \
static void dots_neurons_n_##SUFFIX(const WT* const* gates, const WT* const* ups, const float* x, \
                                    int nn, int64_t H, float* g, float* u) {                    \
    switch (nn) {                                                                               \
        case 4: dots_neurons_##SUFFIX(gates, ups, x, 4, H, g, u); break;                        \
        case 3: dots_neurons_##SUFFIX(gates, ups, x, 3, H, g, u); break;                        \
        case 2: dots_neurons_##SUFFIX(gates, ups, x, 2, H, g, u); break;                        \
        default: dots_neurons_##SUFFIX(gates, ups, x, 1, H, g, u);                              \
    }                                                                                           \
}                                                                                               \
static void axpy_neurons_n_##SUFFIX(float* y, const float* h, int nn, const WT* const* downs, int64_t H) {\
    switch (nn) {                                                                               \
        case 4: axpy_neurons_##SUFFIX(y, h, 4, downs, H); break;                                \
        case 3: axpy_neurons_##SUFFIX(y, h, 3, downs, H); break;                                \
        case 2: axpy_neurons_##SUFFIX(y, h, 2, downs, H); break;                                \
        default: axpy_neurons_##SUFFIX(y, h, 1, downs, H);                                      \
    }                                                                                           \
}                                                                                               \
static void axpy_rows_n_##SUFFIX(float* const* ys, const float* h, int nr, const WT* down, int64_t H) {\
    switch (nr) {                                                                               \
        case 4: axpy_rows_##SUFFIX(ys, h, 4, down, H); break;                                   \
        case 3: axpy_rows_##SUFFIX(ys, h, 3, down, H); break;                                   \
        case 2: axpy_rows_##SUFFIX(ys, h, 2, down, H); break;                                   \
        default: axpy_rows_##SUFFIX(ys, h, 1, down, H);                                         \
    }                                                                                           \
}                                                                                               \
void griffin_experts_rows_##SUFFIX(const float* x, const WT* w_gate, const WT* w_up,            \
        const WT* w_down, int64_t stride, const int64_t* experts, const int64_t* counts,        \
        float* out, int64_t T, int64_t H, int64_t D, int64_t K, int act) {                      \
    (void)D;                                                                                    \
    for (int64_t t = 0; t < T; t++) {                                                           \
        float* y = out + t * H;                                                                 \
        memset(y, 0, sizeof(float) * H);                                                        \
        for (int64_t e = 0; e < counts[t]; e += 4) {                                            \
            int nn = counts[t] - e < 4 ? (int)(counts[t] - e) : 4;                              \
            const WT *gates[4], *ups[4], *downs[4];                                             \
            float g[4], u[4], h[4];                                                             \
            for (int n = 0; n < nn; n++) {                                                      \
                int64_t j = experts[t * K + e + n];                                             \
                gates[n] = w_gate + j * stride; ups[n] = w_up + j * stride;                     \
                downs[n] = w_down + j * stride;                                                 \
            }                                                                                   \
            dots_neurons_n_##SUFFIX(gates, ups, x + t * H, nn, H, g, u);                        \
            act_mul(g, u, h, nn, act);                                                          \
            axpy_neurons_n_##SUFFIX(y, h, nn, downs, H);                                        \
        }                                                                                       \
    }                                                                                           \
}                                                                                               \
/* Union, phase A: columns [i0, i1) of one row's gate and up dots with np neurons (a     \
   register tile); the accumulators rest in acc between column chunks (zero when fresh),     \
   acc[(2 * p + m) * KLANES] for neuron p, m = 0 gate / 1 up; up rows at gate + du. */       \
static inline __attribute__((always_inline)) void row_dots_##SUFFIX(const WT* const* gates,     \
        ptrdiff_t du, const float* x, const int np, int64_t i0, int64_t i1, float* acc, int fresh) { \
    kvec ag0 = kzero(), ag1 = kzero(), ag2 = kzero(), ag3 = kzero(), ag4 = kzero(), ag5 = kzero(); \
    kvec ag6 = kzero(), ag7 = kzero(), au0 = kzero(), au1 = kzero(), au2 = kzero(), au3 = kzero(); \
    kvec au4 = kzero(), au5 = kzero(), au6 = kzero(), au7 = kzero();                            \
    if (!fresh) {                                                                               \
        RD_LOAD(0) RD_LOAD(1) RD_LOAD(2) RD_LOAD(3) RD_LOAD(4) RD_LOAD(5) RD_LOAD(6) RD_LOAD(7) \
    }                                                                                           \
    for (int64_t i = i0; i < i1; i += KLANES) {                                                 \
        kvec xv = kloadx(x + i);                                                                \
        RD_STEP(0, LOAD) RD_STEP(1, LOAD) RD_STEP(2, LOAD) RD_STEP(3, LOAD)                     \
        RD_STEP(4, LOAD) RD_STEP(5, LOAD) RD_STEP(6, LOAD) RD_STEP(7, LOAD)                     \
    }                                                                                           \
    RD_SAVE(0) RD_SAVE(1) RD_SAVE(2) RD_SAVE(3) RD_SAVE(4) RD_SAVE(5) RD_SAVE(6) RD_SAVE(7)     \
}                                                                                               \
static void row_dots_n_##SUFFIX(const WT* const* gates, ptrdiff_t du, const float* x, int np,   \
        int64_t i0, int64_t i1, float* acc, int fresh) {                                        \
    switch (np) {                                                                               \
        case 1: row_dots_##SUFFIX(gates, du, x, 1, i0, i1, acc, fresh); break;                  \
        case 2: row_dots_##SUFFIX(gates, du, x, 2, i0, i1, acc, fresh); break;                  \
        case 3: row_dots_##SUFFIX(gates, du, x, 3, i0, i1, acc, fresh); break;                  \
        case 4: row_dots_##SUFFIX(gates, du, x, 4, i0, i1, acc, fresh); break;                  \
        case 5: row_dots_##SUFFIX(gates, du, x, UA_TILE < 5 ? UA_TILE : 5, i0, i1, acc, fresh); break; \
        case 6: row_dots_##SUFFIX(gates, du, x, UA_TILE < 6 ? UA_TILE : 6, i0, i1, acc, fresh); break; \
        case 7: row_dots_##SUFFIX(gates, du, x, UA_TILE < 7 ? UA_TILE : 7, i0, i1, acc, fresh); break; \
        default: row_dots_##SUFFIX(gates, du, x, UA_TILE < 8 ? UA_TILE : 8, i0, i1, acc, fresh); \
    }                                                                                           \
}                                                                                               \
/* Union, phase B: columns [i, i + nv * KLANES) of one row's output held in registers     \
   while its neurons of the block add h[l] * downs[l], l ascending. */                        \
static inline __attribute__((always_inline)) void row_down_##SUFFIX(float* y, const WT* const* downs, \
        const float* h, int n, const int nv, int64_t i) {                                       \
    kvec a0 = kzero(), a1 = kzero(), a2 = kzero(), a3 = kzero();                                \
    kvec a4 = kzero(), a5 = kzero(), a6 = kzero(), a7 = kzero();                                \
    y += i;                                                                                     \
    RW_LOAD(0) RW_LOAD(1) RW_LOAD(2) RW_LOAD(3) RW_LOAD(4) RW_LOAD(5) RW_LOAD(6) RW_LOAD(7)     \
    for (int l = 0; l < n; l++) {                                                               \
        const WT* d = downs[l] + i;                                                             \
        OPAQUE(d);                                                                              \
        kvec hv = kset1(h[l]);                                                                  \
        RW_STEP(0, LOAD) RW_STEP(1, LOAD) RW_STEP(2, LOAD) RW_STEP(3, LOAD)                     \
        RW_STEP(4, LOAD) RW_STEP(5, LOAD) RW_STEP(6, LOAD) RW_STEP(7, LOAD)                     \
    }                                                                                           \
    RW_SAVE(0) RW_SAVE(1) RW_SAVE(2) RW_SAVE(3) RW_SAVE(4) RW_SAVE(5) RW_SAVE(6) RW_SAVE(7)     \
}                                                                                               \
static void row_down_n_##SUFFIX(float* y, const WT* const* downs, const float* h, int n, int nv, \
        int64_t i) {                                                                            \
    switch (nv) {                                                                               \
        case 1: row_down_##SUFFIX(y, downs, h, n, 1, i); break;                                 \
        case 2: row_down_##SUFFIX(y, downs, h, n, 2, i); break;                                 \
        case 3: row_down_##SUFFIX(y, downs, h, n, 3, i); break;                                 \
        case 4: row_down_##SUFFIX(y, downs, h, n, 4, i); break;                                 \
        case 5: row_down_##SUFFIX(y, downs, h, n, UB_VECS < 5 ? UB_VECS : 5, i); break;         \
        case 6: row_down_##SUFFIX(y, downs, h, n, UB_VECS < 6 ? UB_VECS : 6, i); break;         \
        case 7: row_down_##SUFFIX(y, downs, h, n, UB_VECS < 7 ? UB_VECS : 7, i); break;         \
        default: row_down_##SUFFIX(y, downs, h, n, UB_VECS < 8 ? UB_VECS : 8, i);               \
    }                                                                                           \
}                                                                                               \
void griffin_experts_union_##SUFFIX(const float* x, const WT* w_gate, const WT* w_up,           \
        const WT* w_down, int64_t stride, const int64_t* experts, const int64_t* counts,        \
        float* out, int64_t T, int64_t H, int64_t D, int64_t K, int act) {                      \
    const int64_t Hv = H / KLANES * KLANES;                  /* the lanes' part of H */         \
    const ptrdiff_t du = w_up - w_gate;                                                         \
    uint64_t* bits = malloc(sizeof(uint64_t) * (size_t)(D + 1)); /* rows keeping neuron j */    \
    int32_t* used = malloc(sizeof(int32_t) * (size_t)(D + 1));   /* the union, ascending */     \
    const int64_t rows = T < 1 ? 1 : T < U_GROUP ? T : U_GROUP;  /* per pass */                  \
    float* acc = aligned_alloc(64, sizeof(float) * KLANES * 2 * U_BLOCK * rows); /* A's sums */ \
    float* gu = malloc(sizeof(float) * 3 * U_BLOCK * U_GROUP);   /* gate sums, up sums, h */    \
    const WT** rowp = malloc(sizeof(const WT*) * 2 * U_BLOCK * U_GROUP); /* per row: gate, down */ \
    int cnt[U_GROUP], base[U_GROUP];                                                            \
    memset(out, 0, sizeof(float) * (size_t)(T * H));                                            \
    for (int64_t t0 = 0; t0 < T; t0 += U_GROUP) {                                               \
        const int G = T - t0 < U_GROUP ? (int)(T - t0) : U_GROUP;                               \
        const float* xg = x + t0 * H;                                                           \
        float* yg = out + t0 * H;                                                               \
        memset(bits, 0, sizeof(uint64_t) * (size_t)D);                                          \
        for (int r = 0; r < G; r++)                                                             \
            for (int64_t e = 0; e < counts[t0 + r]; e++) bits[experts[(t0 + r) * K + e]] |= 1ull << r; \
        int nu = 0;                                                                             \
        for (int64_t j = 0; j < D; j++)                                                         \
            if (bits[j]) used[nu++] = (int32_t)j;                                               \
        for (int b0 = 0; b0 < nu; b0 += U_BLOCK) {  /* blocks of union neurons, ascending */ \
            const int nb = nu - b0 < U_BLOCK ? nu - b0 : U_BLOCK;                               \
            /* each row's neurons of the block, ascending: gate and down rows */                \
            for (int r = 0; r < G; r++) {                                                       \
                const WT** rp = rowp + 2 * r * U_BLOCK;                                         \
                int c = 0;                                                                      \
                for (int n = 0; n < nb; n++) {                                                  \
                    int64_t j = used[b0 + n];                                                   \
                    if ((bits[j] >> r) & 1) {                                                   \
                        rp[c] = w_gate + j * stride;                                            \
                        rp[U_BLOCK + c] = w_down + j * stride;                                  \
                        c++;                                                                    \
                    }                                                                           \
                }                                                                               \
                cnt[r] = c;                                                                     \
            }                                                                                   \
            /* A: each row's gate and up dots with its neurons, a column chunk at a time */     \
            for (int64_t c0 = 0; c0 < Hv; c0 += U_CHUNK) {                                      \
                const int64_t c1 = c0 + U_CHUNK < Hv ? c0 + U_CHUNK : Hv;                       \
                for (int r = 0; r < G; r++)                                                     \
                    for (int l0 = 0; l0 < cnt[r]; l0 += UA_TILE) {                              \
                        row_dots_n_##SUFFIX(rowp + 2 * r * U_BLOCK + l0, du, xg + r * H,        \
                                            cnt[r] - l0 < UA_TILE ? cnt[r] - l0 : UA_TILE, c0, c1, \
                                            acc + (int64_t)(r * U_BLOCK + l0) * 2 * KLANES, c0 == 0); \
                    }                                                                           \
            }                                                                                   \
            /* ... the lanes' sums, the scalar tail; then h = act(gate) * up for the block's     \
               (row, neuron) pairs at once: pair l of row r at base[r] + l */                   \
            int np = 0;                                                                         \
            for (int r = 0; r < G; r++) {                                                       \
                const float* xr = xg + r * H;                                                   \
                base[r] = np;                                                                   \
                for (int l = 0; l < cnt[r]; l++, np++) {                                        \
                    const float* a = acc + (int64_t)(r * U_BLOCK + l) * 2 * KLANES;             \
                    const WT* gate = rowp[2 * r * U_BLOCK + l];                                 \
                    float gs = ksum(Hv ? kloadx(a) : kzero());                                  \
                    float us = ksum(Hv ? kloadx(a + KLANES) : kzero());                         \
                    for (int64_t k = Hv; k < H; k++) {                                          \
                        gs = fmaf(TOF(gate[k]), xr[k], gs);                                     \
                        us = fmaf(TOF(gate[du + k]), xr[k], us);                                \
                    }                                                                           \
                    gu[np] = gs; gu[U_BLOCK * U_GROUP + np] = us;                               \
                }                                                                               \
            }                                                                                   \
            float* h = gu + 2 * U_BLOCK * U_GROUP;                                              \
            act_mul(gu, gu + U_BLOCK * U_GROUP, h, np, act);                                    \
            /* B: y += h * down, each row's neurons ascending, columns in registers */          \
            int64_t i = 0;                                                                      \
            for (; i < Hv; i += UB_VECS * KLANES) {                                             \
                const int nv = (Hv - i) / KLANES < UB_VECS ? (int)((Hv - i) / KLANES) : UB_VECS; \
                for (int r = 0; r < G; r++)                                                     \
                    if (cnt[r]) {                                                               \
                        row_down_n_##SUFFIX(yg + r * H, rowp + 2 * r * U_BLOCK + U_BLOCK,       \
                                            h + base[r], cnt[r], nv, i);                        \
                    }                                                                           \
            }                                                                                   \
            for (int r = 0; r < G && Hv < H; r++)                                               \
                for (int64_t k = Hv; k < H; k++) {                                              \
                    float y = yg[r * H + k];                                                    \
                    for (int l = 0; l < cnt[r]; l++)                                            \
                        y = fmaf(TOF(rowp[2 * r * U_BLOCK + U_BLOCK + l][k]), h[base[r] + l], y); \
                    yg[r * H + k] = y;                                                          \
                }                                                                               \
        }                                                                                       \
    }                                                                                           \
    free(bits);                                                                                 \
    free(used);                                                                                 \
    free(acc);                                                                                  \
    free(gu);                                                                                   \
    free(rowp);                                                                                 \
}


DEFINE_KERNELS(f32, float, kload_f32, f32_id)
DEFINE_KERNELS(bf16, uint16_t, kload_bf16, bf16_to_f32)

// `gated` decode: each row computes the gates of its pool (the prompt's pick), keeps the
// k pool neurons of largest |act(gate)|, and runs up and down on those alone: pool + 2k
// weight rows per row, the gates computed once. The dot products use the chains of the
// kernels above, so a row's output equals theirs on the same experts, bit for bit, and
// the two orders (rows, union) agree with each other.
//   experts/counts: the pools (sorted ascending); ks[t]: the row's k (<= 0 or >= its
//   count: the whole pool, as for rows of other methods sharing the step).

// Index of the k-th largest of v[0..n) after partially ordering v (quickselect; n > 0).
static float kth_largest(float* v, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1, want = k - 1;
    while (lo < hi) {
        float pivot = v[lo + (hi - lo) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (v[i] > pivot) i++;
            while (v[j] < pivot) j--;
            if (i <= j) { float t = v[i]; v[i] = v[j]; v[j] = t; i++; j--; }
        }
        if (want <= j) hi = j;
        else if (want >= i) lo = i;
        else return v[want];
    }
    return v[want];
}

// chosen[e] = 1 for the k positions of largest score (ties: lower positions first).
static void choose_top(const float* score, int64_t n, int64_t k, float* scratch, uint8_t* chosen) {
    if (k >= n) { memset(chosen, 1, (size_t)n); return; }
    memset(chosen, 0, (size_t)n);
    if (k <= 0) return;
    memcpy(scratch, score, sizeof(float) * (size_t)n);
    float cut = kth_largest(scratch, n, k);
    int64_t above = 0;
    for (int64_t e = 0; e < n; e++) above += score[e] > cut;
    int64_t ties = k - above;
    for (int64_t e = 0; e < n; e++) {
        if (score[e] > cut) chosen[e] = 1;
        else if (score[e] == cut && ties > 0) { chosen[e] = 1; ties--; }
    }
}

static inline float gate_score(float g, int act) {
    float a = fabsf(act_fn(g, act));
    return a != a ? INFINITY : a;  // NaN ranks first, as torch.topk
}

#define DEFINE_GATED(SUFFIX, WT, LOAD, TOF)                                                      \
/* w_n . x for one row and up to four neurons: dots_neurons' chains for one matrix. */         \
static inline __attribute__((always_inline)) void dot_neurons_##SUFFIX(const WT* const* ws, const float* x, int nn, \
                                                                      int64_t H, float* out) {  \
    kvec a[4] = {kzero(), kzero(), kzero(), kzero()};                                            \
    int64_t i = 0;                                                                              \
    for (; i + KLANES <= H; i += KLANES) {                                                        \
        kvec xv = kloadx(x + i);                                                                 \
        for (int n = 0; n < nn; n++) a[n] = kfma(LOAD(ws[n] + i), xv, a[n]);                    \
    }                                                                                           \
    for (int n = 0; n < nn; n++) {                                                              \
        float s = ksum(a[n]);                                                                   \
        for (int64_t k = i; k < H; k++) s = fmaf(TOF(ws[n][k]), x[k], s);                       \
        out[n] = s;                                                                             \
    }                                                                                           \
}                                                                                               \
/* w . x_r for one neuron and up to four rows: dots_rows' chains for one matrix. */             \
static inline __attribute__((always_inline)) void dot_rows_##SUFFIX(const WT* w, const float* const* xs, int nr, \
                                                                   int64_t H, float* out) {     \
    kvec a[4] = {kzero(), kzero(), kzero(), kzero()};                                            \
    int64_t i = 0;                                                                              \
    for (; i + KLANES <= H; i += KLANES) {                                                        \
        kvec wv = LOAD(w + i);                                                                   \
        for (int r = 0; r < nr; r++) a[r] = kfma(wv, kloadx(xs[r] + i), a[r]);                  \
    }                                                                                           \
    for (int r = 0; r < nr; r++) {                                                              \
        float s = ksum(a[r]);                                                                   \
        for (int64_t k = i; k < H; k++) s = fmaf(TOF(w[k]), xs[r][k], s);                       \
        out[r] = s;                                                                             \
    }                                                                                           \
}                                                                                               \
static void dot_neurons_n_##SUFFIX(const WT* const* ws, const float* x, int nn, int64_t H, float* out) { \
    switch (nn) {                                                                               \
        case 4: dot_neurons_##SUFFIX(ws, x, 4, H, out); break;                                  \
        case 3: dot_neurons_##SUFFIX(ws, x, 3, H, out); break;                                  \
        case 2: dot_neurons_##SUFFIX(ws, x, 2, H, out); break;                                  \
        default: dot_neurons_##SUFFIX(ws, x, 1, H, out);                                        \
    }                                                                                           \
}                                                                                               \
static void dot_rows_n_##SUFFIX(const WT* w, const float* const* xs, int nr, int64_t H, float* out) { \
    switch (nr) {                                                                               \
        case 4: dot_rows_##SUFFIX(w, xs, 4, H, out); break;                                     \
        case 3: dot_rows_##SUFFIX(w, xs, 3, H, out); break;                                     \
        case 2: dot_rows_##SUFFIX(w, xs, 2, H, out); break;                                     \
        default: dot_rows_##SUFFIX(w, xs, 1, H, out);                                           \
    }                                                                                           \
}                                                                                               \
void griffin_gated_##SUFFIX(const float* x, const WT* w_gate, const WT* w_up, const WT* w_down, \
        int64_t stride, const int64_t* experts, const int64_t* counts, const int64_t* ks,       \
        float* out, int64_t T, int64_t H, int64_t D, int64_t K, int act, int union_order) {     \
    float* g = malloc(sizeof(float) * (size_t)(T * K + 1));        /* gate of (row, pool pos) */ \
    float* score = malloc(sizeof(float) * (size_t)(K + 1));                                     \
    float* scratch = malloc(sizeof(float) * (size_t)(K + 1));                                   \
    uint8_t* chosen = malloc((size_t)(T * K + 1));                                              \
    /* 1. every row's pool gates */                                                             \
    if (union_order) {                                                                          \
        int32_t* users = calloc((size_t)D, sizeof(int32_t));                                    \
        int64_t* at = malloc(sizeof(int64_t) * (size_t)(D * T));  /* t*K + e, rows ascending */  \
        for (int64_t t = 0; t < T; t++)                                                         \
            for (int64_t e = 0; e < counts[t]; e++) {                                           \
                int64_t j = experts[t * K + e];                                                 \
                at[j * T + users[j]++] = t * K + e;                                             \
            }                                                                                   \
        for (int64_t j = 0; j < D; j++)                                                         \
            for (int32_t first = 0; first < users[j]; first += 4) {                             \
                int nr = users[j] - first < 4 ? users[j] - first : 4;                           \
                const float* xs[4];                                                             \
                float v[4];                                                                     \
                for (int r = 0; r < nr; r++) xs[r] = x + (at[j * T + first + r] / K) * H;       \
                dot_rows_n_##SUFFIX(w_gate + j * stride, xs, nr, H, v);                         \
                for (int r = 0; r < nr; r++) g[at[j * T + first + r]] = v[r];                   \
            }                                                                                   \
        free(users);                                                                            \
        free(at);                                                                               \
    } else {                                                                                    \
        for (int64_t t = 0; t < T; t++)                                                         \
            for (int64_t e = 0; e < counts[t]; e += 4) {                                        \
                int nn = counts[t] - e < 4 ? (int)(counts[t] - e) : 4;                          \
                const WT* ws[4];                                                                \
                for (int n = 0; n < nn; n++) ws[n] = w_gate + experts[t * K + e + n] * stride;  \
                dot_neurons_n_##SUFFIX(ws, x + t * H, nn, H, g + t * K + e);                    \
            }                                                                                   \
    }                                                                                           \
    /* 2. each row's k largest |act(gate)| */                                                   \
    for (int64_t t = 0; t < T; t++) {                                                           \
        for (int64_t e = 0; e < counts[t]; e++) score[e] = gate_score(g[t * K + e], act);       \
        int64_t k = ks[t] <= 0 ? counts[t] : ks[t];                                             \
        choose_top(score, counts[t], k, scratch, chosen + t * K);                               \
    }                                                                                           \
    /* 3. up and down on the chosen, neurons ascending per row */                               \
    memset(out, 0, sizeof(float) * (size_t)(T * H));                                            \
    if (union_order) {                                                                          \
        int32_t* users = calloc((size_t)D, sizeof(int32_t));                                    \
        int64_t* at = malloc(sizeof(int64_t) * (size_t)(D * T));                                \
        for (int64_t t = 0; t < T; t++)                                                         \
            for (int64_t e = 0; e < counts[t]; e++)                                             \
                if (chosen[t * K + e]) {                                                        \
                    int64_t j = experts[t * K + e];                                             \
                    at[j * T + users[j]++] = t * K + e;                                         \
                }                                                                               \
        for (int64_t j = 0; j < D; j++)                                                         \
            for (int32_t first = 0; first < users[j]; first += 4) {                             \
                int nr = users[j] - first < 4 ? users[j] - first : 4;                           \
                const float* xs[4];                                                             \
                float* ys[4];                                                                   \
                float u[4], h[4];                                                               \
                for (int r = 0; r < nr; r++) {                                                  \
                    int64_t t = at[j * T + first + r] / K;                                      \
                    xs[r] = x + t * H; ys[r] = out + t * H;                                     \
                }                                                                               \
                dot_rows_n_##SUFFIX(w_up + j * stride, xs, nr, H, u);                           \
                float gg[4];                                                                    \
                for (int r = 0; r < nr; r++) gg[r] = g[at[j * T + first + r]];                  \
                act_mul(gg, u, h, nr, act);                                                     \
                axpy_rows_n_##SUFFIX(ys, h, nr, w_down + j * stride, H);                        \
            }                                                                                   \
        free(users);                                                                            \
        free(at);                                                                               \
    } else {                                                                                    \
        for (int64_t t = 0; t < T; t++) {                                                       \
            int64_t e = 0;                                                                      \
            while (e < counts[t]) {                                                             \
                const WT *ups[4], *downs[4];                                                    \
                float gs[4], u[4], h[4];                                                        \
                int nn = 0;                                                                     \
                for (; e < counts[t] && nn < 4; e++)                                            \
                    if (chosen[t * K + e]) {                                                    \
                        int64_t j = experts[t * K + e];                                         \
                        ups[nn] = w_up + j * stride; downs[nn] = w_down + j * stride;           \
                        gs[nn++] = g[t * K + e];                                                \
                    }                                                                           \
                if (nn == 0) break;                                                             \
                dot_neurons_n_##SUFFIX(ups, x + t * H, nn, H, u);                               \
                act_mul(gs, u, h, nn, act);                                                     \
                float* y = out + t * H;                                                         \
                axpy_neurons_n_##SUFFIX(y, h, nn, downs, H);                                    \
            }                                                                                   \
        }                                                                                       \
    }                                                                                           \
    free(g);                                                                                    \
    free(score);                                                                                \
    free(scratch);                                                                              \
    free(chosen);                                                                               \
}

DEFINE_GATED(f32, float, kload_f32, f32_id)
DEFINE_GATED(bf16, uint16_t, kload_bf16, bf16_to_f32)

// Prefill: the prompt statistic's per-token contributions, in one pass over z.
//
// Contract (one layer, one rank), as capture_reference in vllm_griffin/ops/reference.py:
//   token m reads row pos[m] of z (row m when pos is NULL; rows z_stride elements apart,
//   D contiguous elements each); n_m = sq_norms[m] when given (tensor parallelism: the
//   norm over every rank's neurons), else sum_j z_j^2; n_m = max(n_m, FLT_MIN) so an
//   all-zero row adds 0 rather than NaN; c_j = z_j^2 / n_m (as z_j^2 * (1/n_m));
//   acc[acc_idx[m]] += c and blk[blk_idx[m]] += c, each skipped when its index is < 0
//   (or its array is NULL). Tokens run in order, so one row's additions never race.
// Token-major: the norm, then the additions while the row is still in L1; no
// [M, D] temporaries (the torch path makes several).

#define DEFINE_CAPTURE(SUFFIX, WT, LOAD, TOF)                                                    \
/* sum_j z_j^2 with four independent 8-lane chains (hides the FMA latency). */                  \
static inline float row_sq_norm_##SUFFIX(const WT* z, int64_t D) {                              \
    vec a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();                                 \
    int64_t j = 0;                                                                              \
    for (; j + 4 * LANES <= D; j += 4 * LANES) {                                                \
        vec v0 = LOAD(z + j), v1 = LOAD(z + j + LANES);                                         \
        vec v2 = LOAD(z + j + 2 * LANES), v3 = LOAD(z + j + 3 * LANES);                         \
        a0 = vfma(v0, v0, a0); a1 = vfma(v1, v1, a1);                                           \
        a2 = vfma(v2, v2, a2); a3 = vfma(v3, v3, a3);                                           \
    }                                                                                           \
    for (; j + LANES <= D; j += LANES) { vec v = LOAD(z + j); a0 = vfma(v, v, a0); }            \
    float s = vsum(vadd(vadd(a0, a1), vadd(a2, a3)));                                           \
    for (; j < D; j++) { float v = TOF(z[j]); s = fmaf(v, v, s); }                              \
    return s;                                                                                   \
}                                                                                               \
void griffin_sq_norms_##SUFFIX(const WT* z, int64_t z_stride, int64_t D, const int64_t* pos,    \
                               int64_t M, float* out) {                                         \
    for (int64_t m = 0; m < M; m++)                                                             \
        out[m] = row_sq_norm_##SUFFIX(z + (pos ? pos[m] : m) * z_stride, D);                    \
}                                                                                               \
void griffin_capture_##SUFFIX(const WT* z, int64_t z_stride, int64_t D, const int64_t* pos,     \
        int64_t M, const float* sq_norms, float* acc, const int64_t* acc_idx, float* blk,       \
        const int64_t* blk_idx) {                                                               \
    for (int64_t m = 0; m < M; m++) {                                                           \
        float* a = (acc && acc_idx[m] >= 0) ? acc + acc_idx[m] * D : NULL;                      \
        float* b = (blk && blk_idx[m] >= 0) ? blk + blk_idx[m] * D : NULL;                      \
        if (!a && !b) continue;                 /* nobody counts this token: skip its norm */  \
        const WT* row = z + (pos ? pos[m] : m) * z_stride;                                      \
        float n = sq_norms ? sq_norms[m] : row_sq_norm_##SUFFIX(row, D);                        \
        if (n < FLT_MIN) n = FLT_MIN;           /* as clamp_min(tiny); NaN stays NaN */         \
        float inv = 1.0f / n;                                                                   \
        vec vinv = vset1(inv);                                                                  \
        int64_t j = 0;                                                                          \
        if (a && b) {                                                                           \
            for (; j + LANES <= D; j += LANES) {                                                \
                vec v = LOAD(row + j), c = vmul(vmul(v, v), vinv);                              \
                vstore(a + j, vadd(vloadx(a + j), c));                                          \
                vstore(b + j, vadd(vloadx(b + j), c));                                          \
            }                                                                                   \
        } else {                                                                                \
            float* t = a ? a : b;                                                               \
            for (; j + LANES <= D; j += LANES) {                                                \
                vec v = LOAD(row + j);                                                          \
                vstore(t + j, vadd(vloadx(t + j), vmul(vmul(v, v), vinv)));                     \
            }                                                                                   \
        }                                                                                       \
        for (; j < D; j++) {                                                                    \
            float v = TOF(row[j]), c = (v * v) * inv;                                           \
            if (a) a[j] += c;                                                                   \
            if (b) b[j] += c;                                                                   \
        }                                                                                       \
    }                                                                                           \
}

// The wrappers check every index before the kernel writes through them (as
// index_add_ would): the first m with idx[m] >= high, or < 0 when negatives are
// not skips; -1 when all are fine. A loop over M ints, cheaper than torch ops.
int64_t griffin_first_bad_index(const int64_t* idx, int64_t M, int64_t high, int negative_skips) {
    for (int64_t m = 0; m < M; m++)
        if (idx[m] >= high || (!negative_skips && idx[m] < 0)) return m;
    return -1;
}

DEFINE_CAPTURE(f32, float, load_f32, f32_id)
DEFINE_CAPTURE(bf16, uint16_t, load_bf16, bf16_to_f32)

// Masked decode path: zero each row's non-experts in place, z[t, j] = 0 where
// masks[slots[t], j] == 0. One pass over z (just written by the activation, so in
// cache) reading the request's one-byte mask row where it lies: no per-step gather
// of masks and no conversion to the activations' dtype. Zeroing (not multiplying)
// leaves non-experts at exactly 0, as the expert kernels never compute them.
#define DEFINE_KEEP(SUFFIX, T)                                                              \
void griffin_keep_rows_##SUFFIX(T* z, int64_t z_stride, const uint8_t* masks,             \
                                int64_t mask_stride, const int64_t* slots, int64_t rows,  \
                                int64_t width) {                                          \
    for (int64_t t = 0; t < rows; t++) {                                                  \
        T* zr = z + t * z_stride;                                                         \
        const uint8_t* m = masks + slots[t] * mask_stride;                               \
        for (int64_t j = 0; j < width; j++) zr[j] = m[j] ? zr[j] : (T)0;                  \
    }                                                                                     \
}
DEFINE_KEEP(f32, float)
DEFINE_KEEP(bf16, uint16_t)

// --- masked decode path, fused with the activation (contract: act_keep_reference) ---
// z[t, j] = act(gate_up[t, j]) * gate_up[t, D + j] where masks[slots[t], j], else 0:
// one pass in place of vLLM's act-and-mul calls plus the zeroing pass (gated_act_*, above).
static inline uint16_t f32_to_bf16(float v) {  // round to nearest even, as torch
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // torch's one NaN
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}
static inline void store_f32(float* p, float v) { *p = v; }
static inline void store_bf16(uint16_t* p, float v) { *p = f32_to_bf16(v); }

#ifdef GRIFFIN_AVX2
static inline void store_lanes_f32(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
static inline void store_lanes_bf16(uint16_t* p, __m256 v) {  // f32_to_bf16 on 8 lanes
    __m256i bits = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i out = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), lsb), 16);
    out = _mm256_blendv_epi8(out, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    out = _mm256_permute4x64_epi64(_mm256_packus_epi32(out, out), 0x08);  // lanes 0-3, 4-7 (all < 2^16)
    _mm_storeu_si128((__m128i*)p, _mm256_castsi256_si128(out));
}
#endif

#ifdef GRIFFIN_AVX2
#define ACT_KEEP_LANES(SUFFIX)                                                                          \
    for (; j + 8 <= width; j += 8) {                                                                    \
        uint64_t bytes;                                                                                 \
        memcpy(&bytes, m + j, 8);                                                                       \
        if (bytes == 0) { /* no expert here: skip the exp */                                          \
            store_lanes_##SUFFIX(zr + j, _mm256_setzero_ps());                                          \
            continue;                                                                                   \
        }                                                                                               \
        __m256 h = gated_act_lanes(load_##SUFFIX(g + j), load_##SUFFIX(u + j), act);                  \
        __m256i keep = _mm256_cmpgt_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(m + j))), \
                                          _mm256_setzero_si256());                                      \
        store_lanes_##SUFFIX(zr + j, _mm256_and_ps(h, _mm256_castsi256_ps(keep)));                     \
    }
#else
#define ACT_KEEP_LANES(SUFFIX)
#endif

#define DEFINE_ACT_KEEP(SUFFIX, T, TO_F32)                                                              \
void griffin_act_keep_##SUFFIX(const T* gate_up, int64_t gu_stride, T* z, int64_t z_stride,           \
                               const uint8_t* masks, int64_t mask_stride, const int64_t* slots,        \
                               int64_t rows, int64_t width, int act) {                                 \
    for (int64_t t = 0; t < rows; t++) {                                                                \
        const T* g = gate_up + t * gu_stride;                                                           \
        const T* u = g + width;                                                                         \
        T* zr = z + t * z_stride;                                                                       \
        const uint8_t* m = masks + slots[t] * mask_stride;                                             \
        int64_t j = 0;                                                                                  \
        ACT_KEEP_LANES(SUFFIX)                                                                          \
        for (; j < width; j++)                                                                          \
            store_##SUFFIX(zr + j, m[j] ? gated_act_scalar(TO_F32(g[j]), TO_F32(u[j]), act) : 0.0f);   \
    }                                                                                                   \
}
DEFINE_ACT_KEEP(f32, float, f32_id)
DEFINE_ACT_KEEP(bf16, uint16_t, bf16_to_f32)

// The same for a step with `gated` rows: row t keeps the ks[t] neurons of its pool
// (masks[slots[t]]) whose |act(gate)| is largest (choose_top), z = act(gate) * up on
// those and 0 elsewhere; ks[t] <= 0 (a row of another method): its whole pool.
#define DEFINE_GATED_ACT_KEEP(SUFFIX, T, TO_F32)                                                        \
void griffin_gated_act_keep_##SUFFIX(const T* gate_up, int64_t gu_stride, T* z, int64_t z_stride,     \
                                     const uint8_t* masks, int64_t mask_stride, const int64_t* slots,  \
                                     const int64_t* ks, int64_t rows, int64_t width, int act) {         \
    float* score = malloc(sizeof(float) * (size_t)(width + 1));                                         \
    float* scratch = malloc(sizeof(float) * (size_t)(width + 1));                                       \
    int64_t* pos = malloc(sizeof(int64_t) * (size_t)(width + 1));                                       \
    uint8_t* chosen = malloc((size_t)(width + 1));                                                      \
    for (int64_t t = 0; t < rows; t++) {                                                                \
        const T* g = gate_up + t * gu_stride;                                                           \
        const T* u = g + width;                                                                         \
        T* zr = z + t * z_stride;                                                                       \
        if (ks[t] <= 0) {                                                                               \
            griffin_act_keep_##SUFFIX(g, gu_stride, zr, z_stride, masks, mask_stride, slots + t, 1,     \
                                      width, act);                                                      \
            continue;                                                                                   \
        }                                                                                               \
        const uint8_t* m = masks + slots[t] * mask_stride;                                             \
        int64_t n = 0;                                                                                  \
        for (int64_t j = 0; j < width; j++)                                                             \
            if (m[j]) { pos[n] = j; score[n++] = gate_score(TO_F32(g[j]), act); }                       \
        choose_top(score, n, ks[t], scratch, chosen);                                                   \
        memset(zr, 0, sizeof(T) * (size_t)width);                                                       \
        for (int64_t e = 0; e < n; e++)                                                                 \
            if (chosen[e])                                                                              \
                store_##SUFFIX(zr + pos[e], gated_act_scalar(TO_F32(g[pos[e]]), TO_F32(u[pos[e]]), act)); \
    }                                                                                                   \
    free(score);                                                                                        \
    free(scratch);                                                                                      \
    free(pos);                                                                                          \
    free(chosen);                                                                                       \
}
DEFINE_GATED_ACT_KEEP(f32, float, f32_id)
DEFINE_GATED_ACT_KEEP(bf16, uint16_t, bf16_to_f32)
