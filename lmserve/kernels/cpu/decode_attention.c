/* Rotary + KV store, and decode attention, over the CPU's heads-first paged KV cache
   (attention/torch_backend.py: CPUAttentionBackend).

   lmserve_rotary_store rotates q and k in place in the fused qkv rows (NeoX rotate-half with the tables'
   layout: cos over both halves, sin negated over the first) with the roundings of the torch path it replaces,
   bf16(bf16(x * cos) + bf16(swap_halves(x) * sin)), so the bits are HF's, and copies k and v to their slots.

   One new query per sequence: q [b, hq, d] bf16 attends to keys 0 .. seq_lens[s] - 1 of its sequence (the last
   `window` of them when window > 0), read through its block table from the cache [2, hkv, blocks, block_size, d]
   bf16. Grouped-query heads share their KV head's keys, so each (sequence, KV head) pair is one task: the
   group's scores, an online softmax over chunks of CHUNK keys (running max and sum, float32), and the weighted
   sum of values in float32, rounded once to bf16. Dot products use AVX512-BF16 (exact bf16 products, float32
   sums); exp is a degree-6 polynomial after a power-of-two split (about 1 ulp in float32). Tasks are spread
   over torch's OpenMP threads. */

#include <math.h>
#include <string.h>

#include "kernels.h"
#include "simd.h"

#define CHUNK 128
#define MAX_GROUP 16    /* query heads per KV head */
#define MAX_HEAD_DIM 256

/* one (sequence, KV head): queries [group, d] bf16 -> out [group, d] bf16 */
static void attend(const uint16_t *queries, const uint16_t *keys, const uint16_t *values, const int32_t *blocks,
                   int block_size, size_t block_stride, int first, int last, int group, int d, float scale,
                   uint16_t *out) {
    float acc[MAX_GROUP][MAX_HEAD_DIM], running_max[MAX_GROUP], running_sum[MAX_GROUP];
    float scores[MAX_GROUP][CHUNK];
    const int vectors = d / 32; /* bf16 words per 512-bit register: 32 */
    for (int g = 0; g < group; g++) {
        memset(acc[g], 0, sizeof(float) * d);
        running_max[g] = -INFINITY;
        running_sum[g] = 0.0f;
    }
    for (int start = first; start < last; start += CHUNK) {
        const int count = last - start < CHUNK ? last - start : CHUNK;
        /* scores = scale * q . k */
        for (int t = 0; t < count; t++) {
            const int position = start + t;
            const uint16_t *key = keys + (size_t)blocks[position / block_size] * block_stride +
                                  (size_t)(position % block_size) * d;
            for (int g = 0; g < group; g++) {
                __m512 dot = _mm512_setzero_ps();
                for (int i = 0; i < vectors; i++)
                    dot = _mm512_dpbf16_ps(dot, (__m512bh)_mm512_loadu_si512(queries + g * d + 32 * i),
                                           (__m512bh)_mm512_loadu_si512(key + 32 * i));
                scores[g][t] = _mm512_reduce_add_ps(dot) * scale;
            }
        }
        for (int g = 0; g < group; g++) {
            /* online softmax: rescale what came before by e^(old max - new max) */
            __m512 top = _mm512_set1_ps(running_max[g]);
            for (int t = 0; t < count; t += 16) {
                __mmask16 mask = tail_mask(count - t);
                top = _mm512_mask_max_ps(top, mask, top, _mm512_maskz_loadu_ps(mask, scores[g] + t));
            }
            const float new_max = _mm512_reduce_max_ps(top);
            const float correction = expf(running_max[g] - new_max); /* 0 on the first chunk (-inf) */
            __m512 total = _mm512_setzero_ps();
            const __m512 shift = _mm512_set1_ps(new_max);
            for (int t = 0; t < count; t += 16) {
                __mmask16 mask = tail_mask(count - t);
                __m512 p = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, scores[g] + t), shift));
                p = _mm512_maskz_mov_ps(mask, p);
                _mm512_mask_storeu_ps(scores[g] + t, mask, p);
                total = _mm512_add_ps(total, p);
            }
            running_sum[g] = running_sum[g] * correction + _mm512_reduce_add_ps(total);
            running_max[g] = new_max;
            if (correction != 1.0f) {
                const __m512 c = _mm512_set1_ps(correction);
                for (int i = 0; i < d; i += 16) _mm512_storeu_ps(acc[g] + i, _mm512_mul_ps(_mm512_loadu_ps(acc[g] + i), c));
            }
        }
        /* acc += p . v */
        for (int t = 0; t < count; t++) {
            const int position = start + t;
            const uint16_t *value = values + (size_t)blocks[position / block_size] * block_stride +
                                    (size_t)(position % block_size) * d;
            for (int i = 0; i < d; i += 16) {
                __m512 v = widen_bf16(_mm256_loadu_si256((const __m256i *)(value + i)));
                for (int g = 0; g < group; g++)
                    _mm512_storeu_ps(acc[g] + i,
                                     _mm512_fmadd_ps(_mm512_set1_ps(scores[g][t]), v, _mm512_loadu_ps(acc[g] + i)));
            }
        }
    }
    for (int g = 0; g < group; g++) {
        const __m512 inv = _mm512_set1_ps(1.0f / running_sum[g]);
        for (int i = 0; i < d; i += 16)
            _mm256_storeu_si256((__m256i *)(out + g * d + i),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(acc[g] + i), inv)));
    }
}

