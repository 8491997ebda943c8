/* 4-bit GEMV for few bf16 rows on AVX512-BF16 CPUs (Zen 4, Sapphire Rapids and later).

   y[m, n] = sum_k x[m, k] * w[n, k],  w[n, k] = d[n, g] * q[n, k] + l[n, g],  g = k / 32, q in 0..15
   (llama.cpp's Q4_1 values; d and l in float16, as Q4_1 stores them).

   Layout (lmserve/kernels/cpu_native.py: pack_q4 writes it), 0.625 bytes per weight like torch's int4 kernel:
   - qs: rows in blocks of 4; per block, per 64 inputs (groups A and B), the 4 rows' 32 bytes one after the
     other (one sequential stream per block), byte i = q[A, i] | q[B, i] << 4;
   - d, l: [n, k / 32] float16.
   The kernel widens 32 bytes to 32 16-bit words and makes each nibble a bf16 word in one op: 0x4000 | q is the
   bf16 number 2 + q / 64, exactly (a ternary-logic op for A's low nibbles, a double shift for B's high ones).
   vdpbf16ps multiplies 32 bf16 pairs into 16 float32 lanes; the products (2 + q / 64) * x are exact in
   float32. With S_g the sum of x over group g:
       y = 64 * sum_g d_g * dot_g + sum_g l_g * S_g - 128 * sum_g d_g * S_g.
   Row blocks are split over the OpenMP threads of the process (torch's pool: the library binds to the libgomp
   torch already loaded). */

#include "kernels.h"
#include "simd.h"

#define ROWS 4 /* output rows per block: independent accumulators, one x load for all */
#define MAX_M LMSERVE_MAX_ROWS
#define MAX_K LMSERVE_MAX_K
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 2048 /* how far ahead of the block's weight stream the next lines are requested */
#endif

/* S[m, g] = sum of x[m, 32 g .. 32 g + 31] in float32 (the GEMM's too) */
void lmserve_group_sums(const uint16_t *x, float *sums, int m_rows, int k) {
    int groups = k / 32;
    for (int m = 0; m < m_rows; m++) {
        for (int g = 0; g < groups; g++) {
            const uint16_t *p = x + (size_t)m * k + (size_t)g * 32;
            __m512 lo = widen_bf16(_mm256_loadu_si256((const __m256i *)p));
            __m512 hi = widen_bf16(_mm256_loadu_si256((const __m256i *)(p + 16)));
            sums[m * groups + g] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
        }
    }
}

/* float16 [count] -> float32 [count] */
static inline void widen_f16(const uint16_t *half, float *out, int count) {
    for (int i = 0; i < count; i += 16) {
        __mmask16 mask = tail_mask(count - i);
        __m256i h = _mm256_maskz_loadu_epi16(mask, half + i);
        _mm512_mask_storeu_ps(out + i, mask, _mm512_cvtph_ps(h));
    }
}

