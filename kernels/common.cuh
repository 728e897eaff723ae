// common.cuh -- what every kernel file shares: the CUDA/CPU switch, small integer types, activation
// loads, the magic-number int->float trick and the warp reduction.
//
// Built three ways from the same text:
//   nvcc / NVRTC (cupy.RawModule): the real CUDA headers;
//   g++ with -I kernels:            cpu_shim/cuda_cpu.h executes the kernels on CPU fibers.
// Deliberate bugs for the shim's self-test are injected with -D GK_BUG_* (see gemv.cu, dequant.cu).
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define GK_UNROLL _Pragma("unroll")
#else
#include "cpu_shim/cuda_cpu.h"
#define GK_UNROLL _Pragma("GCC unroll 16")
#endif

namespace gk {

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

constexpr unsigned kFullMask = 0xffffffffu;

// Exact small unsigned integer v (< 2^23) minus `zero`, as float, in one OR and one FADD:
// 0x4B000000 | v is the float 2^23 + v.
__device__ __forceinline__ float qf(u32 v, float zero) {
    return __uint_as_float(0x4B000000u | v) - (8388608.0f + zero);
}

__device__ __forceinline__ float half_bits_to_float(u32 bits16) {
    return __half2float(__ushort_as_half(static_cast<u16>(bits16)));
}

// Eight consecutive activations (one aligned 16-byte load) widened to fp32.
__device__ __forceinline__ void load8(const __half* __restrict__ p, float (&f)[8]) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    const u32 w[4] = {v.x, v.y, v.z, v.w};
    GK_UNROLL
    for (int i = 0; i < 4; ++i) {
        const float2 t = __half22float2(__halves2half2(__ushort_as_half(static_cast<u16>(w[i] & 0xffffu)),
                                                      __ushort_as_half(static_cast<u16>(w[i] >> 16))));
        f[2 * i] = t.x;
        f[2 * i + 1] = t.y;
    }
}

__device__ __forceinline__ void load8(const __nv_bfloat16* __restrict__ p, float (&f)[8]) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    const u32 w[4] = {v.x, v.y, v.z, v.w};
    GK_UNROLL
    for (int i = 0; i < 4; ++i) {  // bf16 -> fp32 is a shift
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

// Eight fp32 values rounded (RNE) to the output type and written with one aligned 16-byte store.
__device__ __forceinline__ u32 pack2(float a, float b, const __half*) {
    return static_cast<u32>(__half_as_ushort(__float2half_rn(a))) |
           (static_cast<u32>(__half_as_ushort(__float2half_rn(b))) << 16);
}
__device__ __forceinline__ u32 pack2(float a, float b, const __nv_bfloat16*) {
    return static_cast<u32>(__bfloat16_as_ushort(__float2bfloat16_rn(a))) |
           (static_cast<u32>(__bfloat16_as_ushort(__float2bfloat16_rn(b))) << 16);
}
template <class OT>
__device__ __forceinline__ void store8(OT* __restrict__ p, const float (&f)[8]) {
    const OT* tag = nullptr;
    uint4 v;
    v.x = pack2(f[0], f[1], tag);
    v.y = pack2(f[2], f[3], tag);
    v.z = pack2(f[4], f[5], tag);
    v.w = pack2(f[6], f[7], tag);
    *reinterpret_cast<uint4*>(p) = v;
}

#if defined(GK_BUG_SHFL_LANE)
#define GK_XOR_LANE(off) ((off) ^ 1)  // injected bug: wrong partner lane
#else
#define GK_XOR_LANE(off) (off)
#endif

// Butterfly sum over the 32 lanes of a warp; every lane gets the total.
__device__ __forceinline__ float warp_sum(float v) {
    GK_UNROLL
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, GK_XOR_LANE(off));
    return v;
}

}  // namespace gk
