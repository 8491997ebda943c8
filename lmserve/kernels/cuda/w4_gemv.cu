// One-row W4A16 GEMV on CUDA cores over the K-interleaved layout of lmserve/kernels/w4a16.py (repack_awq).
//
// Layout: qweight int32 [N_pad / 64, K_pad / 8, 64]; a 128-row block of one 64-column strip is 16 packed rows
// x 64 words = 4 KB contiguous, and nibble j of word (16 * b + i, n) is the weight of row k = 128 * b + 16 * j + i.
// scales / zeros: [N_pad / 64, K_pad / group, 64] 16-bit floats (zeros are the integers 0..15), float16 or bfloat16
// independently of x (scales_bf16).
//
// One CTA = one strip x one split of the blocks; its 8 warps take the split's blocks in turn. Lane L loads the
// block's words 4 * L + 128 * t (t = 0..7) as eight 16-byte loads issued before any is used: packed row
// i = 2 * t + L / 16, columns 4 * (L % 16) .. + 3, so each load of the warp reads 512 contiguous bytes and a warp
// has 4 KB in flight. A weight costs one LOP3, one FADD and one FFMA: the nibble is OR-ed into the mantissa of
// 2**23 (nibble j of the low or high half-word keeps its place value 16**(j % 4)), (2**23 + z * 16**(j % 4)) is
// taken off exactly, and x arrives in shared memory pre-divided by 16**(j % 4). The group scale multiplies a
// group's partial sum once per block. Splits finish in the launch: float32 partials, and the strip's last CTA
// (an arrival counter it resets) adds them in split order.
//
// No headers: compiled by NVRTC at run time (lmserve/kernels/cuda_jit.py).

#define WARPS 8
#define THREADS (WARPS * 32)
#define MAX_BLOCKS_PER_CTA 32

typedef unsigned short u16;
typedef unsigned int u32;

