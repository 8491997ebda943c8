// One-row FP8 GEMV on the tensor cores: out[n] = w_scale[n] * sum_k e4m3(W[n, k]) * x[k] (+ bias[n]), the weight
// e4m3 [N, K] row-major as torch._scaled_mm takes it (no repacking), the activations 16-bit and unquantized (W8A16,
// as lmserve/kernels/fp8.py's Triton fp8_gemv), float32 accumulation.
//
// One CTA = 16 output channels x one split of K; its warps take the split's chunks of CHUNK = 64 * U bytes in turn.
// Lane (g, t) = (lane / 4, lane % 4) loads, for u < U, 16 bytes of rows g and g + 8 at k = 64 u + 16 t of the chunk
// (each load of the warp reads sixteen 64-byte runs), all 2 U loads issued before any is used. Those bytes are the
// A fragments of four m16n8k16 tiles each: tile i takes bytes 4i .. 4i + 3, converted two at a time by
// cvt.rn.f16x2.e4m3x2 (exact), so a weight costs half a conversion and 1/8 of an mma. B holds, in every column, the
// lane's own x at the same k (in any order: A and B agree on it), so every lane ends with the tile's row sums.
// x is staged in shared memory as float16 times 2^-8 (exact for bf16 x from 2^-6 to 2^24, so no overflow of
// float16 where bf16 activations are large); the epilogue multiplies by 2^8 and the channel scale.
// With PDL (the _pdl kernels, launched as programmatic dependents) the first chunk's weight loads are issued
// before griddepcontrol.wait, i.e. while the kernel before still runs; everything else comes after the wait.
// Splits finish in the launch: float32 partials, and the tile's last CTA (an arrival counter it resets) adds them
// in split order (common.cuh: finish_splits).
//
// No headers: compiled by NVRTC at run time (lmserve/kernels/cuda_jit.py).

#include "common.cuh"

// four e4m3 (bytes 0..3 of w) -> float16 pairs (bytes 0, 1) and (bytes 2, 3), the lower byte in the lower half
__device__ __forceinline__ void e4m3x4_to_f16x2(u32 w, u32& lo, u32& hi) {
    asm("{\n\t.reg .b16 l, h;\n\tmov.b32 {l, h}, %2;\n\tcvt.rn.f16x2.e4m3x2 %0, l;\n\tcvt.rn.f16x2.e4m3x2 %1, h;\n\t}"
        : "=r"(lo), "=r"(hi)
        : "r"(w));
}

__device__ __forceinline__ void mma_f16(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

template <int WARPS, int U, bool BF16, bool PDL>
__device__ __forceinline__ void fp8_gemv(const u16* __restrict__ x, const unsigned char* __restrict__ w,
                                         const float* __restrict__ w_scale, const u16* __restrict__ bias,
                                         u16* __restrict__ out, float* __restrict__ partial,
                                         int* __restrict__ locks, int N, int K, int k_per_cta, long long stride_w,
                                         int has_bias) {
    constexpr int THREADS = WARPS * 32, CHUNK = 64 * U;
    extern __shared__ __align__(16) u16 xs[];  // num_chunks * CHUNK halves (the launch sizes it)
    __shared__ float red[WARPS][16];

    const int tile = blockIdx.x, split = blockIdx.y;
    const int k0 = split * k_per_cta, k_len = min(k_per_cta, K - k0);
    const int num_chunks = (k_len + CHUNK - 1) / CHUNK;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;
    const unsigned char* row_a = w + (long long)min(tile * 16 + g, N - 1) * stride_w + k0 + 16 * t;
    const unsigned char* row_b = w + (long long)min(tile * 16 + g + 8, N - 1) * stride_w + k0 + 16 * t;

    uint4 wa[U], wb[U];
    auto load_chunk = [&](int c) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int k = c * CHUNK + 64 * u + 16 * t;  // K is a multiple of 16: a load is all in or all out
            wa[u] = k < k_len ? load_stream(row_a + c * CHUNK + 64 * u) : make_uint4(0, 0, 0, 0);
            wb[u] = k < k_len ? load_stream(row_b + c * CHUNK + 64 * u) : make_uint4(0, 0, 0, 0);
        }
    };
    if (warp < num_chunks) load_chunk(warp);  // the first chunk's weights are on their way while x is staged
    if (PDL) pdl_enter();  // the weights above need nothing of the kernel before, x does

    for (int idx = 8 * tid; idx < num_chunks * CHUNK; idx += 8 * THREADS) {  // x * 2^-8 as float16, 0 past K
        uint4 v = make_uint4(0, 0, 0, 0);
        if (idx < k_len) v = *reinterpret_cast<const uint4*>(x + k0 + idx);  // K a multiple of 16, x aligned
        u32 words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float lo = to_float((u16)(words[i] & 0xFFFF), BF16) * 0.00390625f;
            const float hi = to_float((u16)(words[i] >> 16), BF16) * 0.00390625f;
            words[i] = (u32)from_float(lo, false) | ((u32)from_float(hi, false) << 16);
        }
        *reinterpret_cast<uint4*>(xs + idx) = make_uint4(words[0], words[1], words[2], words[3]);
    }
    __syncthreads();

    float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int c = warp; c < num_chunks; c += WARPS) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const uint4 x01 = *reinterpret_cast<const uint4*>(xs + c * CHUNK + 64 * u + 16 * t);
            const uint4 x23 = *reinterpret_cast<const uint4*>(xs + c * CHUNK + 64 * u + 16 * t + 8);
            const u32 xv[8] = {x01.x, x01.y, x01.z, x01.w, x23.x, x23.y, x23.z, x23.w};
            const u32 av[4] = {wa[u].x, wa[u].y, wa[u].z, wa[u].w}, bv[4] = {wb[u].x, wb[u].y, wb[u].z, wb[u].w};
