// One-row W4A16 GEMV on the tensor cores (mma.sync m16n8k16, float32 accumulation) over the K-interleaved
// layout of lmserve/kernels/w4a16.py (repack_awq).
//
// Layout: qweight int32 [N_pad / 64, K_pad / 8, 64]; a 128-row block of one 64-column strip is 16 packed rows
// x 64 words = 4 KB contiguous, and nibble j of word (16 * b + i, n) is the weight of row k = 128 * b + 16 * j + i.
// scales / zeros: [N_pad / 64, K_pad / group, 64] 16-bit floats (zeros are the integers 0..15), float16 or bfloat16
// independently of x (scales_bf16).
//
// One CTA = one strip x one split of the blocks; its 8 warps take the split's blocks in turn. Lane (g, t) =
// (lane / 4, lane % 4) loads packed rows i = 2t, 2t + 1, 2t + 8, 2t + 9, columns 4g .. 4g + 3 and 32 + 4g .. + 3:
// eight 16-byte loads issued before any is used (each load of the warp reads four 128-byte runs), 4 KB per warp in
// flight. Those words are exactly the A fragments of 32 mma tiles: tile (c, j) has rows = columns 4g + c (row g)
// and 32 + 4g + c (row g + 8), k index = i, at nibble j. A byte permute pairs the half-words of packed rows
// (2t, 2t + 1) and (2t + 8, 2t + 9); one shift and one LOP3 per two weights OR a nibble into the mantissa of
// M = 128 (bfloat16) or 1024 (float16), giving M + q exactly. B holds x in its column 0 (lanes g = 0), so the
// mma's column 0 is sum_k (M + q_k) x_k over a 16-row slice; per group of rows the result is
// s * (acc - (M + z) * sum_k x_k), with the sums of x staged in shared memory beside x. So a weight costs about
// one integer instruction and 1/8 of an mma instead of the three float instructions of the CUDA-core loop.
// Splits finish in the launch: float32 partials, and the strip's last CTA (an arrival counter it resets) adds
// them in split order.
// GATED (the _silu kernels, a down projection): x is the gate_up row [gate | up] of 2 K values and the GEMV's
// input is silu(gate) * up, made while x is staged (common.cuh: silu_mul, rounded as the separate kernel rounds it),
// so the MLP's activation takes no launch of its own.
// NORM (the _norm kernels, a qkv or gate_up projection): x is a sublayer's output and the GEMV's input is
// RMSNorm(x + residual) * norm_w, made while x is staged: every CTA sums the squares of the whole row x + residual
// (CTA (0, 0) also stores it at res_out, the new residual), then normalizes its split in shared memory, rounded as
// kernels/rmsnorm.py's fused_add_rms_norm rounds (the sum of squares in another order), so the norm takes no launch.
//
// No headers: compiled by NVRTC at run time (lmserve/kernels/cuda_jit.py).

#define WARPS 8
#define THREADS (WARPS * 32)
#define MAX_BLOCKS_PER_CTA 64

#include "common.cuh"

__device__ __forceinline__ uint2 load_u64(const u16* p) {
    uint2 v;
    asm volatile("ld.global.nc.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
    return v;
}

__device__ __forceinline__ u32 lop3_or_and(u32 a, u32 mask, u32 magic) {
    u32 d;  // (a & mask) | magic in one LOP3 (ptxas splits the C expression into two when both are constants)
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "n"(0x000F000F), "r"(magic));
    (void)mask;
    return d;
}

