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
//   union: for each neuron any row uses, its rows are loaded once and applied to up
//          to four rows at a time while they sit in L1 (weight traffic = |union|).
// Both produce the same bits for a row: every (row, neuron) dot product is one
// 8-lane accumulator over H, then a horizontal sum, then the scalar tail; every
// row adds its experts' down rows in ascending neuron order. So a row's output
// never depends on which rows share its step.
// Compiled at first use by vllm_griffin/ops/cpu_kernel.py (cc -O3 -march=native).

#include <float.h>
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

#define DEFINE_KERNELS(SUFFIX, WT, LOAD, TOF)                                                    \
/* g = gate_j . x_t and u = up_j . x_t for one neuron and up to four rows. */                   \
static inline __attribute__((always_inline)) void dots_rows_##SUFFIX(const WT* gate, const WT* up, const float* const* xs,      \
                                      int nr, int64_t H, float* g, float* u) {                   \
    vec ag[4] = {vzero(), vzero(), vzero(), vzero()}, au[4] = {vzero(), vzero(), vzero(), vzero()}; \
    int64_t i = 0;                                                                              \
    for (; i + LANES <= H; i += LANES) {                                                        \
        vec wg = LOAD(gate + i), wu = LOAD(up + i);                                             \
        for (int r = 0; r < nr; r++) {                                                          \
            vec xv = vloadx(xs[r] + i);                                                         \
            ag[r] = vfma(wg, xv, ag[r]);                                                        \
            au[r] = vfma(wu, xv, au[r]);                                                        \
        }                                                                                       \
    }                                                                                           \
    for (int r = 0; r < nr; r++) {                                                              \
        float gs = vsum(ag[r]), us = vsum(au[r]);                                               \
        for (int64_t k = i; k < H; k++) {                                                       \
            gs = fmaf(TOF(gate[k]), xs[r][k], gs);                                              \
            us = fmaf(TOF(up[k]), xs[r][k], us);                                                \
        }                                                                                       \
        g[r] = gs; u[r] = us;                                                                   \
    }                                                                                           \
}                                                                                               \
/* The same dot products for one row and up to four neurons. */                                 \
static inline __attribute__((always_inline)) void dots_neurons_##SUFFIX(const WT* const* gates, const WT* const* ups,          \
                                         const float* x, int nn, int64_t H, float* g, float* u) { \
    vec ag[4] = {vzero(), vzero(), vzero(), vzero()}, au[4] = {vzero(), vzero(), vzero(), vzero()}; \
    int64_t i = 0;                                                                              \
    for (; i + LANES <= H; i += LANES) {                                                        \
        vec xv = vloadx(x + i);                                                                 \
        for (int n = 0; n < nn; n++) {                                                          \
            ag[n] = vfma(LOAD(gates[n] + i), xv, ag[n]);                                        \
            au[n] = vfma(LOAD(ups[n] + i), xv, au[n]);                                          \
        }                                                                                       \
    }                                                                                           \
    for (int n = 0; n < nn; n++) {                                                              \
        float gs = vsum(ag[n]), us = vsum(au[n]);                                               \
        for (int64_t k = i; k < H; k++) {                                                       \
            gs = fmaf(TOF(gates[n][k]), x[k], gs);                                              \
            us = fmaf(TOF(ups[n][k]), x[k], us);                                                \
        }                                                                                       \
        g[n] = gs; u[n] = us;                                                                   \
    }                                                                                           \
}                                                                                               \
/* y_r += h_r * down_j for up to four rows (one neuron). */                                     \
static inline __attribute__((always_inline)) void axpy_rows_##SUFFIX(float* const* ys, const float* h, int nr, const WT* down, \
                                      int64_t H) {                                              \
    int64_t i = 0;                                                                              \
    for (; i + LANES <= H; i += LANES) {                                                        \
        vec w = LOAD(down + i);                                                                 \
        for (int r = 0; r < nr; r++) vstore(ys[r] + i, vfma(w, vset1(h[r]), vloadx(ys[r] + i))); \
    }                                                                                           \
    for (int r = 0; r < nr; r++)                                                                \
        for (int64_t k = i; k < H; k++) ys[r][k] = fmaf(TOF(down[k]), h[r], ys[r][k]);          \
}                                                                                               \
/* y += h_n * down_n for up to four neurons in ascending order (one row). */                    \
static inline __attribute__((always_inline)) void axpy_neurons_##SUFFIX(float* y, const float* h, int nn, const WT* const* downs, \
                                         int64_t H) {                                           \
    int64_t i = 0;                                                                              \
    for (; i + LANES <= H; i += LANES) {                                                        \
        vec acc = vloadx(y + i);                                                                \
        for (int n = 0; n < nn; n++) acc = vfma(LOAD(downs[n] + i), vset1(h[n]), acc);          \
        vstore(y + i, acc);                                                                     \
    }                                                                                           \
    for (int64_t k = i; k < H; k++)                                                             \
        for (int n = 0; n < nn; n++) y[k] = fmaf(TOF(downs[n][k]), h[n], y[k]);                 \
}                                                                                               \
/* The helpers above for a run-time count of 1-4: each case a constant, so the                  \
   compiler keeps the accumulators in registers. */                                             \
