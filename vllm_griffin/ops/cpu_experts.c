// CPU decode kernel: each row runs only its own experts, reading only their weights.
//
// Contract (one layer, one rank) as vllm_griffin/ops/reference.py:
//   x [T, H] float32, w_gate_up [2D, H] and w_down_t [D, H] (float32 or bfloat16),
//   experts [T, K] int64 sorted ascending per row, counts [T] int64, out [T, H] float32.
//
// Two loop orders, bitwise identical per row (every row sums its experts in
// ascending neuron order with the same dot/axpy code):
//   * rows:  for each row, for each of its experts: 3 weight rows streamed once per row.
//   * union: for each neuron any row uses, load its 3 weight rows once and serve every
//            row that has it while they sit in L1/L2: weight traffic = |union| rows.
// Compiled at first use by vllm_griffin/ops/cpu_kernel.py (gcc -O3 -march=native).

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

#ifdef GRIFFIN_AVX2
static inline __m256 load8_f32(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 load8_bf16(const uint16_t* p) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

// DEFINE(SUFFIX, weight type, 8-lane loader, scalar converter)
#ifdef GRIFFIN_AVX2
#define DOT2_BODY(LOAD8, TOF)                                                          \
    __m256 g0 = _mm256_setzero_ps(), g1 = _mm256_setzero_ps();                         \
    __m256 u0 = _mm256_setzero_ps(), u1 = _mm256_setzero_ps();                         \
    int64_t i = 0;                                                                     \
    for (; i + 16 <= H; i += 16) {                                                     \
        __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);           \
        g0 = _mm256_fmadd_ps(LOAD8(gate + i), x0, g0);                                 \
        g1 = _mm256_fmadd_ps(LOAD8(gate + i + 8), x1, g1);                             \
        u0 = _mm256_fmadd_ps(LOAD8(up + i), x0, u0);                                   \
        u1 = _mm256_fmadd_ps(LOAD8(up + i + 8), x1, u1);                               \
    }                                                                                  \
    float g = hsum8(_mm256_add_ps(g0, g1)), u = hsum8(_mm256_add_ps(u0, u1));          \
    for (; i < H; i++) { g += TOF(gate[i]) * x[i]; u += TOF(up[i]) * x[i]; }           \
    *g_out = g; *u_out = u;
#define AXPY_BODY(LOAD8, TOF)                                                          \
    __m256 hv = _mm256_set1_ps(h);                                                     \
    int64_t i = 0;                                                                     \
    for (; i + 8 <= H; i += 8)                                                         \
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(LOAD8(w + i), hv, _mm256_loadu_ps(y + i))); \
    for (; i < H; i++) y[i] += h * TOF(w[i]);
#else
#define DOT2_BODY(LOAD8, TOF)                                                          \
    float g = 0.0f, u = 0.0f;                                                          \
    for (int64_t i = 0; i < H; i++) { g += TOF(gate[i]) * x[i]; u += TOF(up[i]) * x[i]; } \
    *g_out = g; *u_out = u;
#define AXPY_BODY(LOAD8, TOF)                                                          \
    for (int64_t i = 0; i < H; i++) y[i] += h * TOF(w[i]);
#endif

#define DEFINE_KERNELS(SUFFIX, WT, LOAD8, TOF)                                          \
static inline void dot2_##SUFFIX(const WT* gate, const WT* up, const float* x, int64_t H, \
                                 float* g_out, float* u_out) { DOT2_BODY(LOAD8, TOF) }   \
static inline void axpy_##SUFFIX(float* y, float h, const WT* w, int64_t H) {           \
    AXPY_BODY(LOAD8, TOF)                                                               \
}                                                                                       \
void griffin_experts_rows_##SUFFIX(const float* x, const WT* w_gate_up, const WT* w_down_t, \
        const int64_t* experts, const int64_t* counts, float* out,                      \
        int64_t T, int64_t H, int64_t D, int64_t K, int act) {                          \
    for (int64_t t = 0; t < T; t++) {                                                   \
        const float* xt = x + t * H;                                                    \
        float* y = out + t * H;                                                         \
        memset(y, 0, sizeof(float) * H);                                                \
        for (int64_t e = 0; e < counts[t]; e++) {                                       \
            int64_t j = experts[t * K + e];                                             \
            float g, u;                                                                 \
            dot2_##SUFFIX(w_gate_up + j * H, w_gate_up + (D + j) * H, xt, H, &g, &u);   \
            axpy_##SUFFIX(y, act_fn(g, act) * u, w_down_t + j * H, H);                  \
        }                                                                               \
    }                                                                                   \
}                                                                                       \
void griffin_experts_union_##SUFFIX(const float* x, const WT* w_gate_up, const WT* w_down_t, \
        const int64_t* experts, const int64_t* counts, float* out,                      \
        int64_t T, int64_t H, int64_t D, int64_t K, int act) {                          \
    /* users[j]: how many rows use neuron j; rows_of[j*T + n]: which ones, ascending. */ \
    int32_t* users = calloc((size_t)D, sizeof(int32_t));                                \
    int32_t* rows_of = malloc(sizeof(int32_t) * (size_t)D * (size_t)T);                 \
    for (int64_t t = 0; t < T; t++)                                                     \
        for (int64_t e = 0; e < counts[t]; e++) {                                       \
            int64_t j = experts[t * K + e];                                             \
            rows_of[j * T + users[j]++] = (int32_t)t;                                   \
        }                                                                               \
    memset(out, 0, sizeof(float) * T * H);                                              \
    for (int64_t j = 0; j < D; j++) {                                                   \
        for (int32_t n = 0; n < users[j]; n++) {                                        \
            int64_t t = rows_of[j * T + n];                                             \
            float g, u;                                                                 \
            dot2_##SUFFIX(w_gate_up + j * H, w_gate_up + (D + j) * H, x + t * H, H, &g, &u); \
            axpy_##SUFFIX(out + t * H, act_fn(g, act) * u, w_down_t + j * H, H);        \
        }                                                                               \
    }                                                                                   \
    free(users);                                                                        \
    free(rows_of);                                                                      \
}

DEFINE_KERNELS(f32, float, load8_f32, f32_id)
DEFINE_KERNELS(bf16, uint16_t, load8_bf16, bf16_to_f32)
