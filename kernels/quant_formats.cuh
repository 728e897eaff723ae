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

// ---- 2-bit-based K-quants: chunk sub = 8 quant bytes = 32 weights, one group per bit pair -----------
// In half h (128 weights) bit pair g of quant byte l (0..31) is weight 32g + l. Chunk sub: h = sub/4,
// bytes l0 = 8*(sub%4) .. +7, group g = columns 128h + 32g + l0 .. +7, in 16-weight sub-block
// 8h + 2g + sub%4/2.
__device__ __forceinline__ int k2_col(int sub, int g) { return 128 * (sub >> 2) + 8 * (sub & 3) + 32 * g; }

// Q2_K: {u8 scales[16] (low nibble scale, high nibble min); u8 qs[64]; fp16 d, dmin}, 84 bytes
// (4-byte aligned: 32-bit loads). w = d*scale*q - dmin*min.
struct FmtQ2_K {
    static constexpr int QK = 256, BYTES = 84, SUBS = 8, GROUPS = 4;
    static constexpr bool BIAS = true;
    struct Raw { u32 q0, q1; float scale[4], bias[4]; };
    __device__ static __forceinline__ Raw fetch(const u8* __restrict__ blk, int sub) {
        const u32* w = reinterpret_cast<const u32*>(blk);
        const int h = sub >> 2, s0 = (sub & 3) >> 1;
        const float d = half_bits_to_float(w[20] & 0xffffu), dmin = half_bits_to_float(w[20] >> 16);
        Raw r;
        r.q0 = w[4 + 8 * h + 2 * (sub & 3)];
        r.q1 = w[5 + 8 * h + 2 * (sub & 3)];
        const u32 lo = w[2 * h], hi = w[2 * h + 1];  // scale bytes 8h .. 8h+7
        GK_UNROLL
        for (int g = 0; g < 4; ++g) {
            const u32 sc = ((g >> 1) ? hi : lo) >> (8 * (s0 + 2 * (g & 1)));
            r.scale[g] = __fmul_rn(d, float(sc & 0xfu));
            r.bias[g] = -__fmul_rn(dmin, float((sc >> 4) & 0xfu));
        }
        return r;
    }
    __device__ static __forceinline__ int col(int sub, int g) { return k2_col(sub, g); }
    __device__ static __forceinline__ void decode(const Raw& r, int g, float (&q)[8], float& scale, float& bias) {
        GK_UNROLL
        for (int j = 0; j < 4; ++j) {
            q[j] = qf((r.q0 >> (8 * j + 2 * g)) & 3u, 0.0f);
            q[4 + j] = qf((r.q1 >> (8 * j + 2 * g)) & 3u, 0.0f);
        }
        scale = r.scale[g];
        bias = r.bias[g];
    }
};

// Q3_K: {u8 hmask[32]; u8 qs[64]; u8 scales[12]; fp16 d}, 110 bytes (2-byte aligned: 16-bit loads).
// Weight 128h + 32g + l: low 2 bits as in Q2_K, bit 4h + g of hmask[l] set adds 4, minus 4 (q in
// -4..3). Scale of sub-block i: nibble i of bytes 0..7 (low nibbles first) | bit pair i/4 of byte
// 8 + i%4 << 4, minus 32. w = d*scale*q.
struct FmtQ3_K {
    static constexpr int QK = 256, BYTES = 110, SUBS = 8, GROUPS = 4;
    static constexpr bool BIAS = false;
    struct Raw { u32 q0, q1, m0, m1; float scale[4]; };
    __device__ static __forceinline__ u32 load4(const u16* p) { return p[0] | (u32(p[1]) << 16); }
    __device__ static __forceinline__ Raw fetch(const u8* __restrict__ blk, int sub) {
        const u16* h16 = reinterpret_cast<const u16*>(blk);
        const int h = sub >> 2, l0 = 8 * (sub & 3), s0 = (sub & 3) >> 1;
        Raw r;
        r.q0 = load4(h16 + (32 + 32 * h + l0) / 2);
        r.q1 = load4(h16 + (36 + 32 * h + l0) / 2);
        r.m0 = load4(h16 + l0 / 2) >> (4 * h);  // bit g of each byte: this half's high bit of group g
        r.m1 = load4(h16 + (l0 + 4) / 2) >> (4 * h);
        const float d = half_bits_to_float(h16[54]);
        const u32 low[2] = {load4(h16 + 48), load4(h16 + 50)}, high = load4(h16 + 52);
        GK_UNROLL
        for (int g = 0; g < 4; ++g) {
            const u32 lb = low[g >> 1] >> (8 * (s0 + 2 * (g & 1)) + 4 * h);  // byte 2g + s0, nibble h
            const u32 hb = high >> (8 * (s0 + 2 * (g & 1)) + 2 * (2 * h + (g >> 1)));
            const int sc = int((lb & 0xfu) | ((hb & 3u) << 4)) - 32;
            r.scale[g] = __fmul_rn(d, float(sc));
        }
        return r;
    }
    __device__ static __forceinline__ int col(int sub, int g) { return k2_col(sub, g); }
    __device__ static __forceinline__ void decode(const Raw& r, int g, float (&q)[8], float& scale, float& bias) {
        GK_UNROLL
        for (int j = 0; j < 4; ++j) {
            q[j] = qf(((r.q0 >> (8 * j + 2 * g)) & 3u) | (((r.m0 >> (8 * j + g)) & 1u) << 2), 4.0f);
            q[4 + j] = qf(((r.q1 >> (8 * j + 2 * g)) & 3u) | (((r.m1 >> (8 * j + g)) & 1u) << 2), 4.0f);
        }
        scale = r.scale[g];
        bias = 0.0f;
    }
};