__device__ __forceinline__ float to_float(u16 h, bool bf16) {
    if (bf16) return __uint_as_float(((u32)h) << 16);
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 from_float(float f, bool bf16) {
    u16 h;
    if (bf16)
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    else
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ uint4 load_stream(const u32* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

__device__ __forceinline__ uint2 load_u64(const u16* p) {
    uint2 v;
    asm volatile("ld.global.nc.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
    return v;
}

__device__ __forceinline__ float load_l2(const float* p) {
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
    return v;
}

// G: groups per 128-row block (1 for group sizes >= 128, else 128 / group). P: partial sums per column
// (at least 2, so a lane runs 8 independent FFMA chains).
template <int G, bool BF16>
__device__ __forceinline__ void w4_gemv(const u16* __restrict__ x, const u32* __restrict__ qweight,
                                        const u16* __restrict__ scales, const u16* __restrict__ zeros,
                                        u16* __restrict__ out, float* __restrict__ partial, int* __restrict__ locks,
                                        int N, int K, int num_blocks, int blocks_per_cta, int blocks_per_group,
                                        long long stride_w, long long stride_s, int scales_bf16) {
    constexpr int P = G < 2 ? 2 : G;
    __shared__ __align__(16) float xs[MAX_BLOCKS_PER_CTA * 128];
    __shared__ __align__(16) float red[WARPS][64];
    __shared__ int is_last;

    const int strip = blockIdx.x, split = blockIdx.y;
    const int kb0 = split * blocks_per_cta;
    const int nkb = min(blocks_per_cta, num_blocks - kb0);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

    // x of this split, pre-divided by the place value of its nibble, stored [block][i][j]
    for (int idx = tid; idx < nkb * 128; idx += THREADS) {
        const int k = kb0 * 128 + idx;
        const int r = idx & 127, j = r >> 4, i = r & 15;
        const float v = k < K ? to_float(x[k], BF16) : 0.0f;
        xs[(idx & ~127) + i * 8 + j] = v * __uint_as_float((127u - 4u * (u32)(j & 3)) << 23);
    }
    __syncthreads();

    const u32* wp = qweight + (long long)strip * stride_w + 4 * lane;
    const long long s_off = (long long)strip * stride_s + 4 * (lane & 15);
    const int half = lane >> 4;
    float total[4] = {0.0f, 0.0f, 0.0f, 0.0f};

    for (int b = warp; b < nkb; b += WARPS) {
        const int kb = kb0 + b;
        uint4 w[8];
#pragma unroll
        for (int t = 0; t < 8; ++t) w[t] = load_stream(wp + (long long)kb * 1024 + 128 * t);

        float s[4][G], c[4][8];
#pragma unroll
        for (int g = 0; g < G; ++g) {
            const long long group = G == 1 ? kb / blocks_per_group : (long long)kb * G + g;
            const uint2 sv = load_u64(scales + s_off + group * 64);
            const uint2 zv = load_u64(zeros + s_off + group * 64);
            const u32 sw[2] = {sv.x, sv.y}, zw[2] = {zv.x, zv.y};
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                s[q][g] = to_float((u16)(sw[q >> 1] >> (16 * (q & 1))), scales_bf16);
                const float z = to_float((u16)(zw[q >> 1] >> (16 * (q & 1))), scales_bf16);
#pragma unroll
                for (int j = 0; j < 8; ++j)
                    if (j * G / 8 == g) c[q][j] = fmaf(z, (float)(1 << (4 * (j & 3))), 8388608.0f);
            }
        }

        float part[4][P];
#pragma unroll
        for (int q = 0; q < 4; ++q)
#pragma unroll
            for (int p = 0; p < P; ++p) part[q][p] = 0.0f;

#pragma unroll
        for (int t = 0; t < 8; ++t) {
            const float* xr = xs + b * 128 + (2 * t + half) * 8;
            const float4 xa = *reinterpret_cast<const float4*>(xr);
            const float4 xb = *reinterpret_cast<const float4*>(xr + 4);
            const float xv[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
            const u32 words[4] = {w[t].x, w[t].y, w[t].z, w[t].w};
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const u32 lo = words[q], hi = words[q] >> 16;
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    const u32 src = j < 4 ? lo : hi;
                    const float v = __uint_as_float((src & (0xFu << (4 * (j & 3)))) | 0x4B000000u);
                    float& acc = part[q][j * P / 8];
                    acc = fmaf(v - c[q][j], xv[j], acc);
                }
            }
        }
#pragma unroll
        for (int q = 0; q < 4; ++q)
#pragma unroll
            for (int p = 0; p < P; ++p) total[q] = fmaf(part[q][p], s[q][p * G / P], total[q]);
    }

#pragma unroll
    for (int q = 0; q < 4; ++q) total[q] += __shfl_xor_sync(0xffffffffu, total[q], 16);
    if (lane < 16) *reinterpret_cast<float4*>(&red[warp][4 * lane]) = make_float4(total[0], total[1], total[2], total[3]);
    __syncthreads();

    const int col = strip * 64 + tid;
    float value = 0.0f;
    if (tid < 64) {
#pragma unroll
        for (int v = 0; v < WARPS; ++v) value += red[v][tid];
    }
    if (gridDim.y == 1) {
        if (tid < 64 && col < N) out[col] = from_float(value, BF16);
        return;
    }
    if (tid < 64 && col < N) partial[(long long)split * N + col] = value;
    __threadfence();
    __syncthreads();
    if (tid == 0) is_last = atomicAdd(locks + strip, 1) == (int)gridDim.y - 1;
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    if (tid < 64 && col < N) {
        float acc = 0.0f;
        for (int sp = 0; sp < (int)gridDim.y; ++sp) acc += load_l2(partial + (long long)sp * N + col);
        out[col] = from_float(acc, BF16);
    }
    if (tid == 0) atomicExch(locks + strip, 0);
}

#define W4_GEMV(NAME, G, BF16)                                                                                  \
    extern "C" __global__ void __launch_bounds__(THREADS) NAME(                                                 \
        const u16* x, const u32* qweight, const u16* scales, const u16* zeros, u16* out, float* partial,        \
        int* locks, int N, int K, int num_blocks, int blocks_per_cta, int blocks_per_group, long long stride_w, \
        long long stride_s, int scales_bf16) {                                                                  \
        w4_gemv<G, BF16>(x, qweight, scales, zeros, out, partial, locks, N, K, num_blocks, blocks_per_cta,      \
                         blocks_per_group, stride_w, stride_s, scales_bf16);                                    \
    }

W4_GEMV(w4_gemv_bf16_g1, 1, true)
W4_GEMV(w4_gemv_bf16_g2, 2, true)
W4_GEMV(w4_gemv_bf16_g4, 4, true)
W4_GEMV(w4_gemv_bf16_g8, 8, true)
W4_GEMV(w4_gemv_f16_g1, 1, false)
W4_GEMV(w4_gemv_f16_g2, 2, false)
W4_GEMV(w4_gemv_f16_g4, 4, false)
W4_GEMV(w4_gemv_f16_g8, 8, false)
