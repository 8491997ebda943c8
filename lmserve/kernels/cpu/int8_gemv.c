/* The lm_head's few-row GEMV over its int8 copy (models/llama.py: lm_head_int8, per-row scales), float32 logits.

   y[m, n] = scale[n] * sum_k x[m, k] * q[n, k]: q int8 widened to float32 (exact), x bf16 widened once per call,
   float32 fused multiply-adds, 4 output rows per block (independent accumulators, one x load for all), the
   blocks over torch's OpenMP threads. torch's `_weight_int8pack_mm` computes the same sums but rounds the logits
   to bf16 (which ties often for a small model) and runs at ~12 GB/s of the 28 MB SmolLM2 head. */

#include "simd.h"

#define ROWS 4
#define MAX_M 4
#define MAX_K 16384

#define DEFINE_BLOCK(M)                                                                                     \
    static inline void block_##M(const float *x, const int8_t *q, const uint16_t *scales, float *y, int n,     \
                                 int k, int n0) {                                                           \
        __m512 acc[ROWS][M];                                                                                \
        for (int r = 0; r < ROWS; r++)                                                                      \
            for (int m = 0; m < M; m++) acc[r][m] = _mm512_setzero_ps();                                    \
        const int8_t *rows = q + (size_t)n0 * k;                                                            \
        for (int i = 0; i < k; i += 16) {                                                                   \
            _mm_prefetch((const char *)(rows + (size_t)ROWS * k + i * ROWS), _MM_HINT_T0);                  \
            __m512 xv[M];                                                                                   \
            for (int m = 0; m < M; m++) xv[m] = _mm512_loadu_ps(x + (size_t)m * k + i);                     \
            for (int r = 0; r < ROWS; r++) {                                                                \
                __m512 w = _mm512_cvtepi32_ps(                                                              \
                    _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(rows + (size_t)r * k + i))));    \
                for (int m = 0; m < M; m++) acc[r][m] = _mm512_fmadd_ps(w, xv[m], acc[r][m]);               \
            }                                                                                               \
        }                                                                                                   \
        __m128 s = _mm512_castps512_ps128(widen_bf16(_mm256_castsi128_si256(                                \
            _mm_loadl_epi64((const __m128i *)(scales + n0)))));                                             \
        for (int m = 0; m < M; m++)                                                                         \
            _mm_storeu_ps(y + (size_t)m * n + n0,                                                           \
                          _mm_mul_ps(sum_4(acc[0][m], acc[1][m], acc[2][m], acc[3][m]), s));                \
    }

DEFINE_BLOCK(1)
DEFINE_BLOCK(2)
DEFINE_BLOCK(3)
DEFINE_BLOCK(4)

/* x [m_rows, k] bf16, q [n, k] int8, scales [n] bf16 -> y [m_rows, n] float32.
   Needs k % 16 == 0, k <= MAX_K, n % ROWS == 0, 1 <= m_rows <= MAX_M; returns 0, or -1 when not. */
int lmserve_int8_gemv(const uint16_t *x, const int8_t *q, const uint16_t *scales, float *y, int m_rows, int n,
                      int k) {
    if (k % 16 || k > MAX_K || n % ROWS || m_rows < 1 || m_rows > MAX_M) return -1;
    float xf[MAX_M * MAX_K];
    for (int i = 0; i < m_rows * k; i += 16)
        _mm512_storeu_ps(xf + i, widen_bf16(_mm256_loadu_si256((const __m256i *)(x + i))));
#pragma omp parallel for schedule(static)
    for (int n0 = 0; n0 < n; n0 += ROWS) {
        switch (m_rows) {
            case 1: block_1(xf, q, scales, y, n, k, n0); break;
            case 2: block_2(xf, q, scales, y, n, k, n0); break;
            case 3: block_3(xf, q, scales, y, n, k, n0); break;
            default: block_4(xf, q, scales, y, n, k, n0); break;
        }
    }
    return 0;
}