// ---- IQ4: 4-bit codes naming one of 16 int8 levels (llama.cpp's kvalues_iq4nl) -------------------
// The levels of the 4 codes in nibbles 0..3 of s, as int8 bytes 0..3: codes 0-7 and 8-15 are looked
// up in both table halves (the levels as bytes, 4 per word) and bit 3 of each code picks one.
__device__ __forceinline__ u32 iq4_lookup4(u32 s) {
    const u32 lo = __byte_perm(0xBFAD9881u, 0xF6EADDCFu, s), hi = __byte_perm(0x26190D01u, 0x71594535u, s);
    return __byte_perm(lo, hi, 0x3210u | ((s >> 1) & 0x4444u));
}
// A word of 8 codes (byte j: code of column j in its low nibble, of column j + 16 in the high one)
// -> the levels of its low nibbles (lo) and high nibbles (hi), as int8 bytes in column order.
__device__ __forceinline__ void iq4_levels(u32 codes, u32& lo, u32& hi) {
    const u32 a = iq4_lookup4(codes), b = iq4_lookup4(codes >> 16);  // levels of lo0 hi0 lo1 hi1 / lo2 hi2 lo3 hi3
    lo = __byte_perm(a, b, 0x6420u);
    hi = __byte_perm(a, b, 0x7531u);
}
// Eight int8 levels (two words) -> floats.
__device__ __forceinline__ void iq4_floats(u32 a, u32 b, float (&q)[8]) {
    GK_UNROLL
    for (int j = 0; j < 4; ++j) {  // int8 -> (byte ^ 0x80) - 128
        q[j] = qf(((a >> (8 * j)) & 0xffu) ^ 0x80u, 128.0f);
        q[4 + j] = qf(((b >> (8 * j)) & 0xffu) ^ 0x80u, 128.0f);
    }
}

// IQ4_NL: {fp16 d; u8 codes[16]}, 18 bytes (16-bit loads); Q4_0's layout. w = d * level.
struct FmtIQ4_NL {
    static constexpr int QK = 32, BYTES = 18, SUBS = 2, GROUPS = 2;
    static constexpr bool BIAS = false;
    struct Raw { u32 lv[4]; float d; };  // levels: group 0 (low nibbles) lv[0..1], group 1 lv[2..3]
    __device__ static __forceinline__ Raw fetch(const u8* __restrict__ blk, int sub) {
        const u16* h = reinterpret_cast<const u16*>(blk);
        const u16* qs = h + 1 + 4 * sub;
        Raw r;
        iq4_levels(qs[0] | (u32(qs[1]) << 16), r.lv[0], r.lv[2]);
        iq4_levels(qs[2] | (u32(qs[3]) << 16), r.lv[1], r.lv[3]);
        r.d = half_bits_to_float(h[0]);
        return r;
    }
    __device__ static __forceinline__ int col(int sub, int g) { return 16 * g + 8 * sub; }
    __device__ static __forceinline__ void decode(const Raw& r, int g, float (&q)[8], float& scale, float& bias) {
        iq4_floats(r.lv[2 * g], r.lv[2 * g + 1], q);
        scale = r.d;
        bias = 0.0f;
    }
};

// IQ4_XS: {fp16 d; u16 scales_h; u8 scales_l[4]; u8 codes[128]}, 136 bytes (8-byte aligned: 64-bit
// loads). Chunk sub = sub-block sub: codes bytes 16*sub .. +15, low nibbles = columns 0..15, high =
// 16..31; scale d * ((nibble sub of scales_l | bit pair sub of scales_h << 4) - 32).
struct FmtIQ4_XS {
    static constexpr int QK = 256, BYTES = 136, SUBS = 8, GROUPS = 4;
    static constexpr bool BIAS = false;
    struct Raw { u32 lv[8]; float scale; };  // group g: lv[2g], lv[2g+1]
    __device__ static __forceinline__ Raw fetch(const u8* __restrict__ blk, int sub) {
        const uint2* w = reinterpret_cast<const uint2*>(blk);
        const uint2 head = w[0], c0 = w[1 + 2 * sub], c1 = w[2 + 2 * sub];
        Raw r;
        iq4_levels(c0.x, r.lv[0], r.lv[4]);  // columns 0..3 | 16..19
        iq4_levels(c0.y, r.lv[1], r.lv[5]);
        iq4_levels(c1.x, r.lv[2], r.lv[6]);  // columns 8..11 | 24..27
        iq4_levels(c1.y, r.lv[3], r.lv[7]);
        const u32 sc = ((head.y >> (4 * sub)) & 0xfu) | (((head.x >> (16 + 2 * sub)) & 3u) << 4);
        r.scale = __fmul_rn(half_bits_to_float(head.x & 0xffffu), float(int(sc) - 32));
        return r;
    }
    __device__ static __forceinline__ int col(int sub, int g) { return 32 * sub + 8 * g; }
    __device__ static __forceinline__ void decode(const Raw& r, int g, float (&q)[8], float& scale, float& bias) {
        iq4_floats(r.lv[2 * g], r.lv[2 * g + 1], q);
        scale = r.scale;
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
    X(q2_k, FmtQ2_K)    \
    X(q3_k, FmtQ3_K)    \
    X(q4_k, FmtQ4_K)    \
    X(q5_k, FmtQ5_K)    \
    X(q6_k, FmtQ6_K)    \
    X(iq4_nl, FmtIQ4_NL) \
    X(iq4_xs, FmtIQ4_XS) \
    X(f16, FmtF16)      \
    X(bf16, FmtBF16)
#endif

// Activation / output element types: (name, type).
#define GK_HALF_TYPES(X, ...) X(__VA_ARGS__, f16, gk::half_t) X(__VA_ARGS__, bf16, gk::bf16_t)