static void dots_neurons_n_##SUFFIX(const WT* const* gates, const WT* const* ups, const float* x, int nn,\
                                    int64_t H, float* g, float* u) {                            \
    switch (nn) {                                                                               \
        case 4: dots_neurons_##SUFFIX(gates, ups, x, 4, H, g, u); break;                        \
        case 3: dots_neurons_##SUFFIX(gates, ups, x, 3, H, g, u); break;                        \
        case 2: dots_neurons_##SUFFIX(gates, ups, x, 2, H, g, u); break;                        \
        default: dots_neurons_##SUFFIX(gates, ups, x, 1, H, g, u);                              \
    }                                                                                           \
}                                                                                               \
static void dots_rows_n_##SUFFIX(const WT* gate, const WT* up, const float* const* xs, int nr, int64_t H,\
                                 float* g, float* u) {                                          \
    switch (nr) {                                                                               \
        case 4: dots_rows_##SUFFIX(gate, up, xs, 4, H, g, u); break;                            \
        case 3: dots_rows_##SUFFIX(gate, up, xs, 3, H, g, u); break;                            \
        case 2: dots_rows_##SUFFIX(gate, up, xs, 2, H, g, u); break;                            \
        default: dots_rows_##SUFFIX(gate, up, xs, 1, H, g, u);                                  \
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
            for (int n = 0; n < nn; n++) h[n] = act_fn(g[n], act) * u[n];                       \
            axpy_neurons_n_##SUFFIX(y, h, nn, downs, H);                                        \
        }                                                                                       \
    }                                                                                           \
}                                                                                               \
void griffin_experts_union_##SUFFIX(const float* x, const WT* w_gate, const WT* w_up,           \
        const WT* w_down, int64_t stride, const int64_t* experts, const int64_t* counts,        \
        float* out, int64_t T, int64_t H, int64_t D, int64_t K, int act) {                      \
    /* users[j]: rows using neuron j; rows_of[j*T + n]: which, ascending. */                    \
    int32_t* users = calloc((size_t)D, sizeof(int32_t));                                        \
    int32_t* rows_of = malloc(sizeof(int32_t) * (size_t)D * (size_t)T);                         \
    for (int64_t t = 0; t < T; t++)                                                             \
        for (int64_t e = 0; e < counts[t]; e++) {                                               \
            int64_t j = experts[t * K + e];                                                     \
            rows_of[j * T + users[j]++] = (int32_t)t;                                           \
        }                                                                                       \
    memset(out, 0, sizeof(float) * T * H);                                                      \
    for (int64_t j = 0; j < D; j++) {                                                           \
        for (int32_t first = 0; first < users[j]; first += 4) {                                 \
            int nr = users[j] - first < 4 ? users[j] - first : 4;                               \
            const float* xs[4];                                                                 \
            float* ys[4];                                                                       \
            float g[4], u[4], h[4];                                                             \
            for (int r = 0; r < nr; r++) {                                                      \
                int64_t t = rows_of[j * T + first + r];                                         \
                xs[r] = x + t * H; ys[r] = out + t * H;                                         \
            }                                                                                   \
            const WT *gate = w_gate + j * stride, *up = w_up + j * stride;                      \
            dots_rows_n_##SUFFIX(gate, up, xs, nr, H, g, u);                                    \
            for (int r = 0; r < nr; r++) h[r] = act_fn(g[r], act) * u[r];                       \
            axpy_rows_n_##SUFFIX(ys, h, nr, w_down + j * stride, H);                            \
        }                                                                                       \
    }                                                                                           \
    free(users);                                                                                \
    free(rows_of);                                                                              \
}