template <bool BF16>
__device__ __forceinline__ void mma_16816(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    if (BF16)
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    else
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The strip's packed row of lane (g, t) for load q of a block: rows 2t, 2t + 1, 2t + 8, 2t + 9
__device__ __forceinline__ int lane_row(int t, int q) { return 2 * t + (q & 1) + 8 * (q >> 1); }

// The CTA's split of x staged in xs (zero past K; GATED: silu(gate) * up of a gate_up row; NORM: RMSNorm(x + residual)
// * norm_w, CTA (0, 0) storing x + residual at res_out), then the sums of the 16 x of each (block, nibble) in xsum.
template <bool BF16, bool GATED, bool NORM>
__device__ __forceinline__ void stage_x(const u16* __restrict__ x, u16* xs, float* xsum, int K, int kb0, int nkb,
                                        const u16* __restrict__ residual, u16* __restrict__ res_out,
                                        const u16* __restrict__ norm_w, float eps) {
    const int tid = threadIdx.x;
    if (NORM) {
        // the whole row's x + residual: its squares summed, CTA (0, 0) storing it, this split's part staged
        const int lo = kb0 * 128, hi = min(K, (kb0 + nkb) * 128);
        const bool writer = blockIdx.x == 0 && blockIdx.y == 0;
        float squares = 0.0f;
        for (int k = 8 * tid; k < K; k += 8 * THREADS) {
            const uint4 h =
                add8(*reinterpret_cast<const uint4*>(x + k), *reinterpret_cast<const uint4*>(residual + k), BF16);
            if (writer) *reinterpret_cast<uint4*>(res_out + k) = h;
            squares += sum_squares8(h, BF16);
            if (k >= lo && k < hi) *reinterpret_cast<uint4*>(xs + k - lo) = h;
        }
        const float rstd = rsqrtf(block_sum<WARPS>(squares) / K + eps);
        for (int idx = 8 * tid; idx < nkb * 128; idx += 8 * THREADS) {  // normalized in place, zero past K
            const int k = lo + idx;
            uint4 v = make_uint4(0, 0, 0, 0);
            if (k < K)
                v = norm8(*reinterpret_cast<const uint4*>(xs + idx), *reinterpret_cast<const uint4*>(norm_w + k), rstd,
                          BF16);
            *reinterpret_cast<uint4*>(xs + idx) = v;
        }
    } else {
        // 16 bytes a thread at a time (x 16-byte aligned, K a multiple of 8: the launcher checks)
#pragma unroll 4
        for (int idx = 8 * tid; idx < nkb * 128; idx += 8 * THREADS) {
            const int k = kb0 * 128 + idx;
            uint4 v = make_uint4(0, 0, 0, 0);
            if (k < K) {
                v = *reinterpret_cast<const uint4*>(x + k);
                if (GATED) {
                    const uint4 up = *reinterpret_cast<const uint4*>(x + K + k);
                    v = silu_mul8(v, up, BF16);
                }
            }
            *reinterpret_cast<uint4*>(xs + idx) = v;
        }
    }
    __syncthreads();
    for (int idx = tid; idx < nkb * 8; idx += THREADS) {
        float acc = 0.0f;
#pragma unroll
        for (int i = 0; i < 16; ++i) acc += to_float(xs[16 * idx + i], BF16);
        xsum[idx] = acc;
    }
    __syncthreads();
}

// A block's eight 16-byte words of lane (g, t) as the A fragments' half-word pairs: p[c][r][0] nibbles 0..3,
// p[c][r][1] nibbles 4..7 of A register r of tile column c
__device__ __forceinline__ void pair_halves(const uint4 (&w)[4][2], u32 (&p)[4][4][2]) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
        const u32 word[4][2] = {
            {((const u32*)&w[0][0])[c], ((const u32*)&w[0][1])[c]},
            {((const u32*)&w[1][0])[c], ((const u32*)&w[1][1])[c]},
            {((const u32*)&w[2][0])[c], ((const u32*)&w[2][1])[c]},
            {((const u32*)&w[3][0])[c], ((const u32*)&w[3][1])[c]},
        };
#pragma unroll
        for (int r = 0; r < 4; ++r) {  // r: (row g | row g + 8) x (k 2t, 2t + 1 | k 2t + 8, 2t + 9)
            const int h = r & 1, q0 = 2 * (r >> 1);
            p[c][r][0] = __byte_perm(word[q0][h], word[q0 + 1][h], 0x5410);
            p[c][r][1] = __byte_perm(word[q0][h], word[q0 + 1][h], 0x7632);
        }
    }
}

// The 32 mmas of block b and, as each group ends, its zero and scale applied into the lane's totals
template <int G, bool BF16>
__device__ __forceinline__ void block_mma(const u32 (&p)[4][4][2], const uint2 (&sv)[G][2], const uint2 (&zv)[G][2],
                                          const u32* xw, const float* xsum, int b, int g, int t, int scales_bf16,
                                          float (&total)[4][2]) {
    constexpr int RUN = 8 / G;
    constexpr u32 MAGIC = BF16 ? 0x43004300u : 0x64006400u;
    constexpr float M = BF16 ? 128.0f : 1024.0f;
    float d[4][4] = {};
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const int xo = b * 64 + 8 * j + t;  // u32 index of x pair (16 j + 2t, + 1) in block b
        const u32 b0 = g == 0 ? xw[xo] : 0u, b1 = g == 0 ? xw[xo + 4] : 0u;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            u32 a[4];
#pragma unroll
            for (int r = 0; r < 4; ++r) a[r] = lop3_or_and(p[c][r][j >> 2] >> (4 * (j & 3)), 0x000F000F, MAGIC);
            mma_16816<BF16>(d[c], a, b0, b1);
        }
        if ((j + 1) % RUN == 0) {  // a group ends: scale it into the totals
            const int gi = j / RUN;
            float xg = 0.0f;
#pragma unroll
            for (int jj = j + 1 - RUN; jj <= j; ++jj) xg += xsum[b * 8 + jj];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const u32 sw[2] = {sv[gi][h].x, sv[gi][h].y}, zw[2] = {zv[gi][h].x, zv[gi][h].y};
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const float sc = to_float((u16)(sw[c >> 1] >> (16 * (c & 1))), scales_bf16);
                    const float z = to_float((u16)(zw[c >> 1] >> (16 * (c & 1))), scales_bf16);
                    total[c][h] = fmaf(sc, d[c][2 * h] - (M + z) * xg, total[c][h]);
                    d[c][2 * h] = 0.0f;
                    d[c][2 * h + 1] = 0.0f;
                }
            }
        }
    }
}

