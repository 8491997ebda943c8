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
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "simd.h"

#define CHUNK 128
#define MAX_GROUP 16    /* query heads per KV head */
#define MAX_HEAD_DIM 256
#define MAX_PARTS LMSERVE_ATTENTION_MAX_PARTS /* key ranges per task when tasks are fewer than threads */
#define MIN_PART_KEYS 128

/* r[i] = the sum of v[i]'s 16 lanes, i < 16 (a transpose-and-add tree: 45 ops for 16 sums) */
static inline __m512 sums_16(const __m512 *v) {
    __m512 u[4];
    for (int q = 0; q < 4; q++) {
        const __m512 *w = v + 4 * q;
        __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(w[0], w[1]), _mm512_unpackhi_ps(w[0], w[1]));
        __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(w[2], w[3]), _mm512_unpackhi_ps(w[2], w[3]));
        u[q] = _mm512_add_ps(_mm512_shuffle_ps(t0, t1, 0x44), _mm512_shuffle_ps(t0, t1, 0xEE));
    }
    __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
    __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, 0x88), _mm512_shuffle_f32x4(w0, w1, 0xDD));
}

/* acc[h] (16 columns, h < H, d apart) += sum over the count keys of p[h * p_stride + t] * value_t's 16 columns */
#define DEFINE_WEIGH_VALUES(H)                                                                              \
    static inline void weigh_values_##H(float *acc, int d, const float *p, int p_stride, const uint16_t *values, \
                                        const size_t *rows, int count) {                                    \
        __m512 a[H];                                                                                        \
        for (int h = 0; h < H; h++) a[h] = _mm512_loadu_ps(acc + h * d);                                    \
        for (int t = 0; t < count; t++) {                                                                   \
            __m512 v = widen_bf16(_mm256_loadu_si256((const __m256i *)(values + rows[t])));                 \
            for (int h = 0; h < H; h++) a[h] = _mm512_fmadd_ps(_mm512_set1_ps(p[h * p_stride + t]), v, a[h]); \
        }                                                                                                   \
        for (int h = 0; h < H; h++) _mm512_storeu_ps(acc + h * d, a[h]);                                    \
    }

DEFINE_WEIGH_VALUES(1)
DEFINE_WEIGH_VALUES(2)
DEFINE_WEIGH_VALUES(3)
DEFINE_WEIGH_VALUES(4)

/* keys first .. last - 1 of one (sequence, KV head): queries [group, d] bf16 -> the unnormalized float32
   acc [group, d] (sum of e^(score - max) v), each head's running max and sum of e^(score - max) */