#define DEFINE_BLOCK(M)                                                                                     \
    static inline void block_##M(const uint16_t *x, const uint8_t *qs, const uint16_t *d16,                  \
                                 const uint16_t *l16, const float *sums, uint16_t *y, int n, int k, int n0) { \
        const int groups = k / 32, chunks = k / 64;                                                         \
        const __m512i low_mask = _mm512_set1_epi16(0x000f), exponent = _mm512_set1_epi16(0x4000);           \
        const __m512i exponent_high = _mm512_set1_epi16(0x0004);                                            \
        const __m512 zero = _mm512_setzero_ps();                                                            \
        const uint8_t *stream = qs + (size_t)n0 * (k / 2); /* this block's ROWS rows, chunk-interleaved */   \
        float d[ROWS * MAX_K / 32], l[ROWS * MAX_K / 32];                                                   \
        widen_f16(d16 + (size_t)n0 * groups, d, ROWS * groups);                                                 \
        widen_f16(l16 + (size_t)n0 * groups, l, ROWS * groups);                                                 \
        __m512 acc[ROWS][M];                                                                                \
        for (int r = 0; r < ROWS; r++)                                                                      \
            for (int m = 0; m < M; m++) acc[r][m] = zero;                                                   \
        for (int c = 0; c < chunks; c++) {                                                                  \
            const uint8_t *chunk = stream + (size_t)c * 32 * ROWS;                                          \
            _mm_prefetch((const char *)(chunk + PREFETCH_BYTES), _MM_HINT_T0);                              \
            _mm_prefetch((const char *)(chunk + PREFETCH_BYTES + 64), _MM_HINT_T0);                         \
            __m512bh xa[M], xb[M];                                                                          \
            for (int m = 0; m < M; m++) {                                                                   \
                const uint16_t *p = x + (size_t)m * k + (size_t)c * 64;                                     \
                xa[m] = (__m512bh)_mm512_loadu_si512((const void *)p);                                      \
                xb[m] = (__m512bh)_mm512_loadu_si512((const void *)(p + 32));                               \
            }                                                                                               \
            for (int r = 0; r < ROWS; r++) {                                                                \
                __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(chunk + 32 * r))); \
                /* (bytes & 0x000f) | 0x4000, and (bytes >> 4) | 0x0004 << 12 */                             \
                __m512bh wa = (__m512bh)_mm512_ternarylogic_epi32(bytes, low_mask, exponent, 0xea);         \
                __m512bh wb = (__m512bh)_mm512_shrdi_epi16(bytes, exponent_high, 4);                        \
                __m512 da = _mm512_set1_ps(d[r * groups + 2 * c]);                                          \
                __m512 db = _mm512_set1_ps(d[r * groups + 2 * c + 1]);                                      \
                for (int m = 0; m < M; m++) {                                                               \
                    acc[r][m] = _mm512_fmadd_ps(_mm512_dpbf16_ps(zero, wa, xa[m]), da, acc[r][m]);          \
                    acc[r][m] = _mm512_fmadd_ps(_mm512_dpbf16_ps(zero, wb, xb[m]), db, acc[r][m]);          \
                }                                                                                           \
            }                                                                                               \
        }                                                                                                   \
        /* 64 * acc + sum_g (l_g - 128 d_g) S_g, 16 groups at a time, before the horizontal sums */          \
        const __m512 sixty_four = _mm512_set1_ps(64.0f), minus_128 = _mm512_set1_ps(-128.0f);               \
        for (int r = 0; r < ROWS; r++)                                                                      \
            for (int m = 0; m < M; m++) acc[r][m] = _mm512_mul_ps(acc[r][m], sixty_four);                   \
        for (int g = 0; g < groups; g += 16) {                                                              \
            __mmask16 mask = tail_mask(groups - g);                                                         \
            for (int r = 0; r < ROWS; r++) {                                                                \
                __m512 dv = _mm512_maskz_loadu_ps(mask, d + r * groups + g);                                \
                __m512 lv = _mm512_fmadd_ps(dv, minus_128, _mm512_maskz_loadu_ps(mask, l + r * groups + g)); \
                for (int m = 0; m < M; m++)                                                                 \
                    acc[r][m] = _mm512_fmadd_ps(lv, _mm512_maskz_loadu_ps(mask, sums + m * groups + g), acc[r][m]); \
            }                                                                                               \
        }                                                                                                   \
        for (int m = 0; m < M; m++) {                                                                       \
            __m128bh out = _mm_cvtneps_pbh(sum_4(acc[0][m], acc[1][m], acc[2][m], acc[3][m]));              \
            _mm_storel_epi64((__m128i *)(y + (size_t)m * n + n0), (__m128i)out);                            \
        }                                                                                                   \
    }

DEFINE_BLOCK(1)
DEFINE_BLOCK(2)
DEFINE_BLOCK(3)
DEFINE_BLOCK(4)

int lmserve_q4_gemv_shape_ok(int m_rows, int n, int k) {
    return k % 64 == 0 && k <= MAX_K && n % ROWS == 0 && m_rows >= 1 && m_rows <= MAX_M;
}

/* Inside a parallel region: each thread sums x's groups itself (k / 32 sums a row, no barrier needed), then
   the row blocks are split. */
void lmserve_q4_gemv_part(const uint16_t *x, const uint8_t *qs, const uint16_t *d, const uint16_t *l,
                          uint16_t *y, int m_rows, int n, int k) {
    float sums[MAX_M * MAX_K / 32];
    lmserve_group_sums(x, sums, m_rows, k);
#pragma omp for schedule(static)
    for (int n0 = 0; n0 < n; n0 += ROWS) {
        switch (m_rows) {
            case 1: block_1(x, qs, d, l, sums, y, n, k, n0); break;
            case 2: block_2(x, qs, d, l, sums, y, n, k, n0); break;
            case 3: block_3(x, qs, d, l, sums, y, n, k, n0); break;
            default: block_4(x, qs, d, l, sums, y, n, k, n0); break;
        }
    }
}

/* x [m_rows, k] bf16, qs [n / ROWS, 2 k] (pack_q4's order), d and l [n, k / 32] float16 -> y [m_rows, n] bf16.
   Needs k % 64 == 0, k <= MAX_K, n % ROWS == 0, 1 <= m_rows <= MAX_M (the caller checks); 0, or -1 when not. */
int lmserve_q4_gemv(const uint16_t *x, const uint8_t *qs, const uint16_t *d, const uint16_t *l, uint16_t *y,
                    int m_rows, int n, int k) {
    if (!lmserve_q4_gemv_shape_ok(m_rows, n, k)) return -1;
#pragma omp parallel
    lmserve_q4_gemv_part(x, qs, d, l, y, m_rows, n, k);
    return 0;
}