// The strip's 64 column sums from each warp's totals (column 0 of each tile lives in the lanes t = 0), the splits
// finished in the launch, the output stored
template <bool BF16>
__device__ __forceinline__ void store_strip(const float (&total)[4][2], float (*red)[64], u16* __restrict__ out,
                                            float* __restrict__ partial, int* __restrict__ locks, int N) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    if (t == 0) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            red[warp][4 * g + c] = total[c][0];
            red[warp][32 + 4 * g + c] = total[c][1];
        }
    }
    __syncthreads();
    const int strip = blockIdx.x, col = strip * 64 + tid;
    float value = 0.0f;
    if (tid < 64) {
#pragma unroll
        for (int v = 0; v < WARPS; ++v) value += red[v][tid];
    }
    if (gridDim.y > 1 && !finish_splits(value, partial, locks + strip, col, tid < 64 && col < N, N)) return;
    if (tid < 64 && col < N) out[col] = from_float(value, BF16);
}

// G: groups per 128-row block (1 for group sizes >= 128, else 128 / group); a group spans 8 / G nibbles j.
template <int G, bool BF16, bool PREFETCH, bool PDL, bool GATED, bool NORM>
__device__ __forceinline__ void w4_gemv(const u16* __restrict__ x, const u32* __restrict__ qweight,
                                        const u16* __restrict__ scales, const u16* __restrict__ zeros,
                                        u16* __restrict__ out, float* __restrict__ partial, int* __restrict__ locks,
                                        int N, int K, int num_blocks, int blocks_per_cta, int blocks_per_group,
                                        long long stride_w, long long stride_s, int scales_bf16,
                                        const u16* __restrict__ residual, u16* __restrict__ res_out,
                                        const u16* __restrict__ norm_w, float eps) {
    __shared__ __align__(16) u16 xs[MAX_BLOCKS_PER_CTA * 128];
    __shared__ float xsum[MAX_BLOCKS_PER_CTA * 8];
    __shared__ __align__(16) float red[WARPS][64];

    const int strip = blockIdx.x, split = blockIdx.y;
    const int kb0 = split * blocks_per_cta;
    const int nkb = min(blocks_per_cta, num_blocks - kb0);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;

    const u32* wp = qweight + (long long)strip * stride_w + 4 * g;
    const long long s_off = (long long)strip * stride_s + 4 * g;
    uint4 w[4][2];  // [packed row 2t, 2t + 1, 2t + 8, 2t + 9][column half]
    uint2 sv[G][2], zv[G][2];
    auto load_block = [&](int b) {
        const int kb = kb0 + b;
#pragma unroll
        for (int q = 0; q < 4; ++q)
#pragma unroll
            for (int h = 0; h < 2; ++h) w[q][h] = load_stream(wp + (long long)kb * 1024 + lane_row(t, q) * 64 + 32 * h);
#pragma unroll
        for (int gi = 0; gi < G; ++gi) {
            const long long group = G == 1 ? kb / blocks_per_group : (long long)kb * G + gi;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                sv[gi][h] = load_u64(scales + s_off + group * 64 + 32 * h);
                zv[gi][h] = load_u64(zeros + s_off + group * 64 + 32 * h);
            }
        }
    };
    if (warp < nkb) load_block(warp);  // the first block's weights are on their way while x is staged
    if (PDL) pdl_enter();  // the loads above need nothing of the kernel before, x does
    stage_x<BF16, GATED, NORM>(x, xs, xsum, K, kb0, nkb, residual, res_out, norm_w, eps);

    const u32* xw = reinterpret_cast<const u32*>(xs);
    float total[4][2] = {};
    for (int b = warp; b < nkb; b += WARPS) {
        uint2 svb[G][2], zvb[G][2];
#pragma unroll
        for (int gi = 0; gi < G; ++gi)
#pragma unroll
            for (int h = 0; h < 2; ++h) svb[gi][h] = sv[gi][h], zvb[gi][h] = zv[gi][h];
        u32 p[4][4][2];
        pair_halves(w, p);
        if (PREFETCH && b + WARPS < nkb) load_block(b + WARPS);  // the next block streams in during the mmas
        block_mma<G, BF16>(p, svb, zvb, xw, xsum, b, g, t, scales_bf16, total);
        if (!PREFETCH && b + WARPS < nkb) load_block(b + WARPS);
    }
    store_strip<BF16>(total, red, out, partial, locks, N);
}