/* one row of the fused qkv output: rotate q and k in place, store k and v at slot (< 0: not stored) */
static void rotary_store_row(uint16_t *x, int hq, int hkv, int d, const uint16_t *c, const uint16_t *s,
                             uint16_t *cache, int64_t slot, int num_blocks, int block_size) {
    const int half = d / 2;
    const size_t head_stride = (size_t)num_blocks * block_size * d;
    for (int head = 0; head < hq + hkv; head++) {
        uint16_t *h = x + (size_t)head * d;
        for (int j = 0; j < half; j += 16) {
            __m512 a = widen_bf16(_mm256_loadu_si256((const __m256i *)(h + j)));
            __m512 b = widen_bf16(_mm256_loadu_si256((const __m256i *)(h + half + j)));
            __m512 c0 = widen_bf16(_mm256_loadu_si256((const __m256i *)(c + j)));
            __m512 c1 = widen_bf16(_mm256_loadu_si256((const __m256i *)(c + half + j)));
            __m512 s0 = widen_bf16(_mm256_loadu_si256((const __m256i *)(s + j)));
            __m512 s1 = widen_bf16(_mm256_loadu_si256((const __m256i *)(s + half + j)));
            __m512 first = _mm512_add_ps(round_bf16(_mm512_mul_ps(a, c0)), round_bf16(_mm512_mul_ps(b, s0)));
            __m512 second = _mm512_add_ps(round_bf16(_mm512_mul_ps(b, c1)), round_bf16(_mm512_mul_ps(a, s1)));
            _mm256_storeu_si256((__m256i *)(h + j), (__m256i)_mm512_cvtneps_pbh(first));
            _mm256_storeu_si256((__m256i *)(h + half + j), (__m256i)_mm512_cvtneps_pbh(second));
        }
    }
    if (slot < 0) return;
    const size_t offset = (size_t)(slot / block_size) * block_size * d + (size_t)(slot % block_size) * d;
    for (int head = 0; head < hkv; head++) {
        memcpy(cache + head * head_stride + offset, x + (size_t)(hq + head) * d, sizeof(uint16_t) * d);
        memcpy(cache + (hkv + head) * head_stride + offset, x + (size_t)(hq + hkv + head) * d,
               sizeof(uint16_t) * d);
    }
}

