/* silu(gate) * up over the fused [gate | up] projection output of a bf16 MLP (layers/activation.py).

   The roundings of the torch path it replaces, bf16(bf16(silu(g)) * u), with silu(g) = g / (1 + e^-g) in
   float32; e^x is the Cephes polynomial (about 1 ulp), so a result can differ from torch's in a last bit when
   silu(g) lies on a bf16 rounding boundary. */

#include "kernels.h"
#include "simd.h"

static inline void silu_and_mul_16(const uint16_t *gate, const uint16_t *up, uint16_t *y) {
    const __m512 one = _mm512_set1_ps(1.0f);
    __m512 g = widen_bf16(_mm256_loadu_si256((const __m256i *)gate));
    __m512 u = widen_bf16(_mm256_loadu_si256((const __m256i *)up));
    __m512 silu = _mm512_div_ps(g, _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g))));
    _mm256_storeu_si256((__m256i *)y, (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(round_bf16(silu), u)));
}

/* Inside a parallel region: the rows' 16-column pieces split over the team. */
void lmserve_silu_and_mul_part(const uint16_t *gate_up, int row_stride, uint16_t *out, int t, int i) {
    const int pieces = i / 16;
#pragma omp for schedule(static)
    for (int task = 0; task < t * pieces; task++) {
        const int row = task / pieces, j = (task % pieces) * 16;
        const uint16_t *gate = gate_up + (size_t)row * row_stride;
        silu_and_mul_16(gate + j, gate + i + j, out + (size_t)row * i + j);
    }
}

/* gate_up [t, 2 i] bf16 (row_stride elements apart) -> out [t, i] bf16; i % 16 == 0 (the caller checks) */
void lmserve_silu_and_mul(const uint16_t *gate_up, int row_stride, uint16_t *out, int t, int i) {
    for (int row = 0; row < t; row++) {
        const uint16_t *gate = gate_up + (size_t)row * row_stride;
        for (int j = 0; j < i; j += 16) silu_and_mul_16(gate + j, gate + i + j, out + (size_t)row * i + j);
    }
}
