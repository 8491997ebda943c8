/* 4-bit GEMM for 5-16 bf16 rows on AVX512-BF16 CPUs: a decode step of several sequences.

   y[r, n] = sum_k x[r, k] * w[n, k],  w[n, k] = d[n, g] * q[n, k] + l[n, g],  g = k / 32 (llama.cpp's Q4_1).

   At one to four rows the GEMV (q4_gemv.c) streams the weights; at 16 rows a decode step is bound by
   arithmetic as much as by memory, and oneDNN's bf16 GEMM reads 3.2x the bytes of the 4-bit weights. Here the
   output features sit on the vector lanes (16 per register), so no horizontal sums: each register of unpacked
   weights holds 16 outputs x 2 inputs as bf16 pairs, and vdpbf16ps multiplies it with one row's pair of inputs
   broadcast, for every row of a pass (up to 8, their sums in registers).

   Layout (cpu_native.pack_q4_panels): per panel of 16 outputs, per 4 consecutive inputs k .. k + 3, 32 bytes:
   byte 2 j + e = q[n_j, k + e] | q[n_j, k + 2 + e] << 4 (j < 16, e < 2), so one 16-bit widening and one
   ternary-logic op give the bf16 words 0x4000 | q = 2 + q / 64 (exact) of inputs k, k + 1, and a double shift
   those of k + 2, k + 3; d and l float16 [panel][group][16]. As in the GEMV,
       y = sum_g 64 d_g * dot_g + sum_g (l_g - 128 d_g) * S_g,   S_g = the sum of x over group g. */

#include "kernels.h"
#include "simd.h"

#define PANEL 16    /* outputs per panel: one register's lanes */
#define MAX_PASS 8  /* rows per pass: 2 x 8 accumulators in registers */
#define MAX_M 16
#define MAX_K LMSERVE_MAX_K

#define DEFINE_PASS(R)                                                                                      \
    static inline void pass_##R(const uint16_t *x, const float *sums, const uint8_t *stream,                  \
                                const uint16_t *d16, const uint16_t *l16, uint16_t *y, int n, int k, int n0) { \
        const int groups = k / 32;                                                                          \
        const __m512i low_mask = _mm512_set1_epi16(0x000f), exponent = _mm512_set1_epi16(0x4000);           \
        const __m512i exponent_high = _mm512_set1_epi16(0x0004);                                            \
        const __m512 sixty_four = _mm512_set1_ps(64.0f), minus_128 = _mm512_set1_ps(-128.0f);               \
        __m512 total[R];                                                                                    \
        for (int r = 0; r < R; r++) total[r] = _mm512_setzero_ps();                                         \
        for (int g = 0; g < groups; g++) {                                                                  \
            const uint8_t *quads = stream + (size_t)g * 8 * 32;                                             \
            __m512 acc[R];                                                                                  \
            for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();                                       \
            for (int quad = 0; quad < 8; quad++) {                                                          \
                __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(quads + 32 * quad))); \
                __m512bh w01 = (__m512bh)_mm512_ternarylogic_epi32(bytes, low_mask, exponent, 0xea);        \
                __m512bh w23 = (__m512bh)_mm512_shrdi_epi16(bytes, exponent_high, 4);                      \
                const uint16_t *xk = x + (size_t)g * 32 + 4 * quad;                                          \
                for (int r = 0; r < R; r++) {                                                               \
                    const int32_t *pairs = (const int32_t *)(xk + (size_t)r * k);                           \
                    acc[r] = _mm512_dpbf16_ps(acc[r], w01, (__m512bh)_mm512_set1_epi32(pairs[0]));          \
                    acc[r] = _mm512_dpbf16_ps(acc[r], w23, (__m512bh)_mm512_set1_epi32(pairs[1]));          \
                }                                                                                           \
            }                                                                                               \
            const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(d16 + (size_t)g * PANEL))); \
            const __m512 scaled = _mm512_mul_ps(dv, sixty_four);                                            \
            for (int r = 0; r < R; r++) total[r] = _mm512_fmadd_ps(acc[r], scaled, total[r]);               \
        }                                                                                                   \
        for (int g = 0; g < groups; g++) {                                                                  \
            const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(d16 + (size_t)g * PANEL))); \
            const __m512 lv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(l16 + (size_t)g * PANEL))); \
            const __m512 offset = _mm512_fmadd_ps(dv, minus_128, lv);                                       \
            for (int r = 0; r < R; r++)                                                                     \
                total[r] = _mm512_fmadd_ps(_mm512_set1_ps(sums[r * groups + g]), offset, total[r]);         \
        }                                                                                                   \
        for (int r = 0; r < R; r++)                                                                         \
            _mm256_storeu_si256((__m256i *)(y + (size_t)r * n + n0), (__m256i)_mm512_cvtneps_pbh(total[r]));  \
    }

