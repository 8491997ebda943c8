/* The kernels' parts that run inside an OpenMP parallel region (every thread of the team calls them; their
   loops are orphaned `omp for`s with the usual barrier at the end), shared by the exported one-call wrappers
   in each file and by decode_step.c, which runs a whole decode step in one region. */
#ifndef LMSERVE_KERNELS_H
#define LMSERVE_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#define LMSERVE_MAX_ROWS 4
#define LMSERVE_MAX_K 16384
#define LMSERVE_ATTENTION_MAX_PARTS 8

/* q4_gemv.c: S[m, g] = the sum of x[m, 32 g .. 32 g + 31] (float32) */
void lmserve_group_sums(const uint16_t *x, float *sums, int m_rows, int k);

/* q4_gemv.c: x [m, k] bf16 @ the packed 4-bit weight^T -> y [m, n] bf16 (shapes checked by the caller) */
void lmserve_q4_gemv_part(const uint16_t *x, const uint8_t *qs, const uint16_t *d, const uint16_t *l,
                          uint16_t *y, int m_rows, int n, int k);
int lmserve_q4_gemv_shape_ok(int m_rows, int n, int k);

/* q4_gemm.c: the same for 1-16 rows in pack_q4_panels' layout */
void lmserve_q4_gemm_part(const uint16_t *x, const uint8_t *qs, const uint16_t *d, const uint16_t *l, uint16_t *y,
                          int m_rows, int n, int k);
int lmserve_q4_gemm_shape_ok(int m_rows, int n, int k);

/* norm.c: residual_out = residual_in + x (float32), out = bf16(rms_norm(residual_out) * w), rows split */
void lmserve_add_rms_norm_part(const uint16_t *x, const void *residual_in, int residual_is_f32,
                               float *residual_out, const float *w, uint16_t *out, int m, int h, float eps);

/* decode_attention.c */
void lmserve_rotary_store_part(uint16_t *qkv, int t, int row_stride, int hq, int hkv, int d, const uint16_t *cos,
                               const uint16_t *sin, uint16_t *cache, const int64_t *slots, int num_blocks,
                               int block_size);
void lmserve_decode_attention_part(const uint16_t *q, int q_stride, const uint16_t *cache,
                                   const int32_t *block_tables, const int32_t *seq_lens, uint16_t *out, int b,
                                   int hq, int hkv, int d, int num_blocks, int block_size, int table_stride,
                                   float scale, int window, float *scratch);
int lmserve_decode_attention_shape_ok(int hq, int hkv, int d);
size_t lmserve_decode_attention_scratch(int b, int hq, int d); /* floats */

/* activation.c: silu(gate) * up, the rows' 16-column pieces split */
void lmserve_silu_and_mul_part(const uint16_t *gate_up, int row_stride, uint16_t *out, int t, int i);

#endif
