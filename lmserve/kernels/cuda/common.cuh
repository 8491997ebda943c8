// Helpers shared by the CUDA C kernels; cuda_jit inlines this file where a source says #include "common.cuh"
// (NVRTC gets one self-contained source, no include path).

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

// silu(gate) * up in float32, rounded once to the 16-bit dtype, with the instructions Triton gives
// kernels/activation.py's silu_and_mul (gate * sigmoid(gate) * up): e = 2^(gate * -log2(e)), s = 1 / (1 + e) by
// div.full, (s * gate) * up; so the value is the one that kernel stores, bit for bit
__device__ __forceinline__ u16 silu_mul(u16 gate, u16 up, bool bf16) {
    const float g = to_float(gate, bf16);
    float e, s;
    asm("ex2.approx.f32 %0, %1;" : "=f"(e) : "f"(g * __int_as_float(0xBFB8AA3B)));
    asm("div.full.f32 %0, %1, %2;" : "=f"(s) : "f"(1.0f), "f"(e + 1.0f));
    return from_float(s * g * to_float(up, bf16), bf16);
}

// silu_mul of eight 16-bit pairs: gate and up as 16 bytes each
__device__ __forceinline__ uint4 silu_mul8(uint4 gate, uint4 up, bool bf16) {
    const u32 g[4] = {gate.x, gate.y, gate.z, gate.w}, u[4] = {up.x, up.y, up.z, up.w};
    u32 out[4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
        out[i] = (u32)silu_mul((u16)(g[i] & 0xFFFF), (u16)(u[i] & 0xFFFF), bf16) |
                 ((u32)silu_mul((u16)(g[i] >> 16), (u16)(u[i] >> 16), bf16) << 16);
    return make_uint4(out[0], out[1], out[2], out[3]);
}

// x + r of eight 16-bit pairs, each sum rounded to the 16-bit dtype (as a Triton 16-bit add rounds it)
__device__ __forceinline__ uint4 add8(uint4 x, uint4 r, bool bf16) {
    const u32 a[4] = {x.x, x.y, x.z, x.w}, b[4] = {r.x, r.y, r.z, r.w};
    u32 out[4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
        out[i] = (u32)from_float(to_float((u16)(a[i] & 0xFFFF), bf16) + to_float((u16)(b[i] & 0xFFFF), bf16), bf16) |
                 ((u32)from_float(to_float((u16)(a[i] >> 16), bf16) + to_float((u16)(b[i] >> 16), bf16), bf16)
                  << 16);
    return make_uint4(out[0], out[1], out[2], out[3]);
}

// the sum of the squares of eight 16-bit values, in float32
__device__ __forceinline__ float sum_squares8(uint4 h, bool bf16) {
    const u32 w[4] = {h.x, h.y, h.z, h.w};
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float lo = to_float((u16)(w[i] & 0xFFFF), bf16), hi = to_float((u16)(w[i] >> 16), bf16);
        s = fmaf(lo, lo, s);
        s = fmaf(hi, hi, s);
    }
    return s;
}

// RMSNorm's output of eight 16-bit values h with weights nw: (h * rstd) rounded, times the weight, rounded (as
// kernels/rmsnorm.py rounds them)
__device__ __forceinline__ uint4 norm8(uint4 h, uint4 nw, float rstd, bool bf16) {
    const u32 a[4] = {h.x, h.y, h.z, h.w}, b[4] = {nw.x, nw.y, nw.z, nw.w};
    u32 out[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const u16 lo = from_float(to_float((u16)(a[i] & 0xFFFF), bf16) * rstd, bf16);
        const u16 hi = from_float(to_float((u16)(a[i] >> 16), bf16) * rstd, bf16);
        out[i] = (u32)from_float(to_float((u16)(b[i] & 0xFFFF), bf16) * to_float(lo, bf16), bf16) |
                 ((u32)from_float(to_float((u16)(b[i] >> 16), bf16) * to_float(hi, bf16), bf16) << 16);
    }
    return make_uint4(out[0], out[1], out[2], out[3]);
}

// the sum of one float over a CTA of NUM_WARPS warps (every thread calls it; every thread gets the sum)
template <int NUM_WARPS>
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float warp_sums[NUM_WARPS];
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, offset);
    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = v;
    __syncthreads();
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < NUM_WARPS; ++w) total += warp_sums[w];
    return total;
}

// 16 bytes of a weight read once: not kept in L1
__device__ __forceinline__ uint4 load_stream(const void* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

// a split partial written by another CTA of this launch: from L2, past L1
__device__ __forceinline__ float load_l2(const float* p) {
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
    return v;
}

// A kernel launched as a programmatic dependent (PDL, kernels/_triton.py): wait until the kernel before has finished
// and its writes are visible, then let the next kernel launch (waiting first keeps the chain of launched-but-waiting
// kernels one deep). Loads that need nothing of the kernel before (weights) may be issued before it.
__device__ __forceinline__ void pdl_enter() {
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;");
}

// Split-K finish inside the launch: each CTA of an output tile stores its float32 partial `value` (threads with
// `active`, one output `col` each) in split order at partial[split * N + col]; the tile's last arriving CTA (the
// arrival counter `lock`, which it resets for the next launch) returns true with `value` the sum of every split's
// partial in split order (the same sum whichever CTA arrives last); the others return false and must exit.
__device__ __forceinline__ bool finish_splits(float& value, float* __restrict__ partial, int* __restrict__ lock,
                                              int col, bool active, int N) {
    __shared__ int is_last;
    if (active) partial[(long long)blockIdx.y * N + col] = value;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) is_last = atomicAdd(lock, 1) == (int)gridDim.y - 1;
    __syncthreads();
    if (!is_last) return false;
    __threadfence();
    if (active) {
        value = 0.0f;
        for (int sp = 0; sp < (int)gridDim.y; ++sp) value += load_l2(partial + (long long)sp * N + col);
    }
    if (threadIdx.x == 0) atomicExch(lock, 0);
    return true;
}