#define W4_GEMV(NAME, BOUNDS, G, BF16, PREFETCH, PDL, GATED, NORM)                                              \
    extern "C" __global__ void BOUNDS NAME(                                                                     \
        const u16* x, const u32* qweight, const u16* scales, const u16* zeros, u16* out, float* partial,        \
        int* locks, int N, int K, int num_blocks, int blocks_per_cta, int blocks_per_group, long long stride_w, \
        long long stride_s, int scales_bf16, const u16* residual, u16* res_out, const u16* norm_w, float eps) { \
        w4_gemv<G, BF16, PREFETCH, PDL, GATED, NORM>(x, qweight, scales, zeros, out, partial, locks, N, K,      \
                                                     num_blocks, blocks_per_cta, blocks_per_group, stride_w,    \
                                                     stride_s, scales_bf16, residual, res_out, norm_w, eps);    \
    }
// each kernel also as NAME_pdl, launched as a programmatic dependent (on sm_90+ unless LMSERVE_PDL=0, kernels/_triton.py),
// and all as NAME_silu(_pdl), taking a gate_up row (GATED), and NAME_norm(_pdl), taking x + residual to norm (NORM)
#define W4_GEMV_PDL(NAME, BOUNDS, G, BF16, PREFETCH, GATED, NORM)       \
    W4_GEMV(NAME, BOUNDS, G, BF16, PREFETCH, false, GATED, NORM) \
    W4_GEMV(NAME##_pdl, BOUNDS, G, BF16, PREFETCH, true, GATED, NORM)
#define W4_GEMV_ALL(NAME, BOUNDS, G, BF16, PREFETCH)                                                     \
    W4_GEMV_PDL(NAME, BOUNDS, G, BF16, PREFETCH, false, false)                                           \
    W4_GEMV_PDL(NAME##_silu, BOUNDS, G, BF16, PREFETCH, true, false)                                     \
    W4_GEMV_PDL(NAME##_norm, BOUNDS, G, BF16, PREFETCH, false, true)
#define LB __launch_bounds__(THREADS)
#define LB3 __launch_bounds__(THREADS, 3)
#define W4_GEMV_BOTH(NAME, G, BF16, PREFETCH) W4_GEMV_ALL(NAME, LB, G, BF16, PREFETCH)

W4_GEMV_BOTH(w4_gemv_bf16_g1, 1, true, false)
W4_GEMV_BOTH(w4_gemv_bf16_g2, 2, true, false)
W4_GEMV_BOTH(w4_gemv_bf16_g4, 4, true, false)
W4_GEMV_BOTH(w4_gemv_bf16_g8, 8, true, false)
W4_GEMV_BOTH(w4_gemv_f16_g1, 1, false, false)
W4_GEMV_BOTH(w4_gemv_f16_g2, 2, false, false)
W4_GEMV_BOTH(w4_gemv_f16_g4, 4, false, false)
W4_GEMV_BOTH(w4_gemv_f16_g8, 8, false, false)
W4_GEMV_BOTH(w4_gemv_bf16_g1_pf, 1, true, true)
W4_GEMV_BOTH(w4_gemv_bf16_g2_pf, 2, true, true)
W4_GEMV_BOTH(w4_gemv_bf16_g4_pf, 4, true, true)
W4_GEMV_BOTH(w4_gemv_bf16_g8_pf, 8, true, true)
W4_GEMV_BOTH(w4_gemv_f16_g1_pf, 1, false, true)
W4_GEMV_BOTH(w4_gemv_f16_g2_pf, 2, false, true)
W4_GEMV_BOTH(w4_gemv_f16_g4_pf, 4, false, true)
W4_GEMV_BOTH(w4_gemv_f16_g8_pf, 8, false, true)

// _o3: the register-staged kernel held to 85 registers, so that three CTAs (24 warps) share an SM, for group sizes
// >= 64 (G 1 and 2)
W4_GEMV_ALL(w4_gemv_bf16_g1_o3, LB3, 1, true, false)
W4_GEMV_ALL(w4_gemv_bf16_g2_o3, LB3, 2, true, false)
W4_GEMV_ALL(w4_gemv_f16_g1_o3, LB3, 1, false, false)
W4_GEMV_ALL(w4_gemv_f16_g2_o3, LB3, 2, false, false)
