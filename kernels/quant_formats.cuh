// quant_formats.cuh -- GGUF block formats as traits the GEMV and dequant kernels are generic over.
//
// A row of W (one output feature) is K/QK blocks of BYTES bytes, in ggml order. Each block is split
// into SUBS "chunks", one per thread per step; a chunk is GROUPS groups of 8 weights whose columns
// are contiguous (so the matching activations are one 16-byte load). Per group the traits give the
// 8 quantized values q (exact small integers, or the raw value for F16/BF16), a scale and, when
// BIAS, an offset:  w = scale * q + bias.
//
//   fetch(blk, sub)      -> Raw: the chunk's bytes and block header, loaded with the widest
//                           accesses the block alignment allows (noted per format).
//   decode(raw, g, q, scale, bias)   g must be a compile-time constant after unrolling.
//   col(sub, g)          -> column of the group's first weight inside the block.
#pragma once

#include "common.cuh"

namespace gk {

// ---- legacy 32-weight formats: a chunk is 8 bytes of qs = 16 weights in 2 groups --------------
// qs byte j holds weight j (low nibble) and weight j + 16 (high nibble); chunk `sub` holds bytes
// 8*sub .. 8*sub+7, so group 0 = columns 8*sub.., group 1 = columns 16 + 8*sub..

// Q4_0: {fp16 d; u8 qs[16]}, 18 bytes (2-byte aligned blocks: 16-bit loads). w = d * (nibble - 8).
struct FmtQ4_0 {
    static constexpr int QK = 32, BYTES = 18, SUBS = 2, GROUPS = 2;
    static constexpr bool BIAS = false;
    struct Raw { u32 q0, q1; float d; };
    __device__ static __forceinline__ Raw fetch(const u8* __restrict__ blk, int sub) {
        const u16* h = reinterpret_cast<const u16*>(blk);
        const u16* qs = h + 1 + 4 * sub;
        return Raw{qs[0] | (u32(qs[1]) << 16), qs[2] | (u32(qs[3]) << 16), half_bits_to_float(h[0])};
    }
    __device__ static __forceinline__ int col(int sub, int g) { return 16 * g + 8 * sub; }
    __device__ static __forceinline__ void decode(const Raw& r, int g, float (&q)[8], float& scale, float& bias) {
        const int sh = 4 * g;
        GK_UNROLL
        for (int j = 0; j < 4; ++j) {
            q[j] = qf((r.q0 >> (8 * j + sh)) & 0xfu, 8.0f);
            q[4 + j] = qf((r.q1 >> (8 * j + sh)) & 0xfu, 8.0f);
        }
        scale = r.d;
        bias = 0.0f;
    }
};

// Q4_1: {fp16 d, m; u8 qs[16]}, 20 bytes (4-byte aligned: 32-bit loads). w = d * nibble + m.
struct FmtQ4_1 {
    static constexpr int QK = 32, BYTES = 20, SUBS = 2, GROUPS = 2;
    static constexpr bool BIAS = true;
    struct Raw { u32 q0, q1; float d, m; };
    __device__ static __forceinline__ Raw fetch(const u8* __restrict__ blk, int sub) {
        const u32* w = reinterpret_cast<const u32*>(blk);
        const u32 dm = w[0];
        return Raw{w[1 + 2 * sub], w[2 + 2 * sub], half_bits_to_float(dm & 0xffffu), half_bits_to_float(dm >> 16)};
    }
    __device__ static __forceinline__ int col(int sub, int g) { return 16 * g + 8 * sub; }
    __device__ static __forceinline__ void decode(const Raw& r, int g, float (&q)[8], float& scale, float& bias) {
        const int sh = 4 * g;
        GK_UNROLL
        for (int j = 0; j < 4; ++j) {
            q[j] = qf((r.q0 >> (8 * j + sh)) & 0xfu, 0.0f);
            q[4 + j] = qf((r.q1 >> (8 * j + sh)) & 0xfu, 0.0f);
        }
        scale = r.d;
        bias = r.m;
    }
};

// Q5_0: {fp16 d; u32 qh; u8 qs[16]}, 22 bytes (16-bit loads). Bit j of qh is the 5th bit of weight j.
// w = d * (q5 - 16).
struct FmtQ5_0 {
    static constexpr int QK = 32, BYTES = 22, SUBS = 2, GROUPS = 2;
    static constexpr bool BIAS = false;
    struct Raw { u32 q0, q1, qh; float d; };
    __device__ static __forceinline__ Raw fetch(const u8* __restrict__ blk, int sub) {
        const u16* h = reinterpret_cast<const u16*>(blk);
        const u16* qs = h + 3 + 4 * sub;
        const u32 qh = h[1] | (u32(h[2]) << 16);
        return Raw{qs[0] | (u32(qs[1]) << 16), qs[2] | (u32(qs[3]) << 16), qh >> (8 * sub), half_bits_to_float(h[0])};
    }
    __device__ static __forceinline__ int col(int sub, int g) { return 16 * g + 8 * sub; }
    __device__ static __forceinline__ void decode(const Raw& r, int g, float (&q)[8], float& scale, float& bias) {
        const int sh = 4 * g;
        const u32 hb = r.qh >> (16 * g);  // bit j: 5th bit of this group's weight j
        GK_UNROLL
        for (int j = 0; j < 4; ++j) {
            q[j] = qf(((r.q0 >> (8 * j + sh)) & 0xfu) | (((hb >> j) & 1u) << 4), 16.0f);
            q[4 + j] = qf(((r.q1 >> (8 * j + sh)) & 0xfu) | (((hb >> (4 + j)) & 1u) << 4), 16.0f);
        }
        scale = r.d;
        bias = 0.0f;
    }
};

// Q5_1: {fp16 d, m; u32 qh; u8 qs[16]}, 24 bytes (32-bit loads). w = d * q5 + m.
struct FmtQ5_1 {
    static constexpr int QK = 32, BYTES = 24, SUBS = 2, GROUPS = 2;
    static constexpr bool BIAS = true;
    struct Raw { u32 q0, q1, qh; float d, m; };
    __device__ static __forceinline__ Raw fetch(const u8* __restrict__ blk, int sub) {
        const u32* w = reinterpret_cast<const u32*>(blk);
        const u32 dm = w[0];
        return Raw{w[2 + 2 * sub], w[3 + 2 * sub], w[1] >> (8 * sub), half_bits_to_float(dm & 0xffffu),
                   half_bits_to_float(dm >> 16)};
    }
    __device__ static __forceinline__ int col(int sub, int g) { return 16 * g + 8 * sub; }
    __device__ static __forceinline__ void decode(const Raw& r, int g, float (&q)[8], float& scale, float& bias) {
        const int sh = 4 * g;
        const u32 hb = r.qh >> (16 * g);
        GK_UNROLL
        for (int j = 0; j < 4; ++j) {
            q[j] = qf(((r.q0 >> (8 * j + sh)) & 0xfu) | (((hb >> j) & 1u) << 4), 0.0f);
            q[4 + j] = qf(((r.q1 >> (8 * j + sh)) & 0xfu) | (((hb >> (4 + j)) & 1u) << 4), 0.0f);
        }
        scale = r.d;
        bias = r.m;
    }
};

// Q8_0: {fp16 d; i8 qs[32]}, 34 bytes (16-bit loads). Chunk = 16 bytes = columns 16*sub .. +15.
struct FmtQ8_0 {
    static constexpr int QK = 32, BYTES = 34, SUBS = 2, GROUPS = 2;
    static constexpr bool BIAS = false;
    struct Raw { u32 q[4]; float d; };
    __device__ static __forceinline__ Raw fetch(const u8* __restrict__ blk, int sub) {
        const u16* h = reinterpret_cast<const u16*>(blk);
        const u16* qs = h + 1 + 8 * sub;
        Raw r;
        GK_UNROLL
        for (int i = 0; i < 4; ++i) r.q[i] = qs[2 * i] | (u32(qs[2 * i + 1]) << 16);
        r.d = half_bits_to_float(h[0]);
        return r;
    }
    __device__ static __forceinline__ int col(int sub, int g) { return 16 * sub + 8 * g; }
    __device__ static __forceinline__ void decode(const Raw& r, int g, float (&q)[8], float& scale, float& bias) {
        GK_UNROLL
        for (int j = 0; j < 8; ++j)  // int8 -> (byte ^ 0x80) - 128
            q[j] = qf(((r.q[2 * g + j / 4] >> (8 * (j % 4))) & 0xffu) ^ 0x80u, 128.0f);
        scale = r.d;
        bias = 0.0f;
    }
};

// ---- K-quants: 256-weight super-blocks, 8 chunks of 32 weights in 4 groups -----------------------

// 6-bit scale and min of sub-block j (0..7) from the 12 packed bytes s0|s1|s2 (little endian words).
__device__ __forceinline__ void k4_scale_min(u32 s0, u32 s1, u32 s2, int j, u32& sc, u32& mn) {
    // byte i of the 12 without dynamic indexing (keeps everything in registers)
    auto byte = [&](int i) -> u32 {
        const u32 w = i < 4 ? s0 : (i < 8 ? s1 : s2);
        return (w >> (8 * (i & 3))) & 0xffu;
    };
    if (j < 4) {
        sc = byte(j) & 63u;
        mn = byte(j + 4) & 63u;
    } else {
        sc = (byte(j + 4) & 0xfu) | ((byte(j - 4) >> 6) << 4);
        mn = (byte(j + 4) >> 4) | ((byte(j) >> 6) << 4);
    }
}

// Q4_K: {fp16 d, dmin; u8 scales[12]; u8 qs[128]}, 144 bytes (16-byte aligned: 128-bit qs loads).
// qs[32*p + l] holds sub-block 2p weight l (low nibble) and sub-block 2p+1 weight l (high nibble).
// Chunk sub: p = sub/2, bytes 32p + 16*(sub%2) .. +15. w = d*sc*q - dmin*m.
struct FmtQ4_K {
    static constexpr int QK = 256, BYTES = 144, SUBS = 8, GROUPS = 4;
    static constexpr bool BIAS = true;
    struct Raw { uint4 qs; float scale_lo, bias_lo, scale_hi, bias_hi; };
    __device__ static __forceinline__ Raw fetch(const u8* __restrict__ blk, int sub) {
        const u32* w = reinterpret_cast<const u32*>(blk);
        const int p = sub >> 1;
        const float d = half_bits_to_float(w[0] & 0xffffu), dmin = half_bits_to_float(w[0] >> 16);
        u32 sc0, m0, sc1, m1;
        k4_scale_min(w[1], w[2], w[3], 2 * p, sc0, m0);
        k4_scale_min(w[1], w[2], w[3], 2 * p + 1, sc1, m1);
        Raw r;
        r.qs = *reinterpret_cast<const uint4*>(blk + 16 + 32 * p + 16 * (sub & 1));
        r.scale_lo = __fmul_rn(d, float(sc0));
        r.bias_lo = -__fmul_rn(dmin, float(m0));
        r.scale_hi = __fmul_rn(d, float(sc1));
        r.bias_hi = -__fmul_rn(dmin, float(m1));
        return r;
    }
    // groups: 0,1 = low nibbles of bytes 0..7, 8..15; 2,3 = high nibbles (next sub-block)
    __device__ static __forceinline__ int col(int sub, int g) {
        return 64 * (sub >> 1) + 16 * (sub & 1) + 8 * (g & 1) + 32 * (g >> 1);
    }
    __device__ static __forceinline__ void decode(const Raw& r, int g, float (&q)[8], float& scale, float& bias) {
        const u32 a = (g & 1) ? r.qs.z : r.qs.x, b = (g & 1) ? r.qs.w : r.qs.y;
        const int sh = 4 * (g >> 1);
        GK_UNROLL
        for (int j = 0; j < 4; ++j) {
            q[j] = qf((a >> (8 * j + sh)) & 0xfu, 0.0f);
            q[4 + j] = qf((b >> (8 * j + sh)) & 0xfu, 0.0f);
        }
        scale = (g >> 1) ? r.scale_hi : r.scale_lo;
        bias = (g >> 1) ? r.bias_hi : r.bias_lo;
    }
};

// Q5_K: {fp16 d, dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]}, 176 bytes (16-byte aligned: 128-bit
// loads of qs and qh). The 5th bit of sub-block s, weight l is bit s of qh[l].
struct FmtQ5_K {
    static constexpr int QK = 256, BYTES = 176, SUBS = 8, GROUPS = 4;
    static constexpr bool BIAS = true;
    struct Raw { uint4 qs, qh; float scale_lo, bias_lo, scale_hi, bias_hi; int p; };
    __device__ static __forceinline__ Raw fetch(const u8* __restrict__ blk, int sub) {
        const u32* w = reinterpret_cast<const u32*>(blk);
        const int p = sub >> 1;
        const float d = half_bits_to_float(w[0] & 0xffffu), dmin = half_bits_to_float(w[0] >> 16);
        u32 sc0, m0, sc1, m1;
        k4_scale_min(w[1], w[2], w[3], 2 * p, sc0, m0);
        k4_scale_min(w[1], w[2], w[3], 2 * p + 1, sc1, m1);
        Raw r;
        r.qs = *reinterpret_cast<const uint4*>(blk + 48 + 32 * p + 16 * (sub & 1));
        r.qh = *reinterpret_cast<const uint4*>(blk + 16 + 16 * (sub & 1));
        r.scale_lo = __fmul_rn(d, float(sc0));
        r.bias_lo = -__fmul_rn(dmin, float(m0));
        r.scale_hi = __fmul_rn(d, float(sc1));
        r.bias_hi = -__fmul_rn(dmin, float(m1));
        r.p = p;
        return r;
    }
    __device__ static __forceinline__ int col(int sub, int g) { return FmtQ4_K::col(sub, g); }
    __device__ static __forceinline__ void decode(const Raw& r, int g, float (&q)[8], float& scale, float& bias) {
        const u32 a = (g & 1) ? r.qs.z : r.qs.x, b = (g & 1) ? r.qs.w : r.qs.y;
        const u32 ha = (g & 1) ? r.qh.z : r.qh.x, hb = (g & 1) ? r.qh.w : r.qh.y;
        const int sh = 4 * (g >> 1);
        const int bit = 2 * r.p + (g >> 1);
        GK_UNROLL
        for (int j = 0; j < 4; ++j) {
            q[j] = qf(((a >> (8 * j + sh)) & 0xfu) | (((ha >> (8 * j + bit)) & 1u) << 4), 0.0f);
            q[4 + j] = qf(((b >> (8 * j + sh)) & 0xfu) | (((hb >> (8 * j + bit)) & 1u) << 4), 0.0f);
        }
        scale = (g >> 1) ? r.scale_hi : r.scale_lo;
        bias = (g >> 1) ? r.bias_hi : r.bias_lo;
    }
};

// Q6_K: {u8 ql[128]; u8 qh[64]; i8 scales[16]; fp16 d}, 210 bytes (2-byte aligned: 16-bit loads).
// In half h (128 weights), position l (0..31): weight l     = ql[64h+l]    low  | qh[32h+l] bits 0-1,
// l+32 = ql[64h+32+l] low | bits 2-3, l+64 = ql[64h+l] high | bits 4-5, l+96 = ql[64h+32+l] high |
// bits 6-7; w = d * scales[(128h + col)/16] * (q6 - 32).  Chunk sub: h = sub/4, l = 8*(sub%4) .. +7.
struct FmtQ6_K {
    static constexpr int QK = 256, BYTES = 210, SUBS = 8, GROUPS = 4;
    static constexpr bool BIAS = false;
    struct Raw { u32 a0, a1, b0, b1, h0, h1; float scale[4]; };
    __device__ static __forceinline__ u32 load4(const u16* p) { return p[0] | (u32(p[1]) << 16); }
    __device__ static __forceinline__ Raw fetch(const u8* __restrict__ blk, int sub) {
        const u16* h16 = reinterpret_cast<const u16*>(blk);
        const int h = sub >> 2, l0 = 8 * (sub & 3);
        Raw r;
        const u16* a = h16 + (64 * h + l0) / 2;
        const u16* b = h16 + (64 * h + 32 + l0) / 2;
        const u16* qh = h16 + (128 + 32 * h + l0) / 2;
        r.a0 = load4(a);
        r.a1 = load4(a + 2);
        r.b0 = load4(b);
        r.b1 = load4(b + 2);
        r.h0 = load4(qh);
        r.h1 = load4(qh + 2);
        const float d = half_bits_to_float(h16[104]);
        const int byte_sel = 8 * ((sub & 3) >> 1);  // scale index 8h + (l0/16) + 2g: byte of u16 #(4h+g)
        GK_UNROLL
        for (int g = 0; g < 4; ++g) {
            const int s = static_cast<signed char>((h16[96 + 4 * h + g] >> byte_sel) & 0xffu);
            r.scale[g] = __fmul_rn(d, float(s));
        }
        return r;
    }
    __device__ static __forceinline__ int col(int sub, int g) { return 128 * (sub >> 2) + 8 * (sub & 3) + 32 * g; }
    __device__ static __forceinline__ void decode(const Raw& r, int g, float (&q)[8], float& scale, float& bias) {
        const u32 lo0 = (g & 1) ? r.b0 : r.a0, lo1 = (g & 1) ? r.b1 : r.a1;
        const int sh = 4 * (g >> 1), hsh = 2 * g;
        GK_UNROLL
        for (int j = 0; j < 4; ++j) {
            q[j] = qf(((lo0 >> (8 * j + sh)) & 0xfu) | (((r.h0 >> (8 * j + hsh)) & 3u) << 4), 32.0f);
            q[4 + j] = qf(((lo1 >> (8 * j + sh)) & 0xfu) | (((r.h1 >> (8 * j + hsh)) & 3u) << 4), 32.0f);
        }
        scale = r.scale[g];
        bias = 0.0f;
    }
};

// ---- unquantized: "blocks" of 8 values = one 128-bit load (rows must be 16-byte aligned) ----------
// Cvt::lo / Cvt::hi widen the low / high 16-bit value of a 32-bit word to float.
template <class Cvt>
struct Fmt16Bit {
    static constexpr int QK = 8, BYTES = 16, SUBS = 1, GROUPS = 1;
    static constexpr bool BIAS = false;
    struct Raw { uint4 v; };
    __device__ static __forceinline__ Raw fetch(const u8* __restrict__ blk, int) {
        return Raw{*reinterpret_cast<const uint4*>(blk)};
    }
    __device__ static __forceinline__ int col(int, int) { return 0; }
    __device__ static __forceinline__ void decode(const Raw& r, int, float (&q)[8], float& scale, float& bias) {
        const u32 w[4] = {r.v.x, r.v.y, r.v.z, r.v.w};
        GK_UNROLL
        for (int i = 0; i < 4; ++i) {
            q[2 * i] = Cvt::lo(w[i]);
            q[2 * i + 1] = Cvt::hi(w[i]);
        }
        scale = 1.0f;
        bias = 0.0f;
    }
};

struct HalfPair {
    __device__ static __forceinline__ float lo(u32 w) { return half_bits_to_float(w & 0xffffu); }
    __device__ static __forceinline__ float hi(u32 w) { return half_bits_to_float(w >> 16); }
};

struct Bf16Pair {
    __device__ static __forceinline__ float lo(u32 w) { return __uint_as_float(w << 16); }
    __device__ static __forceinline__ float hi(u32 w) { return __uint_as_float(w & 0xffff0000u); }
};

using FmtF16 = Fmt16Bit<HalfPair>;
using FmtBF16 = Fmt16Bit<Bf16Pair>;

}  // namespace gk

// The formats with kernels: (lower-case name used in entry points, traits). engine/cuda/kernels.py
// keeps the same list; tests assert the built entry points match it. A build may narrow it with
// -D'GK_FORMATS(X)=X(q4_k, FmtQ4_K)' (the shim's bug-injection tests do, to compile fast).
#ifndef GK_FORMATS
#define GK_FORMATS(X)   \
    X(q4_0, FmtQ4_0)    \
    X(q4_1, FmtQ4_1)    \
    X(q5_0, FmtQ5_0)    \
    X(q5_1, FmtQ5_1)    \
    X(q8_0, FmtQ8_0)    \
    X(q4_k, FmtQ4_K)    \
    X(q5_k, FmtQ5_K)    \
    X(q6_k, FmtQ6_K)    \
    X(f16, FmtF16)      \
    X(bf16, FmtBF16)
#endif

// Activation / output element types: (name, type).
#define GK_HALF_TYPES(X, ...) X(__VA_ARGS__, f16, __half) X(__VA_ARGS__, bf16, __nv_bfloat16)