static void attend(const uint16_t *queries, const uint16_t *keys, const uint16_t *values, const int32_t *blocks,
                   int block_size, size_t block_stride, int first, int last, int group, int d, float scale,
                   float *acc, float *running_max, float *running_sum) {
    float scores[MAX_GROUP][CHUNK];
    size_t rows[CHUNK]; /* each key's offset in the cache (keys and values alike) */
    const int vectors = d / 32; /* bf16 words per 512-bit register: 32 */
    memset(acc, 0, sizeof(float) * group * d);
    for (int g = 0; g < group; g++) running_max[g] = -INFINITY, running_sum[g] = 0.0f;
    const __m512 scale_v = _mm512_set1_ps(scale);
    for (int start = first; start < last; start += CHUNK) {
        const int count = last - start < CHUNK ? last - start : CHUNK;
        for (int t = 0; t < count; t++) {
            const int position = start + t;
            rows[t] = (size_t)blocks[position / block_size] * block_stride + (size_t)(position % block_size) * d;
        }
        /* the chunk's keys and values come from DRAM in a model (30 layers of KV outgrow the caches): ask for
           all of them now, the score loop below then finds the keys on the way and the values after it */
        for (int t = 0; t < count; t++)
            for (int line = 0; line < d * 2; line += 64) {
                _mm_prefetch((const char *)(keys + rows[t]) + line, _MM_HINT_T0);
                _mm_prefetch((const char *)(values + rows[t]) + line, _MM_HINT_T1);
            }
        /* scores = scale * q . k, 16 keys at a time into one register */
        for (int g = 0; g < group; g++) {
            __m512bh q[MAX_HEAD_DIM / 32];
            for (int i = 0; i < vectors; i++) q[i] = (__m512bh)_mm512_loadu_si512(queries + g * d + 32 * i);
            for (int t0 = 0; t0 < count; t0 += 16) {
                const int n = count - t0 < 16 ? count - t0 : 16;
                __m512 dots[16];
                for (int j = 0; j < 16; j++) {
                    __m512 dot = _mm512_setzero_ps();
                    if (j < n) {
                        const uint16_t *key = keys + rows[t0 + j];
                        for (int i = 0; i < vectors; i++)
                            dot = _mm512_dpbf16_ps(dot, q[i], (__m512bh)_mm512_loadu_si512(key + 32 * i));
                    }
                    dots[j] = dot;
                }
                _mm512_mask_storeu_ps(scores[g] + t0, tail_mask(n), _mm512_mul_ps(sums_16(dots), scale_v));
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
                for (int i = 0; i < d; i += 16)
                    _mm512_storeu_ps(acc + g * d + i, _mm512_mul_ps(_mm512_loadu_ps(acc + g * d + i), c));
            }
        }
        /* acc += p . v: per 16 columns and up to 4 heads, the sums stay in registers over the chunk's keys */
        for (int i = 0; i < d; i += 16) {
            for (int g0 = 0; g0 < group; g0 += 4) {
                float *a = acc + g0 * d + i;
                switch (group - g0 < 4 ? group - g0 : 4) {
                    case 1: weigh_values_1(a, d, scores[g0], CHUNK, values + i, rows, count); break;
                    case 2: weigh_values_2(a, d, scores[g0], CHUNK, values + i, rows, count); break;
                    case 3: weigh_values_3(a, d, scores[g0], CHUNK, values + i, rows, count); break;
                    default: weigh_values_4(a, d, scores[g0], CHUNK, values + i, rows, count); break;
                }
            }
        }
    }
}