/* Inside a parallel region: the rows split over the team. */
void lmserve_rotary_store_part(uint16_t *qkv, int t, int row_stride, int hq, int hkv, int d, const uint16_t *cos,
                               const uint16_t *sin, uint16_t *cache, const int64_t *slots, int num_blocks,
                               int block_size) {
#pragma omp for schedule(static)
    for (int row = 0; row < t; row++)
        rotary_store_row(qkv + (size_t)row * row_stride, hq, hkv, d, cos + (size_t)row * d, sin + (size_t)row * d,
                         cache, slots[row], num_blocks, block_size);
}

/* qkv [t, row_stride] bf16 holding q [hq, d], k [hkv, d], v [hkv, d] at the start of each row; cos, sin [t, d]
   bf16; slots [t] int64 (-1: a padding row, not stored); cache [2, hkv, num_blocks, block_size, d] bf16.
   Needs d % 32 == 0 (the caller checks). */
void lmserve_rotary_store(uint16_t *qkv, int t, int row_stride, int hq, int hkv, int d, const uint16_t *cos,
                          const uint16_t *sin, uint16_t *cache, const int64_t *slots, int num_blocks,
                          int block_size) {
    for (int row = 0; row < t; row++)
        rotary_store_row(qkv + (size_t)row * row_stride, hq, hkv, d, cos + (size_t)row * d, sin + (size_t)row * d,
                         cache, slots[row], num_blocks, block_size);
}

int lmserve_decode_attention_shape_ok(int hq, int hkv, int d) {
    return d % 32 == 0 && d <= MAX_HEAD_DIM && hkv >= 1 && hq % hkv == 0 && hq / hkv <= MAX_GROUP;
}

/* Inside a parallel region: the (sequence, KV head) tasks split over the team. */
void lmserve_decode_attention_part(const uint16_t *q, int q_stride, const uint16_t *cache,
                                   const int32_t *block_tables, const int32_t *seq_lens, uint16_t *out, int b,
                                   int hq, int hkv, int d, int num_blocks, int block_size, int table_stride,
                                   float scale, int window) {
    const int group = hq / hkv;
    const size_t block_stride = (size_t)block_size * d, head_stride = (size_t)num_blocks * block_stride;
    const size_t values_offset = (size_t)hkv * head_stride;
#pragma omp for schedule(static, 1)
    for (int task = 0; task < b * hkv; task++) {
        const int s = task / hkv, h = task % hkv;
        const int last = seq_lens[s];
        const int first = window > 0 && last > window ? last - window : 0;
        const uint16_t *keys = cache + (size_t)h * head_stride;
        attend(q + (size_t)s * q_stride + (size_t)h * group * d, keys, keys + values_offset,
               block_tables + (size_t)s * table_stride, block_size, block_stride, first, last, group, d, scale,
               out + ((size_t)s * hq + (size_t)h * group) * d);
    }
}

/* q [b, hq, d] bf16 with q_stride elements between sequences; cache [2, hkv, num_blocks, block_size, d] bf16;
   block_tables [b, table_stride] int32; seq_lens [b] int32 (>= 1); window 0 = none -> out [b, hq, d] bf16.
   Needs d % 32 == 0, d <= MAX_HEAD_DIM, hq % hkv == 0, hq / hkv <= MAX_GROUP; returns 0, or -1 when not. */
int lmserve_decode_attention(const uint16_t *q, int q_stride, const uint16_t *cache, const int32_t *block_tables,
                             const int32_t *seq_lens, uint16_t *out, int b, int hq, int hkv, int d,
                             int num_blocks, int block_size, int table_stride, float scale, int window) {
    if (!lmserve_decode_attention_shape_ok(hq, hkv, d)) return -1;
#pragma omp parallel
    lmserve_decode_attention_part(q, q_stride, cache, block_tables, seq_lens, out, b, hq, hkv, d, num_blocks,
                                  block_size, table_stride, scale, window);
    return 0;
}
