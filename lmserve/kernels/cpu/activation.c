/* silu(gate) * up over the fused [gate | up] projection output of a bf16 MLP (layers/activation.py).

   The roundings of the torch path it replaces, bf16(bf16(silu(g)) * u), with silu(g) = g / (1 + e^-g) in
   float32; e^x is the Cephes polynomial (about 1 ulp), so a result can differ from torch's in a last bit when
   silu(g) lies on a bf16 rounding boundary. */

#include <immintrin.h>
#include <stdint.h>

static inline __m512 widen(__m256i words) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(words), 16));
}

static inline __m512 exp_ps(__m512 x) {
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
    const __m512 ln2_hi = _mm512_set1_ps(0.693359375f), ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-88.0f)), _mm512_set1_ps(88.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, ln2_hi, x);
    r = _mm512_fnmadd_ps(n, ln2_lo, r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

static inline __m512 round_bf16(__m512 x) { return widen((__m256i)_mm512_cvtneps_pbh(x)); }

/* gate_up [t, 2 i] bf16 (row_stride elements apart) -> out [t, i] bf16; i % 16 == 0 (the caller checks) */
void lmserve_silu_and_mul(const uint16_t *gate_up, int row_stride, uint16_t *out, int t, int i) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int row = 0; row < t; row++) {
        const uint16_t *gate = gate_up + (size_t)row * row_stride, *up = gate + i;
        uint16_t *y = out + (size_t)row * i;
        for (int j = 0; j < i; j += 16) {
            __m512 g = widen(_mm256_loadu_si256((const __m256i *)(gate + j)));
            __m512 u = widen(_mm256_loadu_si256((const __m256i *)(up + j)));
            __m512 silu = _mm512_div_ps(g, _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g))));
            _mm256_storeu_si256((__m256i *)(y + j), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(round_bf16(silu), u)));
        }
    }
}