DEFINE_PASS(1)
DEFINE_PASS(2)
DEFINE_PASS(3)
DEFINE_PASS(4)
DEFINE_PASS(5)
DEFINE_PASS(6)
DEFINE_PASS(7)
DEFINE_PASS(8)

static inline void run_pass(int rows, const uint16_t *x, const float *sums, const uint8_t *stream,
                            const uint16_t *d16, const uint16_t *l16, uint16_t *y, int n, int k, int n0) {
    switch (rows) {
        case 1: pass_1(x, sums, stream, d16, l16, y, n, k, n0); break;
        case 2: pass_2(x, sums, stream, d16, l16, y, n, k, n0); break;
        case 3: pass_3(x, sums, stream, d16, l16, y, n, k, n0); break;
        case 4: pass_4(x, sums, stream, d16, l16, y, n, k, n0); break;
        case 5: pass_5(x, sums, stream, d16, l16, y, n, k, n0); break;
        case 6: pass_6(x, sums, stream, d16, l16, y, n, k, n0); break;
        case 7: pass_7(x, sums, stream, d16, l16, y, n, k, n0); break;
        default: pass_8(x, sums, stream, d16, l16, y, n, k, n0); break;
    }
}

int lmserve_q4_gemm_shape_ok(int m_rows, int n, int k) {
    return k % 32 == 0 && k <= MAX_K && n % PANEL == 0 && m_rows >= 1 && m_rows <= MAX_M;
}

/* Inside a parallel region: each thread sums x's groups itself, then the panels are split; every panel runs
   its rows in passes of up to 8 (the second pass finds the panel's bytes in L1). */
void lmserve_q4_gemm_part(const uint16_t *x, const uint8_t *qs, const uint16_t *d, const uint16_t *l, uint16_t *y,
                          int m_rows, int n, int k) {
    const int groups = k / 32;
    float sums[MAX_M * MAX_K / 32];
    lmserve_group_sums(x, sums, m_rows, k);
#pragma omp for schedule(static)
    for (int panel = 0; panel < n / PANEL; panel++) {
        const uint8_t *stream = qs + (size_t)panel * PANEL * (k / 2);
        const uint16_t *d16 = d + (size_t)panel * groups * PANEL, *l16 = l + (size_t)panel * groups * PANEL;
        for (int r0 = 0; r0 < m_rows; r0 += MAX_PASS) {
            const int rows = m_rows - r0 < MAX_PASS ? m_rows - r0 : MAX_PASS;
            run_pass(rows, x + (size_t)r0 * k, sums + r0 * groups, stream, d16, l16, y + (size_t)r0 * n, n, k,
                     panel * PANEL);
        }
    }
}

/* x [m_rows, k] bf16, qs [n / 16, 8 k] (pack_q4_panels' order), d and l [n / 16, k / 32, 16] float16 ->
   y [m_rows, n] bf16. Needs k % 32 == 0, k <= MAX_K, n % 16 == 0, 1 <= m_rows <= 16; 0, or -1 when not. */
int lmserve_q4_gemm(const uint16_t *x, const uint8_t *qs, const uint16_t *d, const uint16_t *l, uint16_t *y,
                    int m_rows, int n, int k) {
    if (!lmserve_q4_gemm_shape_ok(m_rows, n, k)) return -1;
#pragma omp parallel
    lmserve_q4_gemm_part(x, qs, d, l, y, m_rows, n, k);
    return 0;
}
