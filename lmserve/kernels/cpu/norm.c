/* The CPU residual stream's add + RMSNorm in one call (layers/norm.py: RMSNorm.add_forward).

   residual_out = residual_in + x (float32; residual_in float32 or bf16), out = bf16(residual_out * inv * w) with
   inv = 1 / sqrt(mean(residual_out^2) + eps): torch's F.rms_norm in float32, rounded once to bf16 (nearest
   even). The sum of squares runs in 16 float32 lanes, so the last bit of inv can differ from torch's. */

#include <math.h>

#include "kernels.h"
#include "simd.h"

static inline __m512 load_bf16(__mmask16 mask, const uint16_t *p) {
    return widen_bf16(_mm256_maskz_loadu_epi16(mask, p));
}

/* one row of x [h] bf16; residual_in [h] float32 (residual_is_f32) or bf16; residual_out [h] float32 (may be
   residual_in); w [h] float32 -> out [h] bf16 */
static void add_rms_norm_row(const uint16_t *x, const void *residual_in, int residual_is_f32, float *residual_out,
                             const float *w, uint16_t *out, int h, float eps) {
    __m512 squares = _mm512_setzero_ps();
    for (int i = 0; i < h; i += 16) {
        __mmask16 mask = tail_mask(h - i);
        __m512 r = residual_is_f32 ? _mm512_maskz_loadu_ps(mask, (const float *)residual_in + i)
                                   : load_bf16(mask, (const uint16_t *)residual_in + i);
        r = _mm512_add_ps(r, load_bf16(mask, x + i));
        _mm512_mask_storeu_ps(residual_out + i, mask, r);
        squares = _mm512_fmadd_ps(r, r, squares);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(squares) / (float)h + eps));
    for (int i = 0; i < h; i += 16) {
        __mmask16 mask = tail_mask(h - i);
        __m512 r = _mm512_maskz_loadu_ps(mask, residual_out + i);
        __m512 normed = _mm512_mul_ps(_mm512_mul_ps(r, inv), _mm512_maskz_loadu_ps(mask, w + i));
        _mm256_mask_storeu_epi16(out + i, mask, (__m256i)_mm512_cvtneps_pbh(normed));
    }
}

static inline const void *row_of(const void *residual_in, int residual_is_f32, size_t base) {
    return residual_is_f32 ? (const void *)((const float *)residual_in + base)
                           : (const void *)((const uint16_t *)residual_in + base);
}

/* Inside a parallel region: the rows split over the team. */
void lmserve_add_rms_norm_part(const uint16_t *x, const void *residual_in, int residual_is_f32,
                               float *residual_out, const float *w, uint16_t *out, int m, int h, float eps) {
#pragma omp for schedule(static)
    for (int row = 0; row < m; row++) {
        const size_t base = (size_t)row * h;
        add_rms_norm_row(x + base, row_of(residual_in, residual_is_f32, base), residual_is_f32,
                         residual_out + base, w, out + base, h, eps);
    }
}

/* x [m, h] bf16; residual_in [m, h] float32 (residual_is_f32) or bf16; residual_out [m, h] float32 (may be
   residual_in); w [h] float32 -> out [m, h] bf16. One thread: a decode step's rows are a few hundred values. */
void lmserve_add_rms_norm(const uint16_t *x, const void *residual_in, int residual_is_f32, float *residual_out,
                          const float *w, uint16_t *out, int m, int h, float eps) {
    for (int row = 0; row < m; row++) {
        const size_t base = (size_t)row * h;
        add_rms_norm_row(x + base, row_of(residual_in, residual_is_f32, base), residual_is_f32,
                         residual_out + base, w, out + base, h, eps);
    }
}