/* out [group, d] bf16 from the parts' (acc, max, sum) of one task, in float32, rounded once */
static void merge_parts(const float *acc, const float *maxes, const float *sums, int parts, int group, int d,
                        size_t part_stride, uint16_t *out) {
    for (int g = 0; g < group; g++) {
        float top = -INFINITY;
        for (int p = 0; p < parts; p++) top = maxes[p * part_stride + g] > top ? maxes[p * part_stride + g] : top;
        float weights[MAX_PARTS], total = 0.0f;
        for (int p = 0; p < parts; p++) {
            weights[p] = sums[p * part_stride + g] > 0.0f ? expf(maxes[p * part_stride + g] - top) : 0.0f;
            total += weights[p] * sums[p * part_stride + g];
        }
        for (int i = 0; i < d; i += 16) {
            __m512 sum = _mm512_setzero_ps();
            for (int p = 0; p < parts; p++)
                sum = _mm512_fmadd_ps(_mm512_set1_ps(weights[p]),
                                      _mm512_loadu_ps(acc + p * part_stride * d + g * d + i), sum);
            _mm256_storeu_si256((__m256i *)(out + g * d + i),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(sum, _mm512_set1_ps(1.0f / total))));
        }
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

/* How many key ranges each task's keys split into: enough that tasks x parts keep every thread busy (a lone
   sequence of SmolLM2 has 3 tasks for 2 threads), each at least MIN_PART_KEYS keys long (shorter ones lose more to the merge than they gain). */
static int parts_for(const int32_t *seq_lens, int b, int hkv, int window, int threads) {
    const int tasks = b * hkv;
    if (tasks >= 2 * threads) return 1;
    int shortest = 1 << 30;
    for (int s = 0; s < b; s++) {
        const int keys = window > 0 && seq_lens[s] > window ? window : seq_lens[s];
        shortest = keys < shortest ? keys : shortest;
    }
    int parts = (2 * threads + tasks - 1) / tasks;
    if (parts > shortest / MIN_PART_KEYS) parts = shortest / MIN_PART_KEYS;
    if (parts > MAX_PARTS) parts = MAX_PARTS;
    return parts < 1 ? 1 : parts;
}

/* Inside a parallel region: the (sequence, KV head, key range) items split over the team, then each task's
   ranges merged. scratch: lmserve_decode_attention_scratch(b, hq, d) floats. */
void lmserve_decode_attention_part(const uint16_t *q, int q_stride, const uint16_t *cache,
                                   const int32_t *block_tables, const int32_t *seq_lens, uint16_t *out, int b,
                                   int hq, int hkv, int d, int num_blocks, int block_size, int table_stride,
                                   float scale, int window, float *scratch) {
    const int group = hq / hkv, tasks = b * hkv;
    const size_t block_stride = (size_t)block_size * d, head_stride = (size_t)num_blocks * block_stride;
    const size_t values_offset = (size_t)hkv * head_stride;
    const int parts = parts_for(seq_lens, b, hkv, window, omp_get_num_threads());
    /* item (task, part)'s acc [group, d], then all items' maxes [group], then their sums [group] */
    const size_t items = (size_t)tasks * parts;
    float *maxes = scratch + items * group * d, *sums = maxes + items * group;
#pragma omp for schedule(static, 1)
    for (int item = 0; item < tasks * parts; item++) {
        const int task = item / parts, part = item % parts, s = task / hkv, h = task % hkv;
        const int last = seq_lens[s];
        const int first = window > 0 && last > window ? last - window : 0;
        const int begin = first + (int)((long)(last - first) * part / parts);
        const int end = first + (int)((long)(last - first) * (part + 1) / parts);
        const uint16_t *keys = cache + (size_t)h * head_stride;
        float *acc = scratch + (size_t)item * group * d;
        attend(q + (size_t)s * q_stride + (size_t)h * group * d, keys, keys + values_offset,
               block_tables + (size_t)s * table_stride, block_size, block_stride, begin, end, group, d, scale, acc,
               maxes + (size_t)item * group, sums + (size_t)item * group);
        if (parts == 1)
            merge_parts(acc, maxes + (size_t)item * group, sums + (size_t)item * group, 1, group, d, group,
                        out + ((size_t)s * hq + (size_t)h * group) * d);
    }
    if (parts == 1) return;
#pragma omp for schedule(static)
    for (int task = 0; task < tasks; task++) {
        const size_t item = (size_t)task * parts;
        const int s = task / hkv, h = task % hkv;
        merge_parts(scratch + item * group * d, maxes + item * group, sums + item * group, parts, group, d, group,
                    out + ((size_t)s * hq + (size_t)h * group) * d);
    }
}

size_t lmserve_decode_attention_scratch(int b, int hq, int d) {
    return (size_t)b * hq * MAX_PARTS * ((size_t)d + 2);
}

/* q [b, hq, d] bf16 with q_stride elements between sequences; cache [2, hkv, num_blocks, block_size, d] bf16;
   block_tables [b, table_stride] int32; seq_lens [b] int32 (>= 1); window 0 = none -> out [b, hq, d] bf16.
   Needs d % 32 == 0, d <= MAX_HEAD_DIM, hq % hkv == 0, hq / hkv <= MAX_GROUP; returns 0, or -1 when not. */
int lmserve_decode_attention(const uint16_t *q, int q_stride, const uint16_t *cache, const int32_t *block_tables,
                             const int32_t *seq_lens, uint16_t *out, int b, int hq, int hkv, int d,
                             int num_blocks, int block_size, int table_stride, float scale, int window) {
    if (!lmserve_decode_attention_shape_ok(hq, hkv, d)) return -1;
    float *scratch = malloc(sizeof(float) * lmserve_decode_attention_scratch(b, hq, d));
    if (!scratch) return -2;
#pragma omp parallel
    lmserve_decode_attention_part(q, q_stride, cache, block_tables, seq_lens, out, b, hq, hkv, d, num_blocks,
                                  block_size, table_stride, scale, window, scratch);
    free(scratch);
    return 0;
}