#pragma unroll
            for (int i = 0; i < 4; ++i) {  // tile i: bytes 4i .. 4i + 3 of rows g (a0, a2) and g + 8 (a1, a3)
                u32 a0, a2, a1, a3;
                e4m3x4_to_f16x2(av[i], a0, a2);
                e4m3x4_to_f16x2(bv[i], a1, a3);
                mma_f16(d, a0, a1, a2, a3, xv[2 * i], xv[2 * i + 1]);
            }
        }
        if (c + WARPS < num_chunks) load_chunk(c + WARPS);
    }

    if (t == 0) {  // every column holds the row sums; lanes t = 0 hand them over
        red[warp][g] = d[0];
        red[warp][g + 8] = d[2];
    }
    __syncthreads();

    const int row = tile * 16 + tid;
    float value = 0.0f;
    if (tid < 16) {
#pragma unroll
        for (int v = 0; v < WARPS; ++v) value += red[v][tid];
    }
    if (gridDim.y > 1 && !finish_splits(value, partial, locks + tile, row, tid < 16 && row < N, N)) return;
    if (tid < 16 && row < N) {
        value *= 256.0f * w_scale[row];
        if (has_bias) value += to_float(bias[row], BF16);
        out[row] = from_float(value, BF16);
    }
}

#define FP8_GEMV(NAME, WARPS, U, BF16, PDL)                                                                   \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                                   \
        NAME(const u16* x, const unsigned char* w, const float* w_scale, const u16* bias, u16* out,            \
             float* partial, int* locks, int N, int K, int k_per_cta, long long stride_w, int has_bias) {      \
        fp8_gemv<WARPS, U, BF16, PDL>(x, w, w_scale, bias, out, partial, locks, N, K, k_per_cta, stride_w,     \
                                      has_bias);                                                               \
    }
#define FP8_GEMV_BOTH(NAME, WARPS, U, BF16) FP8_GEMV(NAME, WARPS, U, BF16, false) FP8_GEMV(NAME##_pdl, WARPS, U, BF16, true)

FP8_GEMV_BOTH(fp8_gemv_bf16_w4_u2, 4, 2, true)
FP8_GEMV_BOTH(fp8_gemv_bf16_w4_u4, 4, 4, true)
FP8_GEMV_BOTH(fp8_gemv_bf16_w8_u2, 8, 2, true)
FP8_GEMV_BOTH(fp8_gemv_bf16_w8_u4, 8, 4, true)
FP8_GEMV_BOTH(fp8_gemv_f16_w4_u2, 4, 2, false)
FP8_GEMV_BOTH(fp8_gemv_f16_w4_u4, 4, 4, false)
FP8_GEMV_BOTH(fp8_gemv_f16_w8_u2, 8, 2, false)
FP8_GEMV_BOTH(fp8_gemv_f16_w8_u4, 8, 4, false)