DEFINE_KERNELS(f32, float, load_f32, f32_id)
DEFINE_KERNELS(bf16, uint16_t, load_bf16, bf16_to_f32)

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
    vec a[4] = {vzero(), vzero(), vzero(), vzero()};                                            \
    int64_t i = 0;                                                                              \
    for (; i + LANES <= H; i += LANES) {                                                        \
        vec xv = vloadx(x + i);                                                                 \
        for (int n = 0; n < nn; n++) a[n] = vfma(LOAD(ws[n] + i), xv, a[n]);                    \
    }                                                                                           \
    for (int n = 0; n < nn; n++) {                                                              \
        float s = vsum(a[n]);                                                                   \
        for (int64_t k = i; k < H; k++) s = fmaf(TOF(ws[n][k]), x[k], s);                       \
        out[n] = s;                                                                             \
    }                                                                                           \
}                                                                                               \
/* w . x_r for one neuron and up to four rows: dots_rows' chains for one matrix. */             \
static inline __attribute__((always_inline)) void dot_rows_##SUFFIX(const WT* w, const float* const* xs, int nr, \
                                                                   int64_t H, float* out) {     \
    vec a[4] = {vzero(), vzero(), vzero(), vzero()};                                            \
    int64_t i = 0;                                                                              \
    for (; i + LANES <= H; i += LANES) {                                                        \
        vec wv = LOAD(w + i);                                                                   \
        for (int r = 0; r < nr; r++) a[r] = vfma(wv, vloadx(xs[r] + i), a[r]);                  \
    }                                                                                           \
    for (int r = 0; r < nr; r++) {                                                              \
        float s = vsum(a[r]);                                                                   \
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
                for (int r = 0; r < nr; r++) h[r] = act_fn(g[at[j * T + first + r]], act) * u[r]; \
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
                for (int n = 0; n < nn; n++) h[n] = act_fn(gs[n], act) * u[n];                  \
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

DEFINE_GATED(f32, float, load_f32, f32_id)
DEFINE_GATED(bf16, uint16_t, load_bf16, bf16_to_f32)

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
// one pass in place of vLLM's act-and-mul calls plus the zeroing pass. SiLU and the
// GELU tanh form are both g * sigmoid(a) (a = g, or a = 2 * sqrt(2/pi) * (g + 0.044715 g^3)),
// with exp from a range reduction and a degree-7 polynomial (Cephes' expf,
// within 2 ulp). The lane code and the scalar code do the same IEEE operations in
// the same order, so a value's bits do not depend on its column or on AVX2.
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
    x = fminf(fmaxf(x, EXP_LO), EXP_HI);  // NaN stays NaN below: fmaf/arith propagate it
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
static inline uint16_t f32_to_bf16(float v) {  // round to nearest even, as torch
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // torch's one NaN
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}
static inline void store_f32(float* p, float v) { *p = v; }
static inline void store_bf16(uint16_t* p, float v) { *p = f32_to_bf16(v); }

#ifdef GRIFFIN_AVX2
static inline __m256 exp_lanes(__m256 x) {
    // max/min return their second operand for NaN, so NaN passes through like fminf/fmaxf.
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
