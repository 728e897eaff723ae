// common.cuh -- what every kernel file shares: the CUDA/CPU switch, small integer types, the 16-bit
// float storage types and their bit-exact conversions, activation loads, the magic-number
// int->float trick and the warp reduction.
//
// Built three ways from the same text:
//   nvcc / NVRTC (engine.cuda.compile): no header beyond these files; the fp16/bf16 conversions are
//                                       the PTX cvt instructions cuda_fp16.h / cuda_bf16.h use on
//                                       sm_80+, so a pip-only install (no CUDA toolkit) compiles them;
//   g++ with -I kernels:                cpu_shim/cuda_cpu.h executes the kernels on CPU fibers.
// Deliberate bugs for the shim's self-test are injected with -D GK_BUG_* (see gemv.cu, dequant.cu).
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define GK_CUDA 1
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

// 16-bit float storage: the kernels only move their bits; arithmetic is fp32.
struct alignas(2) half_t { u16 bits; };
struct alignas(2) bf16_t { u16 bits; };

#if defined(GK_CUDA)
__device__ __forceinline__ float half_bits_to_float(u32 bits16) {  // exact
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(static_cast<u16>(bits16)));
    return f;
}
__device__ __forceinline__ u32 float_to_half_bits(float f) {  // round to nearest even
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ u32 float_to_bf16_bits(float f) {  // round to nearest even (sm_80+)
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#else
inline float half_bits_to_float(u32 bits16) { return __half2float(__ushort_as_half(static_cast<u16>(bits16))); }
inline u32 float_to_half_bits(float f) { return __half_as_ushort(__float2half_rn(f)); }
inline u32 float_to_bf16_bits(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
#endif

// Eight consecutive activations (one aligned 16-byte load) widened to fp32.
__device__ __forceinline__ void load8(const half_t* __restrict__ p, float (&f)[8]) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    const u32 w[4] = {v.x, v.y, v.z, v.w};
    GK_UNROLL
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = half_bits_to_float(w[i] & 0xffffu);
        f[2 * i + 1] = half_bits_to_float(w[i] >> 16);
    }
}

__device__ __forceinline__ void load8(const bf16_t* __restrict__ p, float (&f)[8]) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    const u32 w[4] = {v.x, v.y, v.z, v.w};
    GK_UNROLL
    for (int i = 0; i < 4; ++i) {  // bf16 -> fp32 is a shift
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

// Eight fp32 values rounded (RNE) to the output type and written with one aligned 16-byte store.
__device__ __forceinline__ u32 pack2(float a, float b, const half_t*) {
    return float_to_half_bits(a) | (float_to_half_bits(b) << 16);
}
__device__ __forceinline__ u32 pack2(float a, float b, const bf16_t*) {
    return float_to_bf16_bits(a) | (float_to_bf16_bits(b) << 16);
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
