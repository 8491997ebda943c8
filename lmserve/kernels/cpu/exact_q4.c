/* Whether a float32 weight is exactly 4-bit per group of 32 (GGUF Q4_1 dequantized), and its codes, in one pass
   (layers/linear.py: exact_int4 computes the same in ~10 torch passes, ~0.7 s of a first start for SmolLM2).

   Per group: low = min, scale = (max - min) / 15, code = round_half_even((w - low) / max(scale, 1e-30))
   clamped to 0..15; exact when every |code * scale + low - w| <= 1e-3 scale + 1e-7, torch's float32 operations
   one by one (no fused multiply-add, so the verdict is torch's). */

#include <math.h>
#include <stdint.h>

__attribute__((optimize("fp-contract=off"))) int lmserve_exact_q4(const float *w, long groups, uint8_t *codes,
                                                                   float *scale, float *low) {
    int exact = 1;
#pragma omp parallel for schedule(static) reduction(&& : exact)
    for (long g = 0; g < groups; g++) {
        const float *x = w + g * 32;
        float lo = x[0], hi = x[0];
        for (int i = 1; i < 32; i++) {
            lo = x[i] < lo ? x[i] : lo;
            hi = x[i] > hi ? x[i] : hi;
        }
        const float s = (hi - lo) / 15.0f, divisor = s > 1e-30f ? s : 1e-30f, tolerance = 1e-3f * s + 1e-7f;
        int group_exact = 1;
        for (int i = 0; i < 32; i++) {
            float c = rintf((x[i] - lo) / divisor);
            c = c < 0.0f ? 0.0f : (c > 15.0f ? 15.0f : c);
            codes[g * 32 + i] = (uint8_t)c;
            const float product = c * s, back = product + lo;
            if (fabsf(back - x[i]) > tolerance) group_exact = 0;
        }
        scale[g] = s, low[g] = lo;
        exact = exact && group_exact;
    }
    return exact;
}
