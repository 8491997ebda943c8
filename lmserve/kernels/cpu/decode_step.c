/* A whole decode step of a Llama-family model on the CPU in one call (models/cpu_decode.py): every decoder
   layer's add + RMSNorm, 4-bit qkv, rotary + KV store, attention, o, add + RMSNorm, gate_up, silu * up and
   down, then the final add + RMSNorm, for 1 to 16 sequences with one new token each.

   The same kernels as the one-op-per-call path (the *_part functions of the other files), in the same order
   and on the same buffers' values, so the result is that path's bit for bit; what goes is the ~16 torch
   dispatches and ctypes calls per layer around them (~2-3 ms of a ~9 ms step for SmolLM2's 30 layers), and
   each kernel's own parallel region: one region for the step, the stages separated by the barriers that end
   each work-sharing loop. */

#include <stdlib.h>

#include "kernels.h"

typedef struct {
    const uint8_t *qs;
    const uint16_t *d, *m; /* pack_q4's layout (q4_gemv.c), for 1-4 rows */
    const uint8_t *panel_qs;
    const uint16_t *panel_d, *panel_m; /* pack_q4_panels' (q4_gemm.c), for 5-16 rows; NULL if the caller has none */
} lmserve_q4_weight;

/* y [m, n] = x [m, k] @ w^T with the kernel the per-op path picks for m rows (layers/linear.py: Linear.forward) */
static inline void linear_part(const uint16_t *x, const lmserve_q4_weight *w, uint16_t *y, int m, int n, int k) {
    if (m <= LMSERVE_MAX_ROWS)
        lmserve_q4_gemv_part(x, w->qs, w->d, w->m, y, m, n, k);
    else
        lmserve_q4_gemm_part(x, w->panel_qs, w->panel_d, w->panel_m, y, m, n, k);
}

static int linear_ok(const lmserve_q4_weight *w, int m, int n, int k) {
    return m <= LMSERVE_MAX_ROWS ? lmserve_q4_gemv_shape_ok(m, n, k)
                                 : w->panel_qs != 0 && lmserve_q4_gemm_shape_ok(m, n, k);
}

typedef struct {
    lmserve_q4_weight qkv, o, gate_up, down;
    const float *input_norm, *post_norm; /* float32 [hidden] */
    uint16_t *cache;                     /* [2, kv_heads, num_blocks, block_size, head_dim] bf16 */
    int window;                          /* sliding window, 0 = none */
} lmserve_layer;

typedef struct {
    int hidden, heads, kv_heads, head_dim, intermediate, num_blocks, block_size;
    float eps, scale;
} lmserve_model_shape;

/* normed0 [m, hidden] bf16: layer 0's input norm of hidden0 [m, hidden] bf16 (the embeddings, layer 0's
   residual); cos, sin [m, head_dim] bf16 (the rotary tables' rows); slots [m] int64; block_tables
   [m, table_stride] int32; seq_lens [m] int32; final_norm float32 [hidden] -> out [m, hidden] bf16 (the final
   norm's output). Returns 0; -1 for shapes the kernels do not take, -2 when out of memory. */
int lmserve_decode_step(const lmserve_layer *layers, int num_layers, const lmserve_model_shape *shape,
                        const uint16_t *normed0, const uint16_t *hidden0, const float *final_norm, uint16_t *out,
                        int m, const uint16_t *cos, const uint16_t *sin, const int64_t *slots,
                        const int32_t *block_tables, int table_stride, const int32_t *seq_lens) {
    const int h = shape->hidden, hq = shape->heads, hkv = shape->kv_heads, d = shape->head_dim;
    const int inter = shape->intermediate, qkv_n = (hq + 2 * hkv) * d;
    if (num_layers < 1 || !lmserve_decode_attention_shape_ok(hq, hkv, d) || inter % 16) return -1;
    for (int i = 0; i < num_layers; i++) {
        const lmserve_layer *layer = layers + i;
        if (!linear_ok(&layer->qkv, m, qkv_n, h) || !linear_ok(&layer->o, m, h, hq * d) ||
            !linear_ok(&layer->gate_up, m, 2 * inter, h) || !linear_ok(&layer->down, m, h, inter))
            return -1;
    }
    /* the step's buffers in one allocation: the float32 ones first, then the bf16 ones */
    const size_t rows = (size_t)m, attention_floats = lmserve_decode_attention_scratch(m, hq, d);
    float *residual = malloc(sizeof(float) * (rows * h + attention_floats) +
                             sizeof(uint16_t) * rows * (2 * h + qkv_n + hq * d + 3 * inter));
    if (!residual) return -2;
    float *scratch = residual + rows * h;
    uint16_t *normed = (uint16_t *)(scratch + attention_floats), *proj = normed + rows * h;
    uint16_t *qkv = proj + rows * h, *attn = qkv + rows * qkv_n, *gate_up = attn + rows * hq * d;
    uint16_t *act = gate_up + rows * 2 * inter;
#pragma omp parallel
    {
        for (int i = 0; i < num_layers; i++) {
            const lmserve_layer *layer = layers + i;
            if (i > 0)  /* the previous layer's MLP output joins the residual stream */
                lmserve_add_rms_norm_part(proj, residual, 1, residual, layer->input_norm, normed, m, h, shape->eps);
            linear_part(i > 0 ? normed : normed0, &layer->qkv, qkv, m, qkv_n, h);
            lmserve_rotary_store_part(qkv, m, qkv_n, hq, hkv, d, cos, sin, layer->cache, slots, shape->num_blocks,
                                      shape->block_size);
            lmserve_decode_attention_part(qkv, qkv_n, layer->cache, block_tables, seq_lens, attn, m, hq, hkv, d,
                                          shape->num_blocks, shape->block_size, table_stride, shape->scale,
                                          layer->window, scratch);
            linear_part(attn, &layer->o, proj, m, h, hq * d);
            /* layer 0's residual is the embeddings, in bf16 */
            lmserve_add_rms_norm_part(proj, i > 0 ? (const void *)residual : hidden0, i > 0, residual,
                                      layer->post_norm, normed, m, h, shape->eps);
            linear_part(normed, &layer->gate_up, gate_up, m, 2 * inter, h);
            lmserve_silu_and_mul_part(gate_up, 2 * inter, act, m, inter);
            linear_part(act, &layer->down, proj, m, h, inter);
        }
        lmserve_add_rms_norm_part(proj, residual, 1, residual, final_norm, out, m, h, shape->eps);
    }
    free(residual);
    return 0;
}
