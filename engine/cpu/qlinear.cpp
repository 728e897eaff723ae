// Fused dequantize + matmul on raw GGUF weight blocks: out(T, N) = x(T, K) @ W(N, K)^T.
//
// Four numeric paths, each identical in every code path (so results never depend on T tiling,
// thread count, which thread computed what, or the AVX-512 vs portable build):
//   * integer path (Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS; "Integer path" below): x rounded to int16 per 256 elements,
//     exact integer dot products, one fp32 fma per super-block;
//   * pair path (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL; "Pair path" below): x rounded to int16 per 32
//     elements, two blocks per 16-lane register, one fp32 fma per pair of blocks;
//   * 8-bit path (Q4_K, Q5_K, Q6_K, only when the caller asks for it: mode 2; q8_path.h): x rounded to
//     int8 per 256 elements as llama.cpp does, exact per-block integers and 8 fp32 accumulators;
//   * fp32 path (every other format, and every format in mode 1):
//       - each weight is dequantized to fp32 by one fixed expression per format (d*q, fma(q, d, m), ...);
//       - each output element owns one 16-lane fp32 accumulator; for every 32-element chunk of K, in
//         order, it does acc = fma(x[0:16], w[0:16], acc) then acc = fma(x[16:32], w[16:32], acc)
//         (lanes hold the 16 elements in a fixed per-format order, see kSigma);
//       - the 16 lanes are summed with one fixed pairwise tree (lane i + lane i+8, then +4, +2, +1).
// The AVX-512 path and the portable path (GCC vector extensions, any ISA) follow each contract
// exactly, so on an FMA machine they are bit-identical.
//
// Work: rows of W are split into groups of kRows, handed out to a small persistent thread pool
// (caller included, see Pool: one contiguous slice of groups per thread). Small T decodes each
// weight block into registers and uses it for every row of x; larger T decodes a few rows once into
// a scratch panel and runs a register-tiled microkernel over all of x (run_rows).
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <memory>
#include <new>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && \
    defined(__F16C__) && !defined(QL_PORTABLE)
#define QL_AVX512 1
#else
#define QL_AVX512 0
#endif

#define QL_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

using i64 = int64_t;

// GGML type ids (the numbers stored in GGUF tensor infos).
enum TypeId : int {
    kF32 = 0, kF16 = 1, kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8,
    kQ2_K = 10, kQ3_K = 11, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14, kIQ4_NL = 20, kIQ4_XS = 23, kBF16 = 30,
};

// The 16 levels of the IQ4_NL / IQ4_XS codes (llama.cpp's kvalues_iq4nl).
alignas(16) constexpr int8_t kIQ4Levels[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
#if defined(__SSSE3__)
// The levels of 16 codes (bytes, each 0..15), as int8.
inline __m128i iq4_levels(__m128i codes) {
    return _mm_shuffle_epi8(_mm_load_si128(reinterpret_cast<const __m128i*>(kIQ4Levels)), codes);
}
// The levels of 16 code bytes' low nibbles (elements 0..15) and high nibbles (16..31), as int8.
inline void iq4_nibble_levels(const uint8_t* codes, __m128i& lo, __m128i& hi) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)), m4 = _mm_set1_epi8(15);
    lo = iq4_levels(_mm_and_si128(v, m4));
    hi = iq4_levels(_mm_and_si128(_mm_srli_epi16(v, 4), m4));
}
#endif

// Lane order of the 4-bit/5-bit/6-bit formats: lane L of a 16-element half holds element
// kSigma[L] (a 4x4 transpose, what a 128-bit broadcast plus per-lane shifts yields; see Formats).
constexpr int kSigma[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};  // 4x4 transpose

// ---------------------------------------------------------------------------------------------
// Scalar helpers
// ---------------------------------------------------------------------------------------------
inline uint16_t load_u16(const uint8_t* p) { uint16_t v; std::memcpy(&v, p, 2); return v; }
inline uint32_t load_u32(const uint8_t* p) { uint32_t v; std::memcpy(&v, p, 4); return v; }

inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    const uint32_t sign = uint32_t(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else {  // subnormal half: normalise
        int e = -1;
        do { man <<= 1; ++e; } while (!(man & 0x400));
        bits = sign | (uint32_t(112 - e) << 23) | ((man & 0x3FF) << 13);
    }
    float f; std::memcpy(&f, &bits, 4); return f;
#endif
}
inline float half_at(const uint8_t* p) { return half_to_float(load_u16(p)); }

inline float bf16_to_float(uint16_t b) { uint32_t bits = uint32_t(b) << 16; float f; std::memcpy(&f, &bits, 4); return f; }

// 6-bit sub-block scale and min of a Q4_K / Q5_K super-block (12 packed bytes), sub-block j in 0..7.
inline void kquant_scale_min(const uint8_t* s, int j, int& sc, int& mn) {
    if (j < 4) {
        sc = s[j] & 63;
        mn = s[j + 4] & 63;
    } else {
        sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
        mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

// ---------------------------------------------------------------------------------------------
// 16-lane fp32 vector
// ---------------------------------------------------------------------------------------------
#if QL_AVX512
using V = __m512;
inline V vzero() { return _mm512_setzero_ps(); }
inline V vload(const float* p) { return _mm512_loadu_ps(p); }
inline V vload_n(const float* p, int n) { return _mm512_maskz_loadu_ps(__mmask16((1u << n) - 1u), p); }
inline void vstore(float* p, V v) { _mm512_storeu_ps(p, v); }
inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(V a) {
    const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}
// vsum of 16 vectors at once, with exactly vsum's additions: lane L of the result is
// vsum(a[kSigma[L]]), i.e. a 4x4 transpose of the inputs' order.
inline __m512 vsum16(const __m512* a) {
    __m512 p[8], q[4], r[2];
    for (int i = 0; i < 8; ++i)  // s8: lanes j + j+8, two vectors per register
        p[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; ++i)  // s4: j + j+4, four vectors per register
        q[i] = _mm512_add_ps(_mm512_shuffle_f32x4(p[2 * i], p[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(p[2 * i], p[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; ++i)  // s2: j + j+2
        r[i] = _mm512_add_ps(_mm512_shuffle_ps(q[2 * i], q[2 * i + 1], 0x44),
                             _mm512_shuffle_ps(q[2 * i], q[2 * i + 1], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_ps(r[0], r[1], 0x88), _mm512_shuffle_ps(r[0], r[1], 0xDD));  // s1
}
#else
// Portable path: 16 lanes as a pair of 8-lane GCC vectors (one AVX register each; SSE targets
// split them again), with the few operations the decoders need. A pair rather than one 64-byte
// vector: GCC keeps arrays of native-size vectors (the accumulator tiles) in registers, but not
// arrays of vectors wider than the target's registers. Every fused multiply-add of the contract
// is explicit, which keeps this path bit-identical to the AVX-512 one on FMA hardware.
typedef float F8 __attribute__((vector_size(32)));
typedef int32_t I8 __attribute__((vector_size(32)));
typedef uint32_t U8 __attribute__((vector_size(32)));
typedef uint16_t H8 __attribute__((vector_size(16)));

template <class H>
struct Pair {
    H a, b;  // lanes 0..7, 8..15
    friend Pair operator+(Pair x, Pair y) { return {x.a + y.a, x.b + y.b}; }
    friend Pair operator*(Pair x, Pair y) { return {x.a * y.a, x.b * y.b}; }
    friend Pair operator|(Pair x, Pair y) { return {x.a | y.a, x.b | y.b}; }
    friend Pair operator&(Pair x, int s) { return {x.a & s, x.b & s}; }
    friend Pair operator-(Pair x, int s) { return {x.a - s, x.b - s}; }
    friend Pair operator>>(Pair x, int s) { return {x.a >> s, x.b >> s}; }
    friend Pair operator<<(Pair x, int s) { return {x.a << s, x.b << s}; }
};
using V = Pair<F8>;
using VI = Pair<I8>;

inline V vzero() { return {F8{}, F8{}}; }
inline V vload(const float* p) {
    V v;
    std::memcpy(&v.a, p, sizeof v.a);
    std::memcpy(&v.b, p + 8, sizeof v.b);
    return v;
}
inline V vload_n(const float* p, int n) {
    float t[16] = {};
    for (int i = 0; i < n; ++i) t[i] = p[i];
    return vload(t);
}
inline void vstore(float* p, V v) {
    std::memcpy(p, &v.a, sizeof v.a);
    std::memcpy(p + 8, &v.b, sizeof v.b);
}
inline F8 fma8(F8 a, F8 b, F8 c) {
#if defined(__FMA__)
    return F8(_mm256_fmadd_ps(__m256(a), __m256(b), __m256(c)));
#else
    for (int i = 0; i < 8; ++i) a[i] = __builtin_fmaf(a[i], b[i], c[i]);
    return a;
#endif
}
inline V vfma(V x, V y, V z) { return {fma8(x.a, y.a, z.a), fma8(x.b, y.b, z.b)}; }
inline V vset(float a) { return {F8{} + a, F8{} + a}; }
inline V to_float(VI v) { return {__builtin_convertvector(v.a, F8), __builtin_convertvector(v.b, F8)}; }
// Byte -> int32 lanes: signed bytes p[0..15], or unsigned byte p[kSigma[L]] in lane L.
#if defined(__AVX2__)
inline VI s8_lanes(const uint8_t* p) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return {I8(_mm256_cvtepi8_epi32(v)), I8(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)))};
}
inline VI sigma_u8_lanes(const uint8_t* p) {
    const __m128i v = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)),
                                       _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15));
    return {I8(_mm256_cvtepu8_epi32(v)), I8(_mm256_cvtepu8_epi32(_mm_srli_si128(v, 8)))};
}
#else
inline VI s8_lanes(const uint8_t* p) {
    VI r;
    for (int l = 0; l < 8; ++l) { r.a[l] = int8_t(p[l]); r.b[l] = int8_t(p[l + 8]); }
    return r;
}
inline VI sigma_u8_lanes(const uint8_t* p) {
    VI r;
    for (int l = 0; l < 8; ++l) { r.a[l] = p[kSigma[l]]; r.b[l] = p[kSigma[l + 8]]; }
    return r;
}
#endif
// Lane L = t[idx lane L] (idx in 0..15): the IQ4 level tables.
inline V lookup_lanes(const float* t, VI idx) {
    V v;
    for (int l = 0; l < 8; ++l) {
        v.a[l] = t[idx.a[l]];
        v.b[l] = t[idx.b[l]];
    }
    return v;
}
// Bit 4 of the 5-bit codes of a legacy Q5 block, as 0/1 per lane (kSigma order).
inline void q5_high_bits(const uint8_t* qh, VI& lo, VI& hi) {
    const U8 bits = U8{} + load_u32(qh);
    const U8 s0 = {0, 4, 8, 12, 1, 5, 9, 13}, s1 = {2, 6, 10, 14, 3, 7, 11, 15};
    lo = {I8((bits >> s0) & 1), I8((bits >> s1) & 1)};
    hi = {I8((bits >> (s0 + 16)) & 1), I8((bits >> (s1 + 16)) & 1)};
}
// 16 bf16 values -> fp32 (bits << 16).
inline V bf16_lanes(const uint8_t* p) {
    H8 h0, h1;
    std::memcpy(&h0, p, sizeof h0);
    std::memcpy(&h1, p + 16, sizeof h1);
    const U8 a = __builtin_convertvector(h0, U8) << 16, b = __builtin_convertvector(h1, U8) << 16;
    return {F8(a), F8(b)};
}
inline float vsum(V v) {
    const F8 s8 = v.a + v.b;  // lane i + lane i+8
    float s4[4];
    for (int i = 0; i < 4; ++i) s4[i] = s8[i] + s8[i + 4];
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}
#endif

// ---------------------------------------------------------------------------------------------
// Formats. decode() turns 32-element chunk c of one row into two 16-lane vectors: lo holds
// elements 0..15 of the chunk, hi elements 16..31. Formats with kPermuted put element kSigma[L]
// in lane L of each half (x is permuted the same way before the call, so the dot product and
// its rounding are unchanged in meaning, only the lane assignment differs). Formats with
// kScales > 0 first convert each row's per-block fp16 fields once, in prepare(), into
// kScales floats per chunk; decode() reads them from there.
// Float formats also decode a final partial chunk of n < 32 elements (zero-filled).
// ---------------------------------------------------------------------------------------------

// Scale prepass of the legacy 32-blocks: s[2c], s[2c+1] = the fp16 values at bytes 0 and 2 of
// block c (d and m, or d and whatever follows it, which is then unused).
template <int kBytes>
void prepare_halves(const uint8_t* row, i64 chunks, float* s) {
    i64 c = 0;
#if QL_AVX512
    const __m512i offsets = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(kBytes));
    for (; c + 16 <= chunks; c += 16) {
        const __m512i g = _mm512_i32gather_epi32(offsets, row + c * kBytes, 1);  // 16 x (half1 << 16 | half0)
        _mm512_storeu_ps(s + 2 * c, _mm512_cvtph_ps(_mm512_castsi512_si256(g)));
        _mm512_storeu_ps(s + 2 * c + 16, _mm512_cvtph_ps(_mm512_extracti64x4_epi64(g, 1)));
    }
#endif
    for (; c < chunks; ++c) {
        s[2 * c] = half_at(row + c * kBytes);
        s[2 * c + 1] = half_at(row + c * kBytes + 2);
    }
}

struct FmtF32 {
    static constexpr int kBlock = 1, kBytes = 4, kScales = 0;
    static constexpr bool kPermuted = false;
    static void decode(const uint8_t* row, const float*, i64 c, V& lo, V& hi) {
        const float* p = reinterpret_cast<const float*>(row) + c * 32;
        lo = vload(p);
        hi = vload(p + 16);
    }
    static void decode_tail(const uint8_t* row, i64 c, int n, V& lo, V& hi) {
        const float* p = reinterpret_cast<const float*>(row) + c * 32;
        lo = vload_n(p, n < 16 ? n : 16);
        hi = n > 16 ? vload_n(p + 16, n - 16) : vzero();
    }
};

struct FmtF16 {
    static constexpr int kBlock = 1, kBytes = 2, kScales = 0;
    static constexpr bool kPermuted = false;
    static void decode(const uint8_t* row, const float*, i64 c, V& lo, V& hi) {
        const uint8_t* p = row + c * 64;
#if QL_AVX512
        lo = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
        hi = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32)));
#else
        float w[32];
        for (int i = 0; i < 32; ++i) w[i] = half_at(p + 2 * i);
        lo = vload(w);
        hi = vload(w + 16);
#endif
    }
    static void decode_tail(const uint8_t* row, i64 c, int n, V& lo, V& hi) {
        const uint8_t* p = row + c * 64;
        float w[32] = {};
        for (int i = 0; i < n; ++i) w[i] = half_at(p + 2 * i);
        lo = vload(w);
        hi = vload(w + 16);
    }
};

struct FmtBF16 {
    static constexpr int kBlock = 1, kBytes = 2, kScales = 0;
    static constexpr bool kPermuted = false;
    static void decode(const uint8_t* row, const float*, i64 c, V& lo, V& hi) {
        const uint8_t* p = row + c * 64;
#if QL_AVX512
        const auto widen = [](const uint8_t* q) {
            const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
            return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
        };
        lo = widen(p);
        hi = widen(p + 32);
#else
        lo = bf16_lanes(p);
        hi = bf16_lanes(p + 32);
#endif
    }
    static void decode_tail(const uint8_t* row, i64 c, int n, V& lo, V& hi) {
        const uint8_t* p = row + c * 64;
        float w[32] = {};
        for (int i = 0; i < n; ++i) w[i] = bf16_to_float(load_u16(p + 2 * i));
        lo = vload(w);
        hi = vload(w + 16);
    }
};

#if QL_AVX512
inline __m512i bytes_s32(const uint8_t* p) { return _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m512i bytes_u32(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m512 iota() { return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
// 16 bytes repeated in all four 128-bit lanes: dword lane L holds bytes 4*(L%4) .. 4*(L%4)+3.
inline __m512i bcast16(const uint8_t* p) { return _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
// Per-lane right shifts bringing byte kSigma[L] of a bcast16() to bits 0..7 of lane L (plus `extra`).
inline __m512i sigma_shift(int extra) {
    return _mm512_add_epi32(_mm512_setr_epi32(0, 0, 0, 0, 8, 8, 8, 8, 16, 16, 16, 16, 24, 24, 24, 24),
                            _mm512_set1_epi32(extra));
}
// 4-bit codes of 16 bytes (nibble at `shift`) looked up in a 16-entry table; vpermps reads index
// bits 0..3 only, so no masking is needed. Lanes come out in kSigma order.
inline __m512 lookup4(const uint8_t* qs, int shift, __m512 table) {
    return _mm512_permutexvar_ps(_mm512_srlv_epi32(bcast16(qs), sigma_shift(shift)), table);
}
// 5-bit codes: nibble as above, bit 4 from bit `hbit` of `hi_bytes` (also kSigma-ordered);
// vpermt2ps reads index bits 0..4 of (nibble | bit << 4) from the 32-entry table (t0 | t1).
inline __m512 lookup5(__m512i nib, __m512i high, __m512 t0, __m512 t1) {
    const __m512i idx = _mm512_ternarylogic_epi32(_mm512_set1_epi32(15), nib, _mm512_slli_epi32(high, 4), 0xCA);
    return _mm512_permutex2var_ps(t0, idx, t1);
}
#endif

struct FmtQ8_0 {
    static constexpr int kBlock = 32, kBytes = 34, kScales = 2;
    static constexpr bool kPermuted = false;
    static void prepare(const uint8_t* row, i64 chunks, float* s) { prepare_halves<kBytes>(row, chunks, s); }
    static void decode(const uint8_t* row, const float* s, i64 c, V& lo, V& hi) {
#if QL_AVX512
        const uint8_t* b = row + c * kBytes;
        const __m512 d = _mm512_set1_ps(s[2 * c]);
        lo = _mm512_mul_ps(_mm512_cvtepi32_ps(bytes_s32(b + 2)), d);
        hi = _mm512_mul_ps(_mm512_cvtepi32_ps(bytes_s32(b + 18)), d);
#else
        const uint8_t* b = row + c * kBytes;
        const V d = vset(s[2 * c]);
        lo = to_float(s8_lanes(b + 2)) * d;
        hi = to_float(s8_lanes(b + 18)) * d;
#endif
    }
};

struct FmtQ4_0 {
    static constexpr int kBlock = 32, kBytes = 18, kScales = 2;
    static constexpr bool kPermuted = true;
    static void prepare(const uint8_t* row, i64 chunks, float* s) { prepare_halves<kBytes>(row, chunks, s); }
    static void decode(const uint8_t* row, const float* s, i64 c, V& lo, V& hi) {
#if QL_AVX512
        const uint8_t* b = row + c * kBytes;
        const __m512 table = _mm512_mul_ps(_mm512_sub_ps(iota(), _mm512_set1_ps(8.0f)), _mm512_set1_ps(s[2 * c]));
        lo = lookup4(b + 2, 0, table);
        hi = lookup4(b + 2, 4, table);
#else
        const VI q = sigma_u8_lanes(row + c * kBytes + 2);
        const V d = vset(s[2 * c]);
        lo = to_float((q & 15) - 8) * d;
        hi = to_float((q >> 4) - 8) * d;
#endif
    }
};

struct FmtQ4_1 {
    static constexpr int kBlock = 32, kBytes = 20, kScales = 2;
    static constexpr bool kPermuted = true;
    static void prepare(const uint8_t* row, i64 chunks, float* s) { prepare_halves<kBytes>(row, chunks, s); }
    static void decode(const uint8_t* row, const float* s, i64 c, V& lo, V& hi) {
#if QL_AVX512
        const uint8_t* b = row + c * kBytes;
        const __m512 table = _mm512_fmadd_ps(iota(), _mm512_set1_ps(s[2 * c]), _mm512_set1_ps(s[2 * c + 1]));
        lo = lookup4(b + 4, 0, table);
        hi = lookup4(b + 4, 4, table);
#else
        const VI q = sigma_u8_lanes(row + c * kBytes + 4);
        const V d = vset(s[2 * c]), m = vset(s[2 * c + 1]);
        lo = vfma(to_float(q & 15), d, m);
        hi = vfma(to_float(q >> 4), d, m);
#endif
    }
};

#if QL_AVX512
// Bit 4 of the 5-bit codes of a legacy Q5 block, as the low bit of each lane (kSigma order).
inline void q5_high_bits(const uint8_t* qh, __m512i& lo, __m512i& hi) {
    const __m512i sigma = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const __m512i bits = _mm512_set1_epi32(int(load_u32(qh)));
    lo = _mm512_srlv_epi32(bits, sigma);
    hi = _mm512_srlv_epi32(bits, _mm512_add_epi32(sigma, _mm512_set1_epi32(16)));
}
inline __m512i nibbles(const uint8_t* qs, int shift) { return _mm512_srlv_epi32(bcast16(qs), sigma_shift(shift)); }
#endif

struct FmtQ5_0 {
    static constexpr int kBlock = 32, kBytes = 22, kScales = 2;
    static constexpr bool kPermuted = true;
    static void prepare(const uint8_t* row, i64 chunks, float* s) { prepare_halves<kBytes>(row, chunks, s); }
    static void decode(const uint8_t* row, const float* s, i64 c, V& lo, V& hi) {
#if QL_AVX512
        const uint8_t* b = row + c * kBytes;
        const __m512 d = _mm512_set1_ps(s[2 * c]);
        const __m512 t0 = _mm512_mul_ps(_mm512_sub_ps(iota(), _mm512_set1_ps(16.0f)), d);
        const __m512 t1 = _mm512_mul_ps(iota(), d);
        __m512i hlo, hhi;
        q5_high_bits(b + 2, hlo, hhi);
        lo = lookup5(nibbles(b + 6, 0), hlo, t0, t1);
        hi = lookup5(nibbles(b + 6, 4), hhi, t0, t1);
#else
        const uint8_t* b = row + c * kBytes;
        const VI q = sigma_u8_lanes(b + 6);
        VI hlo, hhi;
        q5_high_bits(b + 2, hlo, hhi);
        const V d = vset(s[2 * c]);
        lo = to_float(((q & 15) | (hlo << 4)) - 16) * d;
        hi = to_float(((q >> 4) | (hhi << 4)) - 16) * d;
#endif
    }
};

struct FmtQ5_1 {
    static constexpr int kBlock = 32, kBytes = 24, kScales = 2;
    static constexpr bool kPermuted = true;
    static void prepare(const uint8_t* row, i64 chunks, float* s) { prepare_halves<kBytes>(row, chunks, s); }
    static void decode(const uint8_t* row, const float* s, i64 c, V& lo, V& hi) {
#if QL_AVX512
        const uint8_t* b = row + c * kBytes;
        const __m512 d = _mm512_set1_ps(s[2 * c]), m = _mm512_set1_ps(s[2 * c + 1]);
        const __m512 t0 = _mm512_fmadd_ps(iota(), d, m);
        const __m512 t1 = _mm512_fmadd_ps(_mm512_add_ps(iota(), _mm512_set1_ps(16.0f)), d, m);
        __m512i hlo, hhi;
        q5_high_bits(b + 4, hlo, hhi);
        lo = lookup5(nibbles(b + 8, 0), hlo, t0, t1);
        hi = lookup5(nibbles(b + 8, 4), hhi, t0, t1);
#else
        const uint8_t* b = row + c * kBytes;
        const VI q = sigma_u8_lanes(b + 8);
        VI hlo, hhi;
        q5_high_bits(b + 4, hlo, hhi);
        const V d = vset(s[2 * c]), m = vset(s[2 * c + 1]);
        lo = vfma(to_float((q & 15) | (hlo << 4)), d, m);
        hi = vfma(to_float((q >> 4) | (hhi << 4)), d, m);
#endif
    }
};

// K-quants: 256-element super-blocks, chunk c = super-block c / 8, sub-block j = c % 8.
// prepare() turns each super-block's fp16 d/dmin and packed sub-block scales into per-chunk floats:
// Q4_K/Q5_K s[2c] = d * scale_j, s[2c+1] = dmin * min_j (Q6_K: see its prepare()).
void prepare_kquant_scale_min(const uint8_t* row, i64 chunks, int bytes, float* s) {
    for (i64 b = 0; b < chunks / 8; ++b) {
        const uint8_t* sb = row + b * bytes;
        const float d = half_at(sb), dmin = half_at(sb + 2);
        float* o = s + 16 * b;
#if QL_AVX512
        // 12 packed bytes -> [scale_0..7, min_0..7] as bytes, then floats times [d x8, dmin x8].
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(sb + 4));
        const __m128i a = _mm_shuffle_epi8(v, _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11));
        const __m128i hb = _mm_shuffle_epi8(v, _mm_setr_epi8(-1, -1, -1, -1, 0, 1, 2, 3, -1, -1, -1, -1, 4, 5, 6, 7));
        const __m128i lo = _mm_mask_blend_epi8(0xF000, a, _mm_srli_epi16(a, 4));  // mins 4..7: high nibbles
        const __m128i low_bits = _mm_and_si128(lo, _mm_setr_epi8(63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 15, 15, 15, 15));
        const __m128i high_bits = _mm_and_si128(_mm_srli_epi16(hb, 2), _mm_set1_epi8(0x30));
        const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_or_si128(low_bits, high_bits)));
        const __m512 scaled = _mm512_mul_ps(q, _mm512_insertf32x8(_mm512_set1_ps(d), _mm256_set1_ps(dmin), 1));
        const __m512i interleave = _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
        _mm512_storeu_ps(o, _mm512_permutexvar_ps(interleave, scaled));
#else
        for (int j = 0; j < 8; ++j) {
            int sc, mn;
            kquant_scale_min(sb + 4, j, sc, mn);
            o[2 * j] = d * float(sc);
            o[2 * j + 1] = dmin * float(mn);
        }
#endif
    }
}

struct FmtQ4_K {
    static constexpr int kBlock = 256, kBytes = 144, kScales = 2;
    static constexpr bool kPermuted = true;
    static void prepare(const uint8_t* row, i64 chunks, float* s) { prepare_kquant_scale_min(row, chunks, kBytes, s); }
    static void decode(const uint8_t* row, const float* s, i64 c, V& lo, V& hi) {
#if QL_AVX512
        const int j = int(c & 7);
        const uint8_t* qs = row + (c >> 3) * kBytes + 16 + (j >> 1) * 32;
        const __m512 table = _mm512_fmsub_ps(iota(), _mm512_set1_ps(s[2 * c]), _mm512_set1_ps(s[2 * c + 1]));
        lo = lookup4(qs, (j & 1) * 4, table);
        hi = lookup4(qs + 16, (j & 1) * 4, table);
#else
        const int j = int(c & 7), shift = (j & 1) * 4;
        const uint8_t* qs = row + (c >> 3) * kBytes + 16 + (j >> 1) * 32;
        const V ds = vset(s[2 * c]), ndm = vset(-s[2 * c + 1]);
        lo = vfma(to_float((sigma_u8_lanes(qs) >> shift) & 15), ds, ndm);
        hi = vfma(to_float((sigma_u8_lanes(qs + 16) >> shift) & 15), ds, ndm);
#endif
    }
};

struct FmtQ5_K {
    static constexpr int kBlock = 256, kBytes = 176, kScales = 2;
    static constexpr bool kPermuted = true;
    static void prepare(const uint8_t* row, i64 chunks, float* s) { prepare_kquant_scale_min(row, chunks, kBytes, s); }
    static void decode(const uint8_t* row, const float* s, i64 c, V& lo, V& hi) {
#if QL_AVX512
        const uint8_t* sb = row + (c >> 3) * kBytes;
        const int j = int(c & 7);
        const __m512 vds = _mm512_set1_ps(s[2 * c]), vdm = _mm512_set1_ps(s[2 * c + 1]);
        const __m512 t0 = _mm512_fmsub_ps(iota(), vds, vdm);
        const __m512 t1 = _mm512_fmsub_ps(_mm512_add_ps(iota(), _mm512_set1_ps(16.0f)), vds, vdm);
        const uint8_t* qh = sb + 16;
        const uint8_t* qs = sb + 48 + (j >> 1) * 32;
        const int shift = (j & 1) * 4;
        lo = lookup5(nibbles(qs, shift), nibbles(qh, j), t0, t1);
        hi = lookup5(nibbles(qs + 16, shift), nibbles(qh + 16, j), t0, t1);
#else
        const uint8_t* sb = row + (c >> 3) * kBytes;
        const int j = int(c & 7), shift = (j & 1) * 4;
        const uint8_t* qh = sb + 16;
        const uint8_t* qs = sb + 48 + (j >> 1) * 32;
        const auto half = [&](int o) {
            const VI q = ((sigma_u8_lanes(qs + o) >> shift) & 15) | (((sigma_u8_lanes(qh + o) >> j) & 1) << 4);
            return vfma(to_float(q), vset(s[2 * c]), vset(-s[2 * c + 1]));
        };
        lo = half(0);
        hi = half(16);
#endif
    }
};

struct FmtQ6_K {
    static constexpr int kBlock = 256, kBytes = 210, kScales = 4;
    static constexpr bool kPermuted = true;
    // s[4c .. 4c+3] = d*sc[2j], d*sc[2j+1], -32*d*sc[2j], -32*d*sc[2j+1] (the last two exact).
    static void prepare(const uint8_t* row, i64 chunks, float* s) {
        for (i64 b = 0; b < chunks / 8; ++b) {
            const uint8_t* sb = row + b * kBytes;
            const float d = half_at(sb + 208);
            float* o = s + 32 * b;
#if QL_AVX512
            const __m512 ds = _mm512_mul_ps(_mm512_cvtepi32_ps(bytes_s32(sb + 192)), _mm512_set1_ps(d));
            const __m512 nds = _mm512_mul_ps(ds, _mm512_set1_ps(-32.0f));
            const __m512i lo = _mm512_setr_epi32(0, 1, 16, 17, 2, 3, 18, 19, 4, 5, 20, 21, 6, 7, 22, 23);
            _mm512_storeu_ps(o, _mm512_permutex2var_ps(ds, lo, nds));
            _mm512_storeu_ps(o + 16, _mm512_permutex2var_ps(ds, _mm512_add_epi32(lo, _mm512_set1_epi32(8)), nds));
#else
            for (int j = 0; j < 8; ++j) {
                for (int k = 0; k < 2; ++k) {
                    o[4 * j + k] = d * float(int8_t(sb[192 + 2 * j + k]));
                    o[4 * j + 2 + k] = o[4 * j + k] * -32.0f;
                }
            }
#endif
        }
    }
    // Chunk j of a super-block: low 4 bits from ql (bytes, nibble), high 2 bits from qh.
    struct Where { const uint8_t* ql; const uint8_t* qh; int lshift, hshift; };
    static Where where(const uint8_t* row, i64 c) {
        const uint8_t* sb = row + (c >> 3) * kBytes;
        const int j = int(c & 7), h = j >> 2, jj = j & 3;
        return {sb + h * 64 + (jj & 1) * 32, sb + 128 + h * 32, (jj >> 1) * 4, jj * 2};
    }
    static void decode(const uint8_t* row, const float* s, i64 c, V& lo, V& hi) {
#if QL_AVX512
        const Where p = where(row, c);
        // q = low nibble | high 2 bits << 4 (kSigma lane order); (q - 32) * ds computed as
        // fma(q, ds, -32 ds), which is the same single rounding of the same exact product.
        const auto half = [&](int o, const float* sc) {
            const __m512i l = _mm512_srlv_epi32(bcast16(p.ql + o), sigma_shift(p.lshift));
            const __m512i h = _mm512_slli_epi32(_mm512_srlv_epi32(bcast16(p.qh + o), sigma_shift(p.hshift)), 4);
            const __m512i q = _mm512_and_si512(_mm512_ternarylogic_epi32(_mm512_set1_epi32(15), l, h, 0xCA),
                                               _mm512_set1_epi32(63));
            return _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), _mm512_set1_ps(sc[0]), _mm512_set1_ps(sc[2]));
        };
        lo = half(0, s + 4 * c);
        hi = half(16, s + 4 * c + 1);
#else
        const Where p = where(row, c);
        const auto half = [&](int o, const float* sc) {
            const VI q = ((sigma_u8_lanes(p.ql + o) >> p.lshift) & 15) | (((sigma_u8_lanes(p.qh + o) >> p.hshift) & 3) << 4);
            return vfma(to_float(q), vset(sc[0]), vset(sc[2]));
        };
        lo = half(0, s + 4 * c);
        hi = half(16, s + 4 * c + 1);
#endif
    }
};

// Q2_K / Q3_K: 16-element sub-blocks, so chunk j of a super-block has two scales (sub-blocks 2j,
// 2j+1), laid out as Q6_K's: s[4c .. 4c+3] = scale lo, scale hi, offset lo, offset hi, with
// w = fma(q, scale, offset). The 2-bit low parts of chunk j are bit pair j % 4 of quant bytes
// 32 * (j / 4) + 0..31 (lo half: bytes 0..15).
inline const uint8_t* k2_quants(const uint8_t* sb, i64 c, int& shift) {
    const int j = int(c & 7);
    shift = (j & 3) * 2;
    return sb + (j >> 2) * 32;
}
#if QL_AVX512
// o[4j + k] = scale[2j + k], o[4j + 2 + k] = offset[2j + k] for the 16 sub-blocks of a super-block.
inline void store_scale_pairs(float* o, __m512 scale, __m512 offset) {
    const __m512i lo = _mm512_setr_epi32(0, 1, 16, 17, 2, 3, 18, 19, 4, 5, 20, 21, 6, 7, 22, 23);
    _mm512_storeu_ps(o, _mm512_permutex2var_ps(scale, lo, offset));
    _mm512_storeu_ps(o + 16, _mm512_permutex2var_ps(scale, _mm512_add_epi32(lo, _mm512_set1_epi32(8)), offset));
}
#endif

// Q2_K: {u8 scales[16] (low nibble scale, high nibble min); u8 qs[64]; fp16 d, dmin}, 84 bytes.
// w = fma(q, d * scale, -dmin * min), q = 0..3.
struct FmtQ2_K {
    static constexpr int kBlock = 256, kBytes = 84, kScales = 4;
    static constexpr bool kPermuted = true;
    static void prepare(const uint8_t* row, i64 chunks, float* s) {
        for (i64 b = 0; b < chunks / 8; ++b) {
            const uint8_t* sb = row + b * kBytes;
            const float d = half_at(sb + 80), dmin = half_at(sb + 82);
            float* o = s + 32 * b;
#if QL_AVX512
            const __m512i packed = bytes_u32(sb);
            const __m512 sc = _mm512_cvtepi32_ps(_mm512_and_si512(packed, _mm512_set1_epi32(15)));
            const __m512 mn = _mm512_cvtepi32_ps(_mm512_srli_epi32(packed, 4));
            store_scale_pairs(o, _mm512_mul_ps(sc, _mm512_set1_ps(d)), _mm512_mul_ps(mn, _mm512_set1_ps(-dmin)));
#else
            for (int j = 0; j < 8; ++j) {
                for (int k = 0; k < 2; ++k) {
                    const int packed = sb[2 * j + k];
                    o[4 * j + k] = d * float(packed & 15);
                    o[4 * j + 2 + k] = -dmin * float(packed >> 4);
                }
            }
#endif
        }
    }
    static void decode(const uint8_t* row, const float* s, i64 c, V& lo, V& hi) {
        int shift;
        const uint8_t* qs = k2_quants(row + (c >> 3) * kBytes + 16, c, shift);
#if QL_AVX512
        const auto half = [&](int o, const float* sc) {
            const __m512i q = _mm512_and_si512(_mm512_srlv_epi32(bcast16(qs + o), sigma_shift(shift)), _mm512_set1_epi32(3));
            return _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), _mm512_set1_ps(sc[0]), _mm512_set1_ps(sc[2]));
        };
#else
        const auto half = [&](int o, const float* sc) {
            return vfma(to_float((sigma_u8_lanes(qs + o) >> shift) & 3), vset(sc[0]), vset(sc[2]));
        };
#endif
        lo = half(0, s + 4 * c);
        hi = half(16, s + 4 * c + 1);
    }
};

// Q3_K's 16 sub-block scales (layout: FmtQ3_K below): q3k_scale, scale i minus 32; q3k_scales, all
// 16 as int32 lanes.
inline int q3k_scale(const uint8_t* packed, int i) {
    const int low = (packed[i & 7] >> (i & 8 ? 4 : 0)) & 15;
    const int high = (packed[8 + (i & 3)] >> (2 * (i >> 2))) & 3;
    return (low | high << 4) - 32;
}
#if QL_AVX512
inline __m512i q3k_scales(const uint8_t* packed) {
    uint64_t low8;
    std::memcpy(&low8, packed, 8);
    const __m512i low = _mm512_and_si512(
        _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_set1_epi64x(int64_t(low8))),
                          _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 4, 4, 4, 4)),
        _mm512_set1_epi32(15));
    const __m512i high = _mm512_and_si512(
        _mm512_srlv_epi32(_mm512_set1_epi32(int(load_u32(packed + 8))),
                          _mm512_setr_epi32(0, 8, 16, 24, 2, 10, 18, 26, 4, 12, 20, 28, 6, 14, 22, 30)),
        _mm512_set1_epi32(3));
    return _mm512_sub_epi32(_mm512_or_si512(low, _mm512_slli_epi32(high, 4)), _mm512_set1_epi32(32));
}
#endif

// Q3_K: {u8 hmask[32]; u8 qs[64]; u8 scales[12]; fp16 d}, 110 bytes. Element 32j + l: low 2 bits as
// in Q2_K, high bit = bit j of hmask[l]; q3 = low | high << 2 (0..7) stands for q3 - 4, so
// w = fma(q3, d * sc, -4 * d * sc) (the offset is exact). Sub-block scale i (0..15): nibble i of
// bytes 0..7 (low nibbles first), bits 4-5 from bit pair i / 4 of byte 8 + i % 4, minus 32.
struct FmtQ3_K {
    static constexpr int kBlock = 256, kBytes = 110, kScales = 4;
    static constexpr bool kPermuted = true;
    static void prepare(const uint8_t* row, i64 chunks, float* s) {
        for (i64 b = 0; b < chunks / 8; ++b) {
            const uint8_t* sb = row + b * kBytes;
            const uint8_t* packed = sb + 96;
            const float d = half_at(sb + 108);
            float* o = s + 32 * b;
#if QL_AVX512
            const __m512 ds = _mm512_mul_ps(_mm512_cvtepi32_ps(q3k_scales(packed)), _mm512_set1_ps(d));
            store_scale_pairs(o, ds, _mm512_mul_ps(ds, _mm512_set1_ps(-4.0f)));
#else
            for (int i = 0; i < 16; ++i) {
                const int j = i >> 1, k = i & 1;
                o[4 * j + k] = d * float(q3k_scale(packed, i));
                o[4 * j + 2 + k] = o[4 * j + k] * -4.0f;
            }
#endif
        }
    }
    static void decode(const uint8_t* row, const float* s, i64 c, V& lo, V& hi) {
        const uint8_t* sb = row + (c >> 3) * kBytes;
        const int j = int(c & 7);
        int shift;
        const uint8_t* qs = k2_quants(sb + 32, c, shift);
#if QL_AVX512
        const auto half = [&](int o, const float* sc) {
            const __m512i l = _mm512_and_si512(_mm512_srlv_epi32(bcast16(qs + o), sigma_shift(shift)), _mm512_set1_epi32(3));
            const __m512i h = _mm512_and_si512(_mm512_srlv_epi32(bcast16(sb + o), sigma_shift(j)), _mm512_set1_epi32(1));
            const __m512i q = _mm512_or_si512(l, _mm512_slli_epi32(h, 2));
            return _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), _mm512_set1_ps(sc[0]), _mm512_set1_ps(sc[2]));
        };
#else
        const auto half = [&](int o, const float* sc) {
            const VI q = ((sigma_u8_lanes(qs + o) >> shift) & 3) | (((sigma_u8_lanes(sb + o) >> j) & 1) << 2);
            return vfma(to_float(q), vset(sc[0]), vset(sc[2]));
        };
#endif
        lo = half(0, s + 4 * c);
        hi = half(16, s + 4 * c + 1);
    }
};

// IQ4: 4-bit codes (as Q4_0's nibbles: bytes 0..15, low nibbles = elements 0..15) naming one of
// kIQ4Levels; w = level * scale (one rounding, as gguf-py).
inline void iq4_decode(const uint8_t* codes, float scale, V& lo, V& hi) {
#if QL_AVX512
    const __m512 table = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(kIQ4Levels)))),
                                       _mm512_set1_ps(scale));
    lo = lookup4(codes, 0, table);
    hi = lookup4(codes, 4, table);
#else
    float t[16];
    for (int i = 0; i < 16; ++i) t[i] = float(kIQ4Levels[i]) * scale;
    const VI q = sigma_u8_lanes(codes);
    lo = lookup_lanes(t, q & 15);
    hi = lookup_lanes(t, q >> 4);
#endif
}

// IQ4_NL: {fp16 d; u8 codes[16]}, 18 bytes.
struct FmtIQ4_NL {
    static constexpr int kBlock = 32, kBytes = 18, kScales = 2;
    static constexpr bool kPermuted = true;
    static void prepare(const uint8_t* row, i64 chunks, float* s) { prepare_halves<kBytes>(row, chunks, s); }
    static void decode(const uint8_t* row, const float* s, i64 c, V& lo, V& hi) {
        iq4_decode(row + c * kBytes + 2, s[2 * c], lo, hi);
    }
};

// IQ4_XS: {fp16 d; u16 scales_h; u8 scales_l[4]; u8 codes[128]}, 136 bytes. Chunk j = sub-block j:
// codes bytes 16j..16j+15, scale d * iq4xs_scale(sb, j).
inline int iq4xs_scale(const uint8_t* sb, int j) {  // (nibble j of scales_l | bit pair j of scales_h << 4) - 32
    return (((sb[4 + (j >> 1)] >> (4 * (j & 1))) & 15) | ((load_u16(sb + 2) >> (2 * j)) & 3) << 4) - 32;
}
struct FmtIQ4_XS {
    static constexpr int kBlock = 256, kBytes = 136, kScales = 1;
    static constexpr bool kPermuted = true;
    static void prepare(const uint8_t* row, i64 chunks, float* s) {
        for (i64 b = 0; b < chunks / 8; ++b) {
            const uint8_t* sb = row + b * kBytes;
            const float d = half_at(sb);
            for (int j = 0; j < 8; ++j) s[8 * b + j] = d * float(iq4xs_scale(sb, j));
        }
    }
    static void decode(const uint8_t* row, const float* s, i64 c, V& lo, V& hi) {
        iq4_decode(row + (c >> 3) * kBytes + 8 + (c & 7) * 16, s[c], lo, hi);
    }
};

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------
struct Problem {
    const float* x;    // (T, K), kSigma-permuted within each 16-group for kPermuted formats
    const uint8_t* w;  // N rows of row_bytes (see row_at)
    float* out;        // (T, N)
    i64 T, N, K, row_bytes, il;
};

// Where the rows of W are; every path's problem has w, row_bytes and il. The file's layout is plain
// rows (il = 1: row n at w + n * row_bytes). The resident store lays the formats ql_row_interleave
// names out in groups of il = kInterleave rows: group g fills bytes [g il row_bytes, (g + 1) il
// row_bytes) with its blocks in the order (block 0 of rows 0..il-1), (block 1 of rows 0..il-1), ...
// so that a tile of the group's rows reads one stream front to back instead of il (measured below,
// at ql_row_interleave). Block b of row n is at row_at(p, n) + b * block_step(p); row_step(p) goes
// from a block to the same block of the next row in its group. A tile of il rows starting at a
// multiple of il (every tile of il or 2 il rows: work items start at multiples of kRows) still
// covers bytes [n0 row_bytes, (n0 + R) row_bytes), which is what the prefetchers fetch.
constexpr int kInterleave = 4;
template <int kBlockBytes, class P>
inline const uint8_t* row_at(const P& p, i64 n) {
    const i64 r = n % p.il;
    return p.w + (n - r) * p.row_bytes + r * kBlockBytes;
}
template <int kBlockBytes, class P>
inline i64 block_step(const P& p) { return p.il * kBlockBytes; }
template <int kBlockBytes, class P>
inline i64 row_step(const P& p) { return p.il > 1 ? kBlockBytes : p.row_bytes; }

constexpr int kRows = 8;  // rows of W per work item
// Tile shapes, chosen by measurement on AVX-512 (32 vector registers); the portable path holds a
// 16-lane vector in two AVX2 registers (16 in all), so it uses smaller tiles. Tiling never changes
// the per-element arithmetic.
constexpr int kRowsT1 = QL_AVX512 ? 8 : 4;     // direct path, T = 1
constexpr int kRowsSmallT = QL_AVX512 ? 4 : 2; // direct path, T = 2..3
constexpr int kPanelRows = QL_AVX512 ? 4 : 2;  // microkernel tile: rows of W
constexpr int kPanelT = QL_AVX512 ? 4 : 2;     // microkernel tile: rows of x

template <class F> constexpr bool kHasTail = F::kBlock == 1;

// Allocation failures inside the kernels (any thread): ql_linear compares it before and after a
// call and returns code 3 (out of memory) instead of aborting the process.
std::atomic<uint64_t> g_alloc_failures{0};

// Per-thread scratch, 64-byte aligned (whole cache lines per vector), grown on demand.
// try_get() returns nullptr if memory is exhausted; get() (the small per-row buffers) throws
// std::bad_alloc, caught at the work-item boundary (entry()); shrink() frees a buffer that a long
// prompt grew, so a one-off prefill does not keep T x K floats per thread for the process's life.
class Scratch {
public:
    Scratch() = default;
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;
    ~Scratch() { std::free(data_); }
    float* try_get(i64 n) {  // n == 0 may return nullptr
        if (n > size_) {
            std::free(data_);
            size_ = (n + 15) / 16 * 16;
            data_ = static_cast<float*>(std::aligned_alloc(64, size_t(size_) * sizeof(float)));
            if (!data_) size_ = 0;
        }
        return data_;
    }
    float* get(i64 n) {
        float* p = try_get(n);
        if (!p && n > 0) throw std::bad_alloc();
        return p;
    }
    void shrink(i64 keep) {
        if (size_ > keep) {
            std::free(data_);
            data_ = nullptr;
            size_ = 0;
        }
    }

private:
    float* data_ = nullptr;
    i64 size_ = 0;
};

template <class F>
void prepare_rows(const Problem& p, i64 n0, int nrows, float* scales) {
    if constexpr (F::kScales > 0) {
        const i64 chunks = p.K / 32;
        for (int r = 0; r < nrows; ++r) F::prepare(p.w + (n0 + r) * p.row_bytes, chunks, scales + r * chunks * F::kScales);
    }
}

// Weights stream from memory: a tile of rows prefetches the next tile's bytes (its rows are
// contiguous) kPrefetchAhead further on, linearly, spread evenly over the `steps` iterations of its
// loop (one step() each), stopping at the matrix's end. Measured on the fp32 path: -16% time on a cold
// decode sweep. kLocality 3 fetches into L1 (prefetcht0), 1 into L2 only (prefetcht2).
// kPrefetchAhead: the next tile alone is too close to hide the DRAM latency when rows are short
// (SmolLM2's K = 576: 360 bytes a Q4_1 row; a tile of 4 rows is 1.4 KiB, ~60 ns of reading at 25 GB/s)
// and the hardware prefetcher loses the stream among the tile's interleaved rows: 8 KiB further on,
// SmolLM2 decode 154 -> 223-232 tok/s (one thread, Zen 5; 4 KiB 210-216); 70B-shaped Q4_K / Q6_K
// rows (4.5-23 KiB) 0.98-1.04x.
constexpr i64 kPrefetchAhead = 8192;
template <int kLocality = 3>
class NextTilePrefetch {
public:
    NextTilePrefetch(const uint8_t* tile, i64 tile_bytes, const uint8_t* end, i64 steps)
        : pf_(tile + tile_bytes + kPrefetchAhead), end_(end), step_(steps ? ((tile_bytes + steps - 1) / steps + 63) / 64 * 64 : 0) {}
    void step() {  // (the lines of a step that pass the end are prefetched too: a prefetch never faults)
        if (pf_ < end_)
            for (i64 o = 0; o < step_; o += 64) __builtin_prefetch(pf_ + o, 0, kLocality);
        pf_ += step_;
    }

private:
    const uint8_t* pf_;
    const uint8_t* const end_;
    const i64 step_;
};

// Direct path: R rows of W times all TT (= T) rows of x, weights decoded straight into registers.
template <class F, int R, int TT>
void direct_tile(const Problem& p, const float* scales, i64 n0) {
    V acc[R][TT];
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < TT; ++t) acc[r][t] = vzero();
    const i64 chunks = p.K / 32;
    const uint8_t* rows[R];
    const float* sc[R];
    for (int r = 0; r < R; ++r) {
        rows[r] = p.w + (n0 + r) * p.row_bytes;
        sc[r] = scales + r * chunks * F::kScales;
    }
    const float* xs = p.x;
    NextTilePrefetch<> pf(rows[0], R * p.row_bytes, p.w + p.N * p.row_bytes, chunks);
    for (i64 c = 0; c < chunks; ++c) {
        pf.step();
        for (int r = 0; r < R; ++r) {
            V lo, hi;
            F::decode(rows[r], sc[r], c, lo, hi);
            for (int t = 0; t < TT; ++t) {
                const float* xc = xs + t * p.K + c * 32;
                acc[r][t] = vfma(vload(xc), lo, acc[r][t]);
                acc[r][t] = vfma(vload(xc + 16), hi, acc[r][t]);
            }
        }
    }
    if constexpr (kHasTail<F>) {
        const int tail = int(p.K - chunks * 32);
        if (tail) {
            for (int r = 0; r < R; ++r) {
                V lo, hi;
                F::decode_tail(rows[r], chunks, tail, lo, hi);
                for (int t = 0; t < TT; ++t) {
                    const float* xc = xs + t * p.K + chunks * 32;
                    const V xl = vload_n(xc, tail < 16 ? tail : 16);
                    const V xh = tail > 16 ? vload_n(xc + 16, tail - 16) : vzero();
                    acc[r][t] = vfma(xl, lo, acc[r][t]);
                    acc[r][t] = vfma(xh, hi, acc[r][t]);
                }
            }
        }
    }
    for (int t = 0; t < TT; ++t)
        for (int r = 0; r < R; ++r) p.out[t * p.N + n0 + r] = vsum(acc[r][t]);
}

template <class F, int R, int TT>
void direct_rows(const Problem& p, i64 n0) {
    thread_local Scratch buf;
    float* scales = buf.get(R * (p.K / 32) * F::kScales);
    prepare_rows<F>(p, n0, R, scales);
    direct_tile<F, R, TT>(p, scales, n0);
}

// Rows [n, n_end) against all T (= TT) rows of x: tiles of R rows, then single rows.
template <class F, int R, int TT>
void direct_range(const Problem& p, i64 n, i64 n_end) {
    for (; n + R <= n_end; n += R) direct_rows<F, R, TT>(p, n);
    for (; n < n_end; ++n) direct_rows<F, 1, TT>(p, n);
}

// Panel path: decode rows into fp32 scratch (zero-padded to whole chunks), then a
// format-independent microkernel. Per-element FMA order is the same as the direct path.
template <class F>
void decode_rows(const Problem& p, i64 n0, int nrows, float* panel, i64 kpad) {
    thread_local Scratch buf;
    const i64 chunks = p.K / 32;
    float* scales = buf.get(nrows * chunks * F::kScales);
    prepare_rows<F>(p, n0, nrows, scales);
    for (int r = 0; r < nrows; ++r) {
        const uint8_t* row = p.w + (n0 + r) * p.row_bytes;
        const float* sc = scales + r * chunks * F::kScales;
        float* dst = panel + r * kpad;
        for (i64 c = 0; c < chunks; ++c) {
            V lo, hi;
            F::decode(row, sc, c, lo, hi);
            vstore(dst + c * 32, lo);
            vstore(dst + c * 32 + 16, hi);
        }
        if constexpr (kHasTail<F>) {
            if (kpad > chunks * 32) {
                V lo, hi;
                F::decode_tail(row, chunks, int(p.K - chunks * 32), lo, hi);
                vstore(dst + chunks * 32, lo);
                vstore(dst + chunks * 32 + 16, hi);
            }
        }
    }
}

template <int R, int TT>
void panel_tile(const Problem& p, const float* panel, i64 kpad, i64 n0, i64 t0) {
    V acc[R][TT];
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < TT; ++t) acc[r][t] = vzero();
    const float* xs = p.x + t0 * p.K;
    const i64 full = p.K / 16;
    for (i64 s = 0; s < full; ++s) {
        V wv[R];
        for (int r = 0; r < R; ++r) wv[r] = vload(panel + r * kpad + s * 16);
        for (int t = 0; t < TT; ++t) {
            const V xv = vload(xs + t * p.K + s * 16);
            for (int r = 0; r < R; ++r) acc[r][t] = vfma(xv, wv[r], acc[r][t]);
        }
    }
    for (i64 s = full; s < kpad / 16; ++s) {  // partial / zero steps of a padded last chunk
        const int n = int(p.K - s * 16 > 0 ? p.K - s * 16 : 0);
        for (int t = 0; t < TT; ++t) {
            const V xv = n ? vload_n(xs + t * p.K + s * 16, n) : vzero();
            for (int r = 0; r < R; ++r) acc[r][t] = vfma(xv, vload(panel + r * kpad + s * 16), acc[r][t]);
        }
    }
#if QL_AVX512
    if constexpr (R == 4 && TT == 4) {  // vsum16 lane 4t + r is output (t, r): one quarter per row of x
        const __m512 sums = vsum16(&acc[0][0]);
        float* o = p.out + t0 * p.N + n0;
        _mm_storeu_ps(o, _mm512_extractf32x4_ps(sums, 0));
        _mm_storeu_ps(o + p.N, _mm512_extractf32x4_ps(sums, 1));
        _mm_storeu_ps(o + 2 * p.N, _mm512_extractf32x4_ps(sums, 2));
        _mm_storeu_ps(o + 3 * p.N, _mm512_extractf32x4_ps(sums, 3));
        return;
    }
#endif
    for (int t = 0; t < TT; ++t)
        for (int r = 0; r < R; ++r) p.out[(t0 + t) * p.N + n0 + r] = vsum(acc[r][t]);
}

// Rows [g0 * kRows, g1 * kRows) clipped to N, for each path (a traits struct): for T <= 3 register
// tiles straight from the weights (Path::direct<F, R, TT>: rows [n, n_end) against all of x; R =
// Path::kRowsT1Of<F> at T = 1, Path::kRowsSmallT at T = 2..3), above
// that Path::kPanelRowsOf<F> (<= Path::kPanelRows) rows at a time decoded into a panel
// (Path::decode<F>) and a microkernel over tiles of Path::kPanelT rows of x (Path::tile<F, R, TT>).
// No path's arithmetic depends on the tiling.
template <class Path, class F>
void run_rows(const typename Path::Prob& p, i64 g0, i64 g1) {
    const i64 n_end = g1 * kRows < p.N ? g1 * kRows : p.N;
    i64 n = g0 * kRows;
    switch (p.T) {
        case 1: Path::template direct<F, Path::template kRowsT1Of<F>, 1>(p, n, n_end); return;
        case 2: Path::template direct<F, Path::kRowsSmallT, 2>(p, n, n_end); return;
        case 3: Path::template direct<F, Path::kRowsSmallT, 3>(p, n, n_end); return;
        default: break;
    }
    thread_local Scratch buf;
    const typename Path::Panel panel = Path::panel(p, buf.get(Path::kPanelRows * Path::panel_row_floats(p)));
    constexpr int kRowsOf = Path::template kPanelRowsOf<F>;  // <= Path::kPanelRows
    const auto rows = [&]<int R>(i64 n0) {
        Path::template decode<F>(p, n0, R, panel);
        i64 t0 = 0;
        for (; t0 + Path::kPanelT <= p.T; t0 += Path::kPanelT) Path::template tile<F, R, Path::kPanelT>(p, panel, n0, t0);
        if constexpr (Path::kPanelT > 4)
            if (t0 + 4 <= p.T) Path::template tile<F, R, 4>(p, panel, n0, t0), t0 += 4;
        for (; t0 < p.T; ++t0) Path::template tile<F, R, 1>(p, panel, n0, t0);
    };
    for (; n + kRowsOf <= n_end; n += kRowsOf) rows.template operator()<kRowsOf>(n);
    for (; n < n_end; ++n) rows.template operator()<1>(n);
}

// The fp32 path: panels of decoded fp32 rows, zero-padded to whole chunks (kpad floats a row).
struct FloatPath {
    using Prob = Problem;
    struct Panel {
        float* w;
        i64 kpad;
    };
    static constexpr int kRowsSmallT = ::kRowsSmallT, kPanelRows = ::kPanelRows, kPanelT = ::kPanelT;
    template <class F>
    static constexpr int kRowsT1Of = ::kRowsT1;
    template <class F>
    static constexpr int kPanelRowsOf = kPanelRows;
    static i64 panel_row_floats(const Problem& p) { return (p.K + 31) / 32 * 32; }
    static Panel panel(const Problem& p, float* base) { return {base, panel_row_floats(p)}; }
    template <class F, int R, int TT>
    static void direct(const Problem& p, i64 n, i64 n_end) { direct_range<F, R, TT>(p, n, n_end); }
    template <class F>
    static void decode(const Problem& p, i64 n0, int nrows, const Panel& q) { decode_rows<F>(p, n0, nrows, q.w, q.kpad); }
    template <class F, int R, int TT>
    static void tile(const Problem& p, const Panel& q, i64 n0, i64 t0) { panel_tile<R, TT>(p, q.w, q.kpad, n0, t0); }
};

// x with each 16-group of every row permuted by kSigma (K is a multiple of 32 for those formats);
// nullptr if out of memory.
Scratch& permute_scratch() {
    thread_local Scratch buf;
    return buf;
}

const float* permute_x(const float* x, i64 T, i64 K) {
    float* dst = permute_scratch().try_get(T * K);
    if (!dst) return nullptr;
    for (i64 g = 0; g < T * K; g += 16)
        for (int l = 0; l < 16; ++l) dst[g + l] = x[g + kSigma[l]];
    return dst;
}

// ---------------------------------------------------------------------------------------------
// Integer path (Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS): the formats whose weights are small integers times
// per-sub-block integer scales. Numerics (again identical in every code path, so results never depend on the
// tiling, the thread count or T):
//   * each row of x is quantized per 256-element block b: sx_b = amax_b / 32767 and
//     x16 = rint(x * (32767 / amax_b)) (int16; error <= 0.5 sx_b per element, ~1e-5 relative
//     in a dot product); a block holding a NaN or an infinity gets sx_b = NaN (the result is NaN);
//   * a weight super-block is decoded to 256 int16 words w = q * sc (Q4_K: q 0..15, Q5_K: q 0..31,
//     sc 6 bits; Q6_K: (q - 32) * sc, sc signed 8 bits; Q3_K: q -4..3, sc - 32 6 bits; IQ4_XS: q a
//     level in -127..113, sc - 32 6 bits), with its float factor d (and the mins);
//   * I_b = sum of w * x16 over the super-block, exactly, in 16 int32 lanes: lane l holds the
//     products of elements 32j + 2l, 32j + 2l + 1 (j = 0..7); |lane| < 2^31 by the formats' ranges;
//   * acc (16 fp32 lanes) = fma(float(I_b) * sx_b, d_b, acc) for b in order; Q4_K/Q5_K mins go to an
//     8-lane accumulator macc = fma(dmin * m_j (lane j), float(sum_j x16) * sx_b, macc);
//   * out = vsum(acc) - sum8(macc) (the same pairwise trees as vsum).
// ---------------------------------------------------------------------------------------------
constexpr int kQBlock = 256;  // x quantization block (one weight super-block)

struct QProblem {
    const int16_t* xq;   // (T, K) quantized x
    const float* xs;     // (T, K / 256) block scales sx_b
    const float* xm;     // (T, K / 32) float(sum of x16 over each 32-chunk) * sx_b
    const uint8_t* w;    // N rows of row_bytes (see row_at)
    float* out;          // (T, N)
    i64 T, N, K, row_bytes, il;
};

// Round one block of n activations to integers in [-kMax, kMax] on the block's own scale: returns
// sx = amax / kMax with dst = rint(src * (kMax / amax)); an all-zero block gives sx = 0, a block
// holding a NaN or an infinity sx = NaN (dst zero for both). One plain loop, the same on every ISA:
// the integer (int16 per 256), pair (int16 per 32) and 8-bit (int8 per 256) paths all round this way.
template <int kMax, class Q>
float quantize_block(const float* src, int n, Q* dst) {
    float amax = 0.0f;
    bool finite = true;
    for (int i = 0; i < n; ++i) {
        const float a = src[i] < 0 ? -src[i] : src[i];
        amax = a > amax ? a : amax;
        finite &= a <= 3.4028234663852886e38f;  // false for inf and NaN
    }
    if (!finite || amax == 0.0f) {
        for (int i = 0; i < n; ++i) dst[i] = 0;
        return finite ? 0.0f : __builtin_nanf("");
    }
    const float inv = float(kMax) / amax;
    for (int i = 0; i < n; ++i) {
        const float v = __builtin_rintf(src[i] * inv);
        dst[i] = Q(v > float(kMax) ? float(kMax) : v < -float(kMax) ? -float(kMax) : v);
    }
    return amax / float(kMax);
}

// Quantize T rows of x (see the contract above).
void quantize_x(const float* x, i64 T, i64 K, int16_t* xq, float* xs, float* xm) {
    for (i64 b = 0; b < T * K / kQBlock; ++b) {
        int16_t* dst = xq + b * kQBlock;
        xs[b] = quantize_block<32767>(x + b * kQBlock, kQBlock, dst);
        for (int j = 0; j < kQBlock / 32; ++j) {
            int s = 0;
            for (int i = 0; i < 32; ++i) s += dst[32 * j + i];
            xm[b * 8 + j] = float(s) * xs[b];
        }
    }
}

#if defined(__SSE4_1__)
// The 16 bytes [sc_0..7, m_0..7] of a Q4_K / Q5_K super-block's 12 packed scale bytes.
inline __m128i kquant_scale_min_bytes(const uint8_t* packed) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed));
    const __m128i a = _mm_shuffle_epi8(v, _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11));
    const __m128i hb = _mm_shuffle_epi8(v, _mm_setr_epi8(-1, -1, -1, -1, 0, 1, 2, 3, -1, -1, -1, -1, 4, 5, 6, 7));
    const __m128i lo = _mm_blendv_epi8(a, _mm_srli_epi16(a, 4),  // mins 4..7: high nibbles
                                       _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, -1, -1, -1, -1));
    const __m128i low_bits = _mm_and_si128(lo, _mm_setr_epi8(63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 15, 15, 15, 15));
    const __m128i high_bits = _mm_and_si128(_mm_srli_epi16(hb, 2), _mm_set1_epi8(0x30));
    return _mm_or_si128(low_bits, high_bits);
}
#endif
#if QL_AVX512
// kquant_scale_min_bytes of 4 super-blocks' packed bytes (at packed + r * stride) in 128-bit lanes r:
// one unpack for a tile of 4 rows of W.
inline __m512i kquant_scale_min_bytes4(const uint8_t* packed, i64 stride) {
    const auto raw = [&](int r) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + r * stride)); };
    __m512i v = _mm512_castsi128_si512(raw(0));
    v = _mm512_inserti32x4(v, raw(1), 1);
    v = _mm512_inserti32x4(v, raw(2), 2);
    v = _mm512_inserti32x4(v, raw(3), 3);
    const auto lanes = [](__m128i c) { return _mm512_broadcast_i32x4(c); };
    const __m512i a = _mm512_shuffle_epi8(v, lanes(_mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11)));
    const __m512i hb = _mm512_shuffle_epi8(v, lanes(_mm_setr_epi8(-1, -1, -1, -1, 0, 1, 2, 3, -1, -1, -1, -1, 4, 5, 6, 7)));
    const __m512i lo = _mm512_mask_blend_epi8(0xF000F000F000F000ull, a, _mm512_srli_epi16(a, 4));  // mins 4..7: high nibbles
    const __m512i low_bits = _mm512_and_si512(lo, lanes(_mm_setr_epi8(63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 15, 15, 15, 15)));
    return _mm512_ternarylogic_epi32(low_bits, _mm512_srli_epi16(hb, 2), _mm512_set1_epi8(0x30), 0xF8);  // | (hb >> 2) & 0x30
}
#endif

#if QL_AVX512
using WI = __m512i;  // 32 int16 words: one 32-element chunk
using AI = __m512i;  // 16 int32 lanes
using M8 = __m256;   // 8 fp32 lanes (the mins)
inline AI izero() { return _mm512_setzero_si512(); }
inline AI iadd(AI a, AI b) { return _mm512_add_epi32(a, b); }
inline WI wload(const int16_t* p) { return _mm512_loadu_si512(p); }
inline void wstore(int16_t* p, WI v) { _mm512_storeu_si512(p, v); }
inline AI dot_add(AI acc, WI w, const int16_t* x) {
#if defined(__AVX512VNNI__)
    return _mm512_dpwssd_epi32(acc, w, _mm512_loadu_si512(x));
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(w, _mm512_loadu_si512(x)));
#endif
}
inline V ito_float(AI v) { return _mm512_cvtepi32_ps(v); }
inline V vmul(V a, V b) { return _mm512_mul_ps(a, b); }
inline V vbcast(float a) { return _mm512_set1_ps(a); }
inline M8 m8zero() { return _mm256_setzero_ps(); }
inline M8 m8load(const float* p) { return _mm256_loadu_ps(p); }
inline void m8store(float* p, M8 v) { _mm256_storeu_ps(p, v); }
inline M8 m8fma(M8 a, M8 b, M8 c) { return _mm256_fmadd_ps(a, b, c); }
inline float m8sum(M8 a) {
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}
#else
typedef int16_t W16 __attribute__((vector_size(32)));
using WI = Pair<W16>;  // words 0..15, 16..31
using AI = VI;         // int32 lanes 0..7, 8..15
using M8 = F8;
inline AI izero() { return {I8{}, I8{}}; }
inline AI iadd(AI a, AI b) { return a + b; }
inline WI wload(const int16_t* p) {
    WI v;
    std::memcpy(&v.a, p, sizeof v.a);
    std::memcpy(&v.b, p + 16, sizeof v.b);
    return v;
}
inline void wstore(int16_t* p, WI v) {
    std::memcpy(p, &v.a, sizeof v.a);
    std::memcpy(p + 16, &v.b, sizeof v.b);
}
// 16 words of w times 16 words of x -> 8 int32 lanes, lane l = w[2l] x[2l] + w[2l+1] x[2l+1].
inline I8 madd8(W16 w, const int16_t* x) {
#if defined(__AVX2__)
    return I8(_mm256_madd_epi16(__m256i(w), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))));
#else
    I8 r;
    for (int l = 0; l < 8; ++l) r[l] = int32_t(w[2 * l]) * x[2 * l] + int32_t(w[2 * l + 1]) * x[2 * l + 1];
    return r;
#endif
}
inline AI dot_add(AI acc, WI w, const int16_t* x) { return {acc.a + madd8(w.a, x), acc.b + madd8(w.b, x + 16)}; }
inline V ito_float(AI v) { return to_float(v); }
inline V vmul(V a, V b) { return a * b; }
inline V vbcast(float a) { return vset(a); }
inline M8 m8zero() { return F8{}; }
inline M8 m8load(const float* p) { M8 v; std::memcpy(&v, p, sizeof v); return v; }
inline void m8store(float* p, M8 v) { std::memcpy(p, &v, sizeof v); }
inline M8 m8fma(M8 a, M8 b, M8 c) { return fma8(a, b, c); }
inline float m8sum(M8 v) {
    float s4[4];
    for (int i = 0; i < 4; ++i) s4[i] = v[i] + v[i + 4];
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}
// Widen 16 bytes to 16 words (unsigned or signed).
// (AVX2: one vpmovzxbw / vpmovsxbw; GCC compiles the generic conversion as two 8-byte halves and a
// merge: 1.10-1.29x on Q4_1 / Q8_0 / Q6_K at T = 1 with this, AVX2 machine, one thread.)
inline W16 u8_words(const uint8_t* p) {
#if defined(__AVX2__)
    return W16(_mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
    typedef uint8_t B16 __attribute__((vector_size(16)));
    B16 b;
    std::memcpy(&b, p, 16);
    return __builtin_convertvector(b, W16);
#endif
}
inline W16 s8_words(const uint8_t* p) {
#if defined(__AVX2__)
    return W16(_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
    typedef int8_t B16 __attribute__((vector_size(16)));
    B16 b;
    std::memcpy(&b, p, 16);
    return __builtin_convertvector(b, W16);
#endif
}
#endif

// Decoders: super-block -> w[8] (chunk j = elements 32j..32j+31, natural order), d and the
// 8 mins dmin * m_j (formats without mins leave them alone).
// Q4_K (kQ5 false) and Q5_K (kQ5 true): element 32j + l is nibble j & 1 of qs[32(j >> 1) + l], plus
// for Q5_K bit j of qh[l] as bit 4.
template <bool kQ5>
struct IntQ45_K {
    static constexpr int kBytes = kQ5 ? 176 : 144;
    static constexpr bool kMins = true;
    static constexpr int kQs = kQ5 ? 48 : 16;  // offset of qs (Q5_K's qh sits at 16)
    // AVX-512 rows of W per T = 1 tile: over 8, 1.14-1.37x in cache and 1.16-1.70x streaming from memory
    // (one and two threads, Zen 5; 8 rows of decoded blocks spilled). The same measure put Q6_K and Q3_K
    // at 8 (4: 0.69x, 0.80x), IQ4_XS at 4 (1.19x over 8).
    static constexpr int kRowsT1 = 4;
#if QL_AVX512 && defined(__AVX512VBMI__)
    static constexpr bool kBytewise = !kQ5;  // decode_direct exists
    // Q4_K: decode()'s words without widening. qs bytes 64G..64G+63 hold chunks 4G + h (bytes 0..31)
    // and 4G + 2 + h (bytes 32..63) in nibble h; vpermb interleaves the two halves (byte 2i + e <-
    // byte 32e + i), then vpmaddubsw of the nibbles with [sc, 0, sc, 0, ...] (e = 0) or
    // [0, sc, 0, sc, ...] (e = 1) gives chunk 4G + 2e + h's words q * sc in natural order.
    static void decode_direct(const uint8_t* sb, WI w[8], float& d, M8& mins) {
        decode_direct(sb, kquant_scale_min_bytes(sb + 4), w, d, mins);
    }
    static void decode_direct(const uint8_t* sb, __m128i sm, WI w[8], float& d, M8& mins) {  // sm: of sb + 4
        d = half_at(sb);
        const float dmin = half_at(sb + 2);
        mins = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(sm, 8))), _mm256_set1_ps(dmin));
        const __m512i smb = _mm512_broadcast_i32x4(sm);
        const __m512i m4 = _mm512_set1_epi8(15);
        const __m512i inter = _mm512_set_epi8(
            63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24, 55, 23, 54, 22, 53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16,
            47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
        for (int G = 0; G < 2; ++G) {
            const __m512i z = _mm512_permutexvar_epi8(inter, _mm512_loadu_si512(sb + kQs + 64 * G));
            const __m512i nib[2] = {_mm512_and_si512(z, m4), _mm512_and_si512(_mm512_srli_epi16(z, 4), m4)};
            for (int h = 0; h < 2; ++h) {
                const int c0 = 4 * G + h, c1 = 4 * G + 2 + h;
                w[c0] = _mm512_maddubs_epi16(nib[h], _mm512_shuffle_epi8(smb, _mm512_set1_epi16(short(0x8000 | c0))));
                w[c1] = _mm512_maddubs_epi16(nib[h], _mm512_shuffle_epi8(smb, _mm512_set1_epi16(short((c1 << 8) | 0x80))));
            }
        }
    }
#else
    static constexpr bool kBytewise = false;
#endif
#if QL_AVX512
    static void decode(const uint8_t* sb, WI w[8], float& d, M8& mins) { decode(sb, kquant_scale_min_bytes(sb + 4), w, d, mins); }
    // decode_direct where there is one (Q4_K with VBMI), else decode; sm: kquant_scale_min_bytes(sb + 4)
    static void decode_with(const uint8_t* sb, __m128i sm, WI w[8], float& d, M8& mins) {
#if defined(__AVX512VBMI__)
        if constexpr (kBytewise) return decode_direct(sb, sm, w, d, mins);
#endif
        decode(sb, sm, w, d, mins);
    }
    static void decode(const uint8_t* sb, __m128i sm, WI w[8], float& d, M8& mins) {  // sm: of sb + 4
        d = half_at(sb);
        const float dmin = half_at(sb + 2);
        mins = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(sm, 8))), _mm256_set1_ps(dmin));
        const __m512i scw = _mm512_castsi256_si512(_mm256_cvtepu8_epi16(sm));  // words sc_0..7, m_0..7
        const __m512i qh = kQ5 ? _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + 16)))
                               : _mm512_setzero_si512();
        const auto high = [&](int j) {  // bit j of qh -> bit 4
            return _mm512_and_si512(j <= 4 ? _mm512_slli_epi16(qh, 4 - j) : _mm512_srli_epi16(qh, j - 4),
                                    _mm512_set1_epi16(16));
        };
        for (int g = 0; g < 4; ++g) {
            const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + kQs + 32 * g)));
            __m512i lo = _mm512_and_si512(v, _mm512_set1_epi16(15)), hi = _mm512_srli_epi16(v, 4);
            if constexpr (kQ5) {
                lo = _mm512_or_si512(lo, high(2 * g));
                hi = _mm512_or_si512(hi, high(2 * g + 1));
            }
            w[2 * g] = _mm512_mullo_epi16(lo, _mm512_permutexvar_epi16(_mm512_set1_epi16(short(2 * g)), scw));
            w[2 * g + 1] = _mm512_mullo_epi16(hi, _mm512_permutexvar_epi16(_mm512_set1_epi16(short(2 * g + 1)), scw));
        }
    }
#else
    static void decode(const uint8_t* sb, WI w[8], float& d, M8& mins) {
        d = half_at(sb);
        const float dmin = half_at(sb + 2);
        int sc[8];
        for (int j = 0; j < 8; ++j) {
            int mn;
            kquant_scale_min(sb + 4, j, sc[j], mn);
            mins[j] = dmin * float(mn);
        }
        for (int g = 0; g < 4; ++g) {  // chunks 2g (low nibbles) and 2g + 1 (high) of the same 32 bytes
            const uint8_t* qs = sb + kQs + 32 * g;
            for (int h = 0; h < 2; ++h) {
                const W16 v = u8_words(qs + 16 * h);
                W16 lo = v & 15, hi = v >> 4;
                if constexpr (kQ5) {
                    const W16 qh = u8_words(sb + 16 + 16 * h);
                    lo |= ((qh >> (2 * g)) & 1) << 4;
                    hi |= ((qh >> (2 * g + 1)) & 1) << 4;
                }
                (h ? w[2 * g].b : w[2 * g].a) = lo * int16_t(sc[2 * g]);
                (h ? w[2 * g + 1].b : w[2 * g + 1].a) = hi * int16_t(sc[2 * g + 1]);
            }
        }
    }
#endif
};
using IntQ4_K = IntQ45_K<false>;
using IntQ5_K = IntQ45_K<true>;

struct IntQ6_K {
    static constexpr int kBytes = 210;
    static constexpr bool kMins = false;
    static constexpr bool kBytewise = false;
    static constexpr int kRowsT1 = 8;
    // Chunk c = 4h + cc: q = low nibble of ql[64h + 32(cc & 1) + l] (nibble cc >> 1) | bits 2cc..2cc+1
    // of qh[32h + l] << 4; scale sc[8h + 2cc] for l < 16, sc[8h + 2cc + 1] above.
    static void decode(const uint8_t* sb, WI w[8], float& d, M8&) {
        d = half_at(sb + 208);
#if QL_AVX512
        const __m512i scw = _mm512_castsi256_si512(
            _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sb + 192))));
        for (int h = 0; h < 2; ++h) {
            const __m512i qh = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + 128 + 32 * h)));
            for (int cc = 0; cc < 4; ++cc) {
                const __m512i l = _mm512_srli_epi16(
                    _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + 64 * h + 32 * (cc & 1)))),
                    4 * (cc >> 1));
                const __m512i hb = cc < 2 ? _mm512_slli_epi16(qh, 4 - 2 * cc) : _mm512_srli_epi16(qh, 2 * cc - 4);
                const __m512i q = _mm512_and_si512(_mm512_ternarylogic_epi32(_mm512_set1_epi16(15), l, hb, 0xCA),
                                                   _mm512_set1_epi16(63));
                const __m512i idx = _mm512_inserti64x4(_mm512_set1_epi16(short(8 * h + 2 * cc)),
                                                       _mm256_set1_epi16(short(8 * h + 2 * cc + 1)), 1);
                w[4 * h + cc] = _mm512_mullo_epi16(_mm512_sub_epi16(q, _mm512_set1_epi16(32)),
                                                   _mm512_permutexvar_epi16(idx, scw));
            }
        }
#else
        for (int c = 0; c < 8; ++c) {
            const int h = c >> 2, cc = c & 3;
            const uint8_t* ql = sb + 64 * h + 32 * (cc & 1);
            const uint8_t* qh = sb + 128 + 32 * h;
            const int ls = 4 * (cc >> 1), hs = 2 * cc;
            const auto half = [&](int o, int sc) {
                return ((((u8_words(ql + o) >> ls) & 15) | (((u8_words(qh + o) >> hs) & 3) << 4)) - 32) * int16_t(sc);
            };
            w[c].a = half(0, int8_t(sb[192 + 8 * h + 2 * cc]));
            w[c].b = half(16, int8_t(sb[192 + 8 * h + 2 * cc + 1]));
        }
#endif
    }
};

// Q3_K: {hmask[32], qs[64], 12 packed scale bytes, fp16 d}, 110 bytes. Element 128n + 32j + l
// (l < 32) is q = ((qs[32n + l] >> 2j) & 3) + 4 * ((hmask[l] >> (4n + j)) & 1) - 4 in [-4, 3]; sub-block
// i = element / 16 has the 6-bit scale sc_i - 32 (as FmtQ3_K): chunk c = 4n + j, words q * (sc - 32)
// (|w| <= 128).
struct IntQ3_K {
    static constexpr int kBytes = 110;
    static constexpr bool kMins = false;
    static constexpr bool kBytewise = false;
    static constexpr int kRowsT1 = 8;
    static void decode(const uint8_t* sb, WI w[8], float& d, M8&) {
        d = half_at(sb + 108);
        const uint8_t* packed = sb + 96;
#if QL_AVX512
        const __m512i scw = _mm512_castsi256_si512(_mm512_cvtepi32_epi16(q3k_scales(packed)));  // words sc_0..15 - 32
        const __m512i hm = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb)));
        for (int n = 0; n < 2; ++n) {
            const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + 32 + 32 * n)));
            for (int j = 0; j < 4; ++j) {
                const int c = 4 * n + j;
                const __m512i lo = _mm512_and_si512(_mm512_srli_epi16(v, 2 * j), _mm512_set1_epi16(3));
                const __m512i hb = _mm512_and_si512(_mm512_srli_epi16(hm, c), _mm512_set1_epi16(1));
                const __m512i q = _mm512_sub_epi16(_mm512_or_si512(lo, _mm512_slli_epi16(hb, 2)), _mm512_set1_epi16(4));
                const __m512i idx = _mm512_inserti64x4(_mm512_set1_epi16(short(2 * c)), _mm256_set1_epi16(short(2 * c + 1)), 1);
                w[c] = _mm512_mullo_epi16(q, _mm512_permutexvar_epi16(idx, scw));
            }
        }
#else
        int sc[16];
        for (int i = 0; i < 16; ++i) sc[i] = q3k_scale(packed, i);
        for (int c = 0; c < 8; ++c) {
            const int n = c >> 2, j = c & 3;
            for (int h = 0; h < 2; ++h) {
                const W16 v = u8_words(sb + 32 + 32 * n + 16 * h), hm = u8_words(sb + 16 * h);
                const W16 q = (((v >> (2 * j)) & 3) | (((hm >> c) & 1) << 2)) - 4;
                (h ? w[c].b : w[c].a) = q * int16_t(sc[2 * c + h]);
            }
        }
#endif
    }
};

// IQ4_XS (as FmtIQ4_XS): chunk j's 16 code bytes at 8 + 16j, low nibbles elements 0..15, high 16..31,
// each naming a level of kIQ4Levels (integers in [-127, 113]); scale ls_j - 32 (6 bits). Words level *
// (ls_j - 32) (|w| <= 127 * 32 = 4064: a lane's 16 products stay below 2^31 with |x16| <= 32767).
struct IntIQ4_XS {
    static constexpr int kBytes = 136;
    static constexpr bool kMins = false;
    static constexpr bool kBytewise = false;
    static constexpr int kRowsT1 = 4;
    static void decode(const uint8_t* sb, WI w[8], float& d, M8&) {
        d = half_at(sb);
        for (int j = 0; j < 8; ++j) {
            const int sc = iq4xs_scale(sb, j);
            const uint8_t* codes = sb + 8 + 16 * j;
#if defined(__AVX2__)
            __m128i lo, hi;
            iq4_nibble_levels(codes, lo, hi);
#if QL_AVX512
            const __m512i words = _mm512_cvtepi8_epi16(_mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1));
            w[j] = _mm512_mullo_epi16(words, _mm512_set1_epi16(short(sc)));
#else
            w[j] = {W16(_mm256_cvtepi8_epi16(lo)) * int16_t(sc), W16(_mm256_cvtepi8_epi16(hi)) * int16_t(sc)};
#endif
#else
            W16 a, b;
            for (int l = 0; l < 16; ++l) {
                a[l] = int16_t(int(kIQ4Levels[codes[l] & 15]) * sc);
                b[l] = int16_t(int(kIQ4Levels[codes[l] >> 4]) * sc);
            }
            w[j] = {a, b};
#endif
        }
    }
};

// Direct path: R rows of W times all TT (= T <= 3) rows of x; each super-block is decoded into
// registers once and used for every row of x.
template <class F, int R, int TT>
void int_direct_tile(const QProblem& p, i64 n0) {
    V acc[R][TT];
    M8 macc[R][TT];
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < TT; ++t) acc[r][t] = vzero(), macc[r][t] = m8zero();
    const i64 nb = p.K / kQBlock;
    const uint8_t* row0 = p.w + n0 * p.row_bytes;  // the tile's bytes start here (row_at)
    const uint8_t* rows[R];
    for (int r = 0; r < R; ++r) rows[r] = row_at<F::kBytes>(p, n0 + r);
    const i64 bstep = block_step<F::kBytes>(p);
    // Weights stream from memory. AVX-512 tiles of 2 to 4 rows, and tiles of interleaved rows, prefetch
    // the next tile (streaming, one thread: Q4_K 1.15x over the per-row prefetch below, Zen 5); the
    // others fetch ~1 KiB ahead in each row stream (the tile prefetch measured Q6_K's 8-row tiles of
    // plain rows 0.86-0.92x, the AVX2 build's 1-row tiles 0.78-0.98x). On interleaved rows 1 KiB is 4x
    // closer in a group's stream: Q6_K's 8-row tiles ran 0.68-0.71x their plain rows with it, 0.93x
    // (one thread) and 1.00x (two) with the tile prefetch.
    constexpr bool kTilePf = QL_AVX512 && R > 1 && R <= 4;
    const bool tile_pf = kTilePf || p.il > 1;
    NextTilePrefetch<> pf(row0, R * p.row_bytes, p.w + p.N * p.row_bytes, tile_pf ? nb : 0);
    constexpr bool kScales4 = QL_AVX512 && F::kMins && R == 4;  // Q4_K / Q5_K: 4 rows' scale bytes in one unpack
    for (i64 b = 0; b < nb; ++b) {
        if (tile_pf) pf.step();
#if QL_AVX512
        alignas(64) __m128i sm[4];
        if constexpr (kScales4) _mm512_store_si512(sm, kquant_scale_min_bytes4(rows[0] + b * bstep + 4, row_step<F::kBytes>(p)));
#endif
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
            const uint8_t* sb = rows[r] + b * bstep;
            if (!tile_pf)
                for (int o = 0; o < F::kBytes; o += 64) __builtin_prefetch(sb + 1024 + o);
            WI w[8];
            float d;
            M8 mins;
#if QL_AVX512
            if constexpr (kScales4)
                F::decode_with(sb, _mm_load_si128(sm + r), w, d, mins);
            else
#endif
            if constexpr (F::kBytewise)
                F::decode_direct(sb, w, d, mins);
            else
                F::decode(sb, w, d, mins);
            for (int t = 0; t < TT; ++t) {
                const int16_t* xq = p.xq + t * p.K + b * kQBlock;
                AI s[4] = {izero(), izero(), izero(), izero()};  // 4 chains (integer sums: exact in any order)
                for (int j = 0; j < 8; ++j) s[j & 3] = dot_add(s[j & 3], w[j], xq + 32 * j);
                s[0] = iadd(iadd(s[0], s[1]), iadd(s[2], s[3]));
                acc[r][t] = vfma(vmul(ito_float(s[0]), vbcast(p.xs[t * nb + b])), vbcast(d), acc[r][t]);
                if constexpr (F::kMins) macc[r][t] = m8fma(mins, m8load(p.xm + t * (p.K / 32) + 8 * b), macc[r][t]);
            }
        }
    }
    for (int t = 0; t < TT; ++t)
        for (int r = 0; r < R; ++r)
            p.out[t * p.N + n0 + r] = F::kMins ? vsum(acc[r][t]) - m8sum(macc[r][t]) : vsum(acc[r][t]);
}

template <class F, int R, int TT>
void int_direct_range(const QProblem& p, i64 n, i64 n_end) {
    for (; n + R <= n_end; n += R) int_direct_tile<F, R, TT>(p, n);
    for (; n < n_end; ++n) int_direct_tile<F, 1, TT>(p, n);
}

// Panel path: decode rows into int16 words (plus d and mins per super-block), then a
// format-independent microkernel with the same per-element arithmetic as the direct path.
struct IntPanel {
    int16_t* w;  // (rows, K)
    float* d;    // (rows, K / 256)
    float* m;    // (rows, K / 32)
};

template <class F>
void int_decode_rows(const QProblem& p, i64 n0, int nrows, const IntPanel& panel) {
    const i64 nb = p.K / kQBlock;
    for (int r = 0; r < nrows; ++r) {
        const uint8_t* row = row_at<F::kBytes>(p, n0 + r);
        const i64 bstep = block_step<F::kBytes>(p);
        for (i64 b = 0; b < nb; ++b) {
            WI w[8];
            M8 mins = m8zero();
            F::decode(row + b * bstep, w, panel.d[r * nb + b], mins);
            for (int j = 0; j < 8; ++j) wstore(panel.w + r * p.K + b * kQBlock + 32 * j, w[j]);
            m8store(panel.m + r * (p.K / 32) + 8 * b, mins);
        }
    }
}

template <bool kMins, int R, int TT>
void int_panel_tile(const QProblem& p, const IntPanel& panel, i64 n0, i64 t0) {
    V acc[R][TT];
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < TT; ++t) acc[r][t] = vzero();
    const i64 nb = p.K / kQBlock;
    for (i64 b = 0; b < nb; ++b) {
        AI s[R][TT];
        for (int r = 0; r < R; ++r)
            for (int t = 0; t < TT; ++t) s[r][t] = izero();
        for (int j = 0; j < 8; ++j) {
            WI w[R];
            for (int r = 0; r < R; ++r) w[r] = wload(panel.w + r * p.K + b * kQBlock + 32 * j);
            for (int t = 0; t < TT; ++t)
                for (int r = 0; r < R; ++r) s[r][t] = dot_add(s[r][t], w[r], p.xq + (t0 + t) * p.K + b * kQBlock + 32 * j);
        }
        for (int r = 0; r < R; ++r) {
            const V d = vbcast(panel.d[r * nb + b]);
            for (int t = 0; t < TT; ++t)
                acc[r][t] = vfma(vmul(ito_float(s[r][t]), vbcast(p.xs[(t0 + t) * nb + b])), d, acc[r][t]);
        }
    }
    for (int t = 0; t < TT; ++t) {
        for (int r = 0; r < R; ++r) {
            float y = vsum(acc[r][t]);
            if constexpr (kMins) {
                M8 macc = m8zero();
                const float* xm = p.xm + (t0 + t) * (p.K / 32);
                const float* wm = panel.m + r * (p.K / 32);
                for (i64 b = 0; b < nb; ++b) macc = m8fma(m8load(wm + 8 * b), m8load(xm + 8 * b), macc);
                y -= m8sum(macc);
            }
            p.out[(t0 + t) * p.N + n0 + r] = y;
        }
    }
}

constexpr int kIntPanelRows = 2;               // microkernel tile: rows of W
constexpr int kIntPanelT = QL_AVX512 ? 8 : 4;  // microkernel tile: rows of x (portable build: 2 x 4
                                               // 1.14-1.24x over 2 x 2, 1.01-1.19x over 1 x 4; AVX-512:
                                               // 2 x 8 1.03-1.15x over 2 x 4 at T = 12..64, Zen 5)
// The portable build (16 ymm registers) runs T <= 3 one row of W at a time here and in the pair and
// 8-bit paths: two rows' decoded blocks spilled. Measured on the AVX2 build, one thread, T = 1 (A/B in
// one process, the same results): Q4_K 1.38x, Q6_K 1.34x, Q4_1 1.20x, Q8_0 1.09x, int8 Q4_K 1.11x;
// T = 2..3 1.08-1.18x. Its panels stay at 2 rows (1 row: 0.95-0.97x on Q4_K/Q6_K); the pair path's
// per format (PairPath::kPanelRowsOf).
// Direct path, T = 1: rows of W per tile, AVX-512 F::kRowsT1 (see the decoders).
template <class F>
constexpr int kIntRowsT1 = QL_AVX512 ? F::kRowsT1 : 1;
constexpr int kIntRowsSmallT = QL_AVX512 ? 2 : 1;  // direct path, T = 2..3

// The integer path: panels of int16 words, d and mins (K / 2 + K / 256 + K / 32 floats a row).
struct IntPath {
    using Prob = QProblem;
    using Panel = IntPanel;
    static constexpr int kRowsSmallT = kIntRowsSmallT, kPanelRows = kIntPanelRows, kPanelT = kIntPanelT;
    template <class F>
    static constexpr int kRowsT1Of = kIntRowsT1<F>;
    template <class F>
    static constexpr int kPanelRowsOf = kPanelRows;
    static i64 panel_row_floats(const QProblem& p) { return p.K / 2 + p.K / kQBlock + p.K / 32; }
    static IntPanel panel(const QProblem& p, float* base) {
        return {reinterpret_cast<int16_t*>(base), base + kPanelRows * p.K / 2, base + kPanelRows * (p.K / 2 + p.K / kQBlock)};
    }
    template <class F, int R, int TT>
    static void direct(const QProblem& p, i64 n, i64 n_end) { int_direct_range<F, R, TT>(p, n, n_end); }
    template <class F>
    static void decode(const QProblem& p, i64 n0, int nrows, const IntPanel& q) { int_decode_rows<F>(p, n0, nrows, q); }
    template <class F, int R, int TT>
    static void tile(const QProblem& p, const IntPanel& q, i64 n0, i64 t0) { int_panel_tile<F::kMins, R, TT>(p, q, n0, t0); }
};

// ---------------------------------------------------------------------------------------------
// Pair path (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL): integer dot products on the 32-element blocks.
// Numerics (again identical in every code path):
//   * each row of x is quantized per 32-element chunk c as quantize_x does per 256: sx_c =
//     amax_c / 32767, x16 = rint(x * (32767 / amax_c)); a chunk holding a NaN or an infinity gets
//     sx_c = NaN; xsum_c = float(sum of x16 over the chunk) * sx_c;
//   * chunks go in pairs (a, b) = (2p, 2p + 1). A pair's 64 words are [a's elements 0..15, b's
//     0..15, a's 16..31, b's 16..31], for x16 and for the weights' integer codes (Q4_0: q - 8,
//     Q5_0: q - 16, Q4_1/Q5_1/Q8_0: q, IQ4_NL: its level); an odd last chunk pairs with zeros;
//   * I (16 int32 lanes) = the pair's word products summed two by two, exactly: lanes 0..7 chunk
//     a (elements 2l, 2l + 1, 16 + 2l, 17 + 2l), lanes 8..15 chunk b;
//   * f = the blocks' fp16 fields [d_a, m_a, d_b, m_b] as floats (only Q4_1/Q5_1 use m);
//   * acc (16 fp32 lanes) = fma(float(I), [d_a * sx_a x 8, d_b * sx_b x 8], acc) for p in order;
//     Q4_1/Q5_1: mins (2 fp32 lanes) = fma([m_a, m_b], [xsum_a, xsum_b], mins) for p in order;
//   * out = vsum(acc) (Q4_1/Q5_1: + (mins_0 + mins_1)).
// In this layout the nibbles need no lane shuffles (a 16-byte group's low nibbles are elements
// 0..15, its high nibbles 16..31; Q5's fifth bits are one mask bit per word), an int32 lane never
// mixes two blocks' scales, and each block is
// read front to back once (no scale prepass over the rows).
// ---------------------------------------------------------------------------------------------
Scratch& pair_scratch() {  // the caller's quantized x for the pair path
    thread_local Scratch buf;
    return buf;
}

struct PProblem {
    const int16_t* xq;  // (T, pairs * 64) words in pair layout
    const float* xg;    // (T, pairs * 4) [sx_a, xsum_a, sx_b, xsum_b] (zeros for a missing b)
    const uint8_t* w;   // N rows of row_bytes (plain: il = 1)
    float* out;         // (T, N)
    i64 T, N, K, row_bytes, il;
    i64 chunks() const { return K / 32; }
    i64 pairs() const { return (K / 32 + 1) / 2; }
};

// Quantize 32 elements into dst (words); returns sx, *sum = float(sum of the words) * sx.
inline float quantize_chunk(const float* src, int16_t* dst, float* sum) {
    const float sx = quantize_block<32767>(src, 32, dst);
    int s = 0;
    for (int i = 0; i < 32; ++i) s += dst[i];
    *sum = float(s) * sx;
    return sx;
}

void quantize_pairs(const float* x, i64 T, i64 K, int16_t* xq, float* xg) {
    const i64 chunks = K / 32, pairs = (chunks + 1) / 2;
    for (i64 t = 0; t < T; ++t) {
        int16_t* row = xq + t * pairs * 64;
        float* g = xg + t * pairs * 4;
        if (chunks % 2) {  // the missing b of the last pair
            std::memset(row + (pairs - 1) * 64, 0, 64 * sizeof(int16_t));
            g[4 * pairs - 2] = g[4 * pairs - 1] = 0.0f;
        }
        for (i64 c = 0; c < chunks; ++c) {
            int16_t q[32];
            float* gc = g + 4 * (c / 2) + 2 * (c % 2);
            gc[0] = quantize_chunk(x + t * K + c * 32, q, gc + 1);
            int16_t* dst = row + (c / 2) * 64 + (c % 2) * 16;
            std::memcpy(dst, q, 16 * sizeof(int16_t));
            std::memcpy(dst + 32, q + 16, 16 * sizeof(int16_t));
        }
    }
}

// Weight decoders: chunks a and b (b nullptr: zeros) -> lo, hi words in pair layout, and the
// blocks' first two fp16 fields as 4 floats (F4, see pair_fields).
#if QL_AVX512
inline __m256i two_u128(const uint8_t* a, const uint8_t* b) {
    const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a));
    return b ? _mm256_inserti128_si256(_mm256_castsi128_si256(lo), _mm_loadu_si128(reinterpret_cast<const __m128i*>(b)), 1)
             : _mm256_zextsi128_si256(lo);
}
#endif
#if QL_AVX512 || (defined(__AVX2__) && defined(__F16C__) && defined(__FMA__))
// (AVX2 builds too: the scalar F4 below takes ~20 scalar instructions a pair; SSE here measured
// 1.04-1.16x on Q4_1 / Q5_1 / Q8_0 at T = 1..2, AVX2 machine, one thread; the same results.)
using F4 = __m128;
// [field 0 of a, field 1 of a, field 0 of b, field 1 of b] (zeros for a missing b)
inline F4 pair_fields(const uint8_t* a, const uint8_t* b) {
    return _mm_cvtph_ps(_mm_set_epi32(0, 0, b ? int(load_u32(b)) : 0, int(load_u32(a))));
}
inline F4 f4load(const float* p) { return _mm_loadu_ps(p); }
inline void f4store(float* p, F4 v) { _mm_storeu_ps(p, v); }
inline F4 f4mul(F4 a, F4 b) { return _mm_mul_ps(a, b); }
// [v_0 x 8, v_2 x 8]
inline V pair_scale(F4 v) {
#if QL_AVX512
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2), _mm512_castps128_ps512(v));
#else
    return {F8(_mm256_broadcastss_ps(v)), F8(_mm256_broadcastss_ps(_mm_movehl_ps(v, v)))};
#endif
}
struct Mins {  // lanes 1 and 3 of fma(f, g, v)
    F4 v = _mm_setzero_ps();
    void add(F4 f, F4 g) { v = _mm_fmadd_ps(f, g, v); }
    float total() const { return _mm_cvtss_f32(_mm_add_ss(_mm_shuffle_ps(v, v, 1), _mm_shuffle_ps(v, v, 3))); }
};
#else
struct F4 {
    float v[4];
};
inline F4 pair_fields(const uint8_t* a, const uint8_t* b) {
    return {{half_at(a), half_at(a + 2), b ? half_at(b) : 0.0f, b ? half_at(b + 2) : 0.0f}};
}
inline F4 f4load(const float* p) { return {{p[0], p[1], p[2], p[3]}}; }
inline void f4store(float* p, F4 x) { std::memcpy(p, x.v, sizeof x.v); }
inline F4 f4mul(F4 a, F4 b) { return {{a.v[0] * b.v[0], a.v[1] * b.v[1], a.v[2] * b.v[2], a.v[3] * b.v[3]}}; }
inline V pair_scale(F4 x) { return {F8{} + x.v[0], F8{} + x.v[2]}; }
struct Mins {
    float a = 0.0f, b = 0.0f;
    void add(F4 f, F4 g) { a = __builtin_fmaf(f.v[1], g.v[1], a), b = __builtin_fmaf(f.v[3], g.v[3], b); }
    float total() const { return a + b; }
};
#endif

// 4-bit codes (16 bytes at kQs: low nibbles elements 0..15, high nibbles 16..31), plus for the 5-bit
// formats bit 4 of element i = bit i of the 32-bit field at kQh; the word is code - kOffset.
template <int kBytesT, int kQsT, int kOffsetT, bool kMinsT, int kQh = -1>
struct PairNibbles {
    static constexpr int kBytes = kBytesT;
    static constexpr bool kMins = kMinsT;
    static void decode(const uint8_t* a, const uint8_t* b, WI& lo, WI& hi) {
#if QL_AVX512
        const __m512i w = _mm512_cvtepu8_epi16(two_u128(a + kQsT, b ? b + kQsT : nullptr));
        lo = _mm512_and_si512(w, _mm512_set1_epi16(15));
        hi = _mm512_srli_epi16(w, 4);
        if constexpr (kQh >= 0) {  // word lanes 0..15 are a's elements, 16..31 b's: one mask bit each
            const uint32_t ha = load_u32(a + kQh), hb = b ? load_u32(b + kQh) : 0;
            lo = _mm512_or_si512(lo, _mm512_maskz_set1_epi16(__mmask32((ha & 0xFFFFu) | (hb << 16)), 16));
            hi = _mm512_or_si512(hi, _mm512_maskz_set1_epi16(__mmask32((ha >> 16) | (hb & 0xFFFF0000u)), 16));
        }
        if constexpr (kOffsetT != 0) {
            lo = _mm512_sub_epi16(lo, _mm512_set1_epi16(kOffsetT));
            hi = _mm512_sub_epi16(hi, _mm512_set1_epi16(kOffsetT));
        }
#else
        const W16 wa = u8_words(a + kQsT), wb = b ? u8_words(b + kQsT) : W16{};
        W16 la = wa & int16_t(15), lb = wb & int16_t(15), ua = wa >> 4, ub = wb >> 4;
        if constexpr (kQh >= 0) {
            const uint32_t ha = load_u32(a + kQh), hb = b ? load_u32(b + kQh) : 0;
            for (int l = 0; l < 16; ++l) {
                la[l] |= int16_t(((ha >> l) & 1) << 4), ua[l] |= int16_t(((ha >> (l + 16)) & 1) << 4);
                lb[l] |= int16_t(((hb >> l) & 1) << 4), ub[l] |= int16_t(((hb >> (l + 16)) & 1) << 4);
            }
        }
        const W16 off = W16{} + int16_t(kOffsetT);
        lo = {la - off, lb - off};
        hi = {ua - off, ub - off};
#endif
    }
};
using PairQ4_0 = PairNibbles<18, 2, 8, false>;
using PairQ4_1 = PairNibbles<20, 4, 0, true>;
using PairQ5_0 = PairNibbles<22, 6, 16, false, 2>;
using PairQ5_1 = PairNibbles<24, 8, 0, true, 4>;

struct PairQ8_0 {
    static constexpr int kBytes = 34;
    static constexpr bool kMins = false;
    static void decode(const uint8_t* a, const uint8_t* b, WI& lo, WI& hi) {
#if QL_AVX512
        lo = _mm512_cvtepi8_epi16(two_u128(a + 2, b ? b + 2 : nullptr));
        hi = _mm512_cvtepi8_epi16(two_u128(a + 18, b ? b + 18 : nullptr));
#else
        lo = {s8_words(a + 2), b ? s8_words(b + 2) : W16{}};
        hi = {s8_words(a + 18), b ? s8_words(b + 18) : W16{}};
#endif
    }
};

// IQ4_NL: {fp16 d; codes[16]} (as FmtIQ4_NL): low nibbles elements 0..15, high 16..31, each naming a
// level of kIQ4Levels (integers in [-127, 113]); the word is the level.
struct PairIQ4_NL {
    static constexpr int kBytes = 18;
    static constexpr bool kMins = false;
    static void decode(const uint8_t* a, const uint8_t* b, WI& lo, WI& hi) {
#if defined(__AVX2__)
        __m128i la, ua, lb = _mm_setzero_si128(), ub = lb;  // (zeros for a missing b)
        iq4_nibble_levels(a + 2, la, ua);
        if (b) iq4_nibble_levels(b + 2, lb, ub);
#if QL_AVX512
        lo = _mm512_cvtepi8_epi16(_mm256_inserti128_si256(_mm256_castsi128_si256(la), lb, 1));
        hi = _mm512_cvtepi8_epi16(_mm256_inserti128_si256(_mm256_castsi128_si256(ua), ub, 1));
#else
        lo = {W16(_mm256_cvtepi8_epi16(la)), W16(_mm256_cvtepi8_epi16(lb))};
        hi = {W16(_mm256_cvtepi8_epi16(ua)), W16(_mm256_cvtepi8_epi16(ub))};
#endif
#else
        W16 la, ua, lb{}, ub{};
        for (int l = 0; l < 16; ++l) {
            la[l] = int16_t(kIQ4Levels[a[2 + l] & 15]), ua[l] = int16_t(kIQ4Levels[a[2 + l] >> 4]);
            if (b) lb[l] = int16_t(kIQ4Levels[b[2 + l] & 15]), ub[l] = int16_t(kIQ4Levels[b[2 + l] >> 4]);
        }
        lo = {la, lb};
        hi = {ua, ub};
#endif
    }
};

// Direct path: R rows of W times all TT (= T <= 3) rows of x; each chunk pair is decoded into
// registers once and used for every row of x.
template <class F, int R, int TT>
void pair_direct_tile(const PProblem& p, i64 n0) {
    V acc[R][TT];
    Mins mins[R][TT];
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < TT; ++t) acc[r][t] = vzero();
    const i64 chunks = p.chunks(), pairs = p.pairs(), full = chunks / 2;
    const uint8_t* rows[R];
    for (int r = 0; r < R; ++r) rows[r] = p.w + (n0 + r) * p.row_bytes;
    NextTilePrefetch<> pf(rows[0], R * p.row_bytes, p.w + p.N * p.row_bytes, pairs);
    const auto step = [&](i64 q, bool both) {
        pf.step();
        for (int r = 0; r < R; ++r) {
            const uint8_t* a = rows[r] + 2 * q * F::kBytes;
            const uint8_t* b = both ? a + F::kBytes : nullptr;
            WI lo, hi;
            F::decode(a, b, lo, hi);
            const F4 f = pair_fields(a, b);
            for (int t = 0; t < TT; ++t) {
                const int16_t* xw = p.xq + (t * pairs + q) * 64;
                const AI I = dot_add(dot_add(izero(), lo, xw), hi, xw + 32);
                const F4 g = f4load(p.xg + (t * pairs + q) * 4);
                acc[r][t] = vfma(ito_float(I), pair_scale(f4mul(f, g)), acc[r][t]);
                if constexpr (F::kMins) mins[r][t].add(f, g);
            }
        }
    };
    for (i64 q = 0; q < full; ++q) step(q, true);
    if (chunks % 2) step(full, false);
    for (int t = 0; t < TT; ++t)
        for (int r = 0; r < R; ++r)
            p.out[t * p.N + n0 + r] = F::kMins ? vsum(acc[r][t]) + mins[r][t].total() : vsum(acc[r][t]);
}

template <class F, int R, int TT>
void pair_direct_range(const PProblem& p, i64 n, i64 n_end) {
    for (; n + R <= n_end; n += R) pair_direct_tile<F, R, TT>(p, n);
    for (; n < n_end; ++n) pair_direct_tile<F, 1, TT>(p, n);
}

// Panel path: decode rows into pair-laid words (plus each pair's fields), then a
// format-independent microkernel with the same per-element arithmetic as the direct path.
struct PairPanel {
    int16_t* w;  // (rows, pairs * 64)
    float* f;    // (rows, pairs * 4)
};

template <class F>
void pair_decode_rows(const PProblem& p, i64 n0, int nrows, const PairPanel& panel) {
    const i64 chunks = p.chunks(), pairs = p.pairs();
    for (int r = 0; r < nrows; ++r) {
        const uint8_t* row = p.w + (n0 + r) * p.row_bytes;
        for (i64 q = 0; q < pairs; ++q) {
            const uint8_t* a = row + 2 * q * F::kBytes;
            const uint8_t* b = 2 * q + 1 < chunks ? a + F::kBytes : nullptr;
            WI lo, hi;
            F::decode(a, b, lo, hi);
            wstore(panel.w + (r * pairs + q) * 64, lo);
            wstore(panel.w + (r * pairs + q) * 64 + 32, hi);
            f4store(panel.f + (r * pairs + q) * 4, pair_fields(a, b));
        }
    }
}

template <bool kMins, int R, int TT>
void pair_panel_tile(const PProblem& p, const PairPanel& panel, i64 n0, i64 t0) {
    V acc[R][TT];
    Mins mins[R][TT];
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < TT; ++t) acc[r][t] = vzero();
    const i64 pairs = p.pairs();
    for (i64 q = 0; q < pairs; ++q) {
        WI lo[R], hi[R];
        F4 f[R];
        for (int r = 0; r < R; ++r) {
            lo[r] = wload(panel.w + (r * pairs + q) * 64);
            hi[r] = wload(panel.w + (r * pairs + q) * 64 + 32);
            f[r] = f4load(panel.f + (r * pairs + q) * 4);
        }
        for (int t = 0; t < TT; ++t) {
            const int16_t* xw = p.xq + ((t0 + t) * pairs + q) * 64;
            const F4 g = f4load(p.xg + ((t0 + t) * pairs + q) * 4);
            for (int r = 0; r < R; ++r) {
                const AI I = dot_add(dot_add(izero(), lo[r], xw), hi[r], xw + 32);
                acc[r][t] = vfma(ito_float(I), pair_scale(f4mul(f[r], g)), acc[r][t]);
                if constexpr (kMins) mins[r][t].add(f[r], g);
            }
        }
    }
    for (int t = 0; t < TT; ++t)
        for (int r = 0; r < R; ++r)
            p.out[(t0 + t) * p.N + n0 + r] = kMins ? vsum(acc[r][t]) + mins[r][t].total() : vsum(acc[r][t]);
}

constexpr int kPairPanelRows = 2;               // microkernel tile: rows of W
constexpr int kPairPanelT = QL_AVX512 ? 4 : 2;  // microkernel tile: rows of x
constexpr int kPairRowsT1 = QL_AVX512 ? 4 : 1;  // direct path, T = 1
constexpr int kPairRowsSmallT = QL_AVX512 ? 2 : 1;  // direct path, T = 2..3

// The pair path: panels of pair-laid words and each pair's fields (36 floats a pair).
struct PairPath {
    using Prob = PProblem;
    using Panel = PairPanel;
    template <class F>
    static constexpr int kRowsT1Of = kPairRowsT1;
    static constexpr int kRowsSmallT = kPairRowsSmallT, kPanelRows = kPairPanelRows,
                         kPanelT = kPairPanelT;
    // The portable build's panels of the formats with mins (Q4_1, Q5_1) hold one row: two spilled its
    // registers (AVX2 build, one thread, T = 16..93: 1.09-1.19x; the other formats 0.93-1.08x, left at 2).
    template <class F>
    static constexpr int kPanelRowsOf = QL_AVX512 || !F::kMins ? kPairPanelRows : 1;
    static i64 panel_row_floats(const PProblem& p) { return p.pairs() * 36; }
    static PairPanel panel(const PProblem& p, float* base) {
        return {reinterpret_cast<int16_t*>(base), base + kPanelRows * p.pairs() * 32};
    }
    template <class F, int R, int TT>
    static void direct(const PProblem& p, i64 n, i64 n_end) { pair_direct_range<F, R, TT>(p, n, n_end); }
    template <class F>
    static void decode(const PProblem& p, i64 n0, int nrows, const PairPanel& q) { pair_decode_rows<F>(p, n0, nrows, q); }
    template <class F, int R, int TT>
    static void tile(const PProblem& p, const PairPanel& q, i64 n0, i64 t0) { pair_panel_tile<F::kMins, R, TT>(p, q, n0, t0); }
};

#include "q8_path.h"

// ---------------------------------------------------------------------------------------------
// Thread pool: persistent workers plus the calling thread. Work items (row groups) are claimed
// dynamically; each item is computed entirely by the thread that claims it, so results do not
// depend on the thread count or on who ran what.
//
// The items are cut into one contiguous slice per thread; a thread claims `grain` items at a time
// from the front of its own slice, then from the other slices (stealing what their owners have not
// reached). So each thread streams through one contiguous stretch of the weights, which the
// hardware and software prefetchers follow; claims interleaved between threads (one shared
// counter) cut every thread's stream into pieces and ran a 2-thread GEMV at 1.0-1.2x one thread.
//
// A worker joins a job only by checking in while the job is open; the caller closes the job when
// it runs out of items and then waits only for the workers that checked in. So a worker that the
// OS has not scheduled (another process busy on its core) costs nothing: the caller does the
// work. (An OpenMP team cannot do this: every member must reach the join barrier, which costs a
// scheduler time slice per call whenever a core is taken.) Idle workers spin briefly, yielding
// their core to any other runnable thread (e.g. torch's OpenMP team), then sleep.
// ---------------------------------------------------------------------------------------------
using ItemsFn = void (*)(const void* ctx, i64 begin, i64 end);

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    _mm_pause();
#endif
}

class Pool {
public:
    explicit Pool(int threads) { start(threads); }
    ~Pool() { stop(); }
    Pool(const Pool&) = delete;
    Pool& operator=(const Pool&) = delete;

    int threads() const { return int(workers_.size()) + 1; }

    void set_threads(int threads) {
        std::lock_guard<std::mutex> g(dispatch_);
        stop();
        start(threads);
    }

    void run(ItemsFn fn, const void* ctx, i64 items, i64 grain) {
        std::lock_guard<std::mutex> g(dispatch_);  // one job at a time
        if (workers_.empty() || items <= grain) {
            fn(ctx, 0, items);
            return;
        }
        fn_ = fn;
        ctx_ = ctx;
        items_ = items;
        grain_ = grain;
        const i64 slices = i64(threads());
        for (i64 t = 0; t < slices; ++t) slices_[t].next.store(items * t / slices, std::memory_order_relaxed);
        finished_.store(0, std::memory_order_relaxed);
        state_.store(uint64_t(++generation_) << 32, std::memory_order_seq_cst);  // open, nobody in
        if (sleepers_.load(std::memory_order_seq_cst) > 0) {
            std::lock_guard<std::mutex> lk(sleep_mu_);
            wake_.notify_all();
        }
        work(0);
        const uint64_t closed = state_.fetch_or(kClosed, std::memory_order_acq_rel);
        const uint32_t joined = uint32_t(closed & kCountMask);
        for (int i = 1; finished_.load(std::memory_order_acquire) != joined; ++i) {
            cpu_relax();
            if ((i & 255) == 0) std::this_thread::yield();
        }
    }

private:
    static constexpr uint64_t kClosed = 1ull << 31;
    static constexpr uint64_t kCountMask = kClosed - 1;
    static constexpr auto kSpin = std::chrono::microseconds(200);

    static uint32_t generation_of(uint64_t s) { return uint32_t(s >> 32); }

    void start(int threads) {
        stopping_.store(false);
        slices_.reset(new (std::nothrow) Slice[size_t(threads)]);
        if (!slices_) threads = 1;
        try {
            for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { loop(); });
        } catch (const std::exception&) {  // thread limit or memory: keep the workers that started
        }
    }

    void stop() {
        {
            std::lock_guard<std::mutex> lk(sleep_mu_);
            stopping_.store(true, std::memory_order_seq_cst);
            wake_.notify_all();
        }
        for (auto& t : workers_) t.join();
        workers_.clear();
    }

    // Participant `self` (0 = the caller, then workers in check-in order): its own slice first,
    // then the others' leftovers.
    void work(i64 self) {
        const i64 slices = i64(threads());
        for (i64 k = 0; k < slices; ++k) {
            const i64 t = (self + k) % slices, end = items_ * (t + 1) / slices;
            for (;;) {
                const i64 b = slices_[t].next.fetch_add(grain_, std::memory_order_relaxed);
                if (b >= end) break;
                fn_(ctx_, b, b + grain_ < end ? b + grain_ : end);
            }
        }
    }

    // Wait for a job newer than `seen` (or stop); returns the state word that announced it.
    uint64_t wait_for_job(uint32_t seen) {
        uint64_t s = state_.load(std::memory_order_acquire);
        const auto deadline = std::chrono::steady_clock::now() + kSpin;
        for (int i = 1; generation_of(s) == seen && !stopping_.load(std::memory_order_relaxed); ++i) {
            cpu_relax();
            if ((i & 15) == 0) {
                std::this_thread::yield();
                if (std::chrono::steady_clock::now() > deadline) {
                    std::unique_lock<std::mutex> lk(sleep_mu_);
                    sleepers_.fetch_add(1, std::memory_order_seq_cst);
                    wake_.wait(lk, [&] {
                        s = state_.load(std::memory_order_seq_cst);
                        return generation_of(s) != seen || stopping_.load(std::memory_order_seq_cst);
                    });
                    sleepers_.fetch_sub(1, std::memory_order_relaxed);
                    break;
                }
            }
            s = state_.load(std::memory_order_acquire);
        }
        return s;
    }

    void loop() {
        uint32_t seen = generation_of(state_.load(std::memory_order_acquire));
        for (;;) {
            uint64_t s = wait_for_job(seen);
            if (stopping_.load(std::memory_order_acquire)) return;
            seen = generation_of(s);
            while (generation_of(s) == seen && !(s & kClosed)) {  // check in, unless already closed
                if (state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
                    work(i64(s & kCountMask) + 1);
                    finished_.fetch_add(1, std::memory_order_release);
                    break;
                }
            }
        }
    }

    std::vector<std::thread> workers_;
    std::mutex dispatch_;
    std::mutex sleep_mu_;
    std::condition_variable wake_;
    std::atomic<uint64_t> state_{0};  // generation << 32 | closed bit | number of workers checked in
    std::atomic<int> sleepers_{0};
    std::atomic<bool> stopping_{false};
    struct alignas(64) Slice {  // one cache line each: owners and thieves do not share lines
        std::atomic<i64> next{0};
    };
    std::unique_ptr<Slice[]> slices_;  // next unclaimed item of each thread's slice
    std::atomic<uint32_t> finished_{0};
    uint32_t generation_ = 0;
    ItemsFn fn_ = nullptr;
    const void* ctx_ = nullptr;
    i64 items_ = 0, grain_ = 1;
};

// ---------------------------------------------------------------------------------------------
// Format table and dispatch
// ---------------------------------------------------------------------------------------------
struct FormatEntry {
    int type, block, bytes;
    bool permuted;
    ItemsFn run;       // fp32 path (Problem)
    ItemsFn run_int;   // integer path (QProblem), nullptr where the format has none
    ItemsFn run_pair;  // pair path (PProblem), nullptr where the format has none
    ItemsFn run_q8;    // 8-bit-activation path (Q8Problem, q8_path.h), nullptr where the format has none
};

// The work-item function of a path: Run over items [g0, g1) of the problem at ctx; an allocation
// failure is counted (ql_linear reports it as code 3) instead of thrown through the pool.
template <class P, void (*Run)(const P&, i64, i64)>
void guarded(const void* ctx, i64 g0, i64 g1) {
    try {
        Run(*static_cast<const P*>(ctx), g0, g1);
    } catch (const std::bad_alloc&) {
        g_alloc_failures.fetch_add(1, std::memory_order_relaxed);
    }
}

// The fp32 path reads plain rows: the rows of a work item held interleaved (exact mode on the resident
// store's layout) are copied out plain first.
template <class F>
void run_float(const Problem& p, i64 g0, i64 g1) {
    if (p.il == 1) return run_rows<FloatPath, F>(p, g0, g1);
    const i64 n0 = g0 * kRows, n1 = g1 * kRows < p.N ? g1 * kRows : p.N, nb = p.row_bytes / F::kBytes;
    thread_local Scratch buf;
    uint8_t* dst = reinterpret_cast<uint8_t*>(buf.get(((n1 - n0) * p.row_bytes + 3) / 4));
    for (i64 n = n0; n < n1; ++n) {
        const uint8_t* src = row_at<F::kBytes>(p, n);
        for (i64 b = 0; b < nb; ++b)
            std::memcpy(dst + (n - n0) * p.row_bytes + b * F::kBytes, src + b * block_step<F::kBytes>(p), F::kBytes);
    }
    Problem q = p;  // row n (n0 <= n < n1) at dst + (n - n0) * row_bytes
    q.w = reinterpret_cast<const uint8_t*>(reinterpret_cast<uintptr_t>(dst) - uintptr_t(n0 * p.row_bytes));
    q.il = 1;
    run_rows<FloatPath, F>(q, g0, g1);
}

template <class F>
FormatEntry entry(int type) {
    return {type, F::kBlock, F::kBytes, F::kPermuted, guarded<Problem, run_float<F>>, nullptr, nullptr, nullptr};
}

template <class F, class I>
FormatEntry entry_int(int type) {
    FormatEntry e = entry<F>(type);
    e.run_int = guarded<QProblem, run_rows<IntPath, I>>;
    return e;
}

template <class F, class I, class Q>
FormatEntry entry_q8(int type) {
    FormatEntry e = entry_int<F, I>(type);
    e.run_q8 = guarded<Q8Problem, q8_run_groups<Q>>;
    return e;
}

template <class F, class P>
FormatEntry entry_pair(int type) {
    FormatEntry e = entry<F>(type);
    e.run_pair = guarded<PProblem, run_rows<PairPath, P>>;
    return e;
}

const FormatEntry* find_format(int type) {
    static const FormatEntry table[] = {
        entry<FmtF32>(kF32),   entry<FmtF16>(kF16),   entry<FmtBF16>(kBF16), entry_pair<FmtQ8_0, PairQ8_0>(kQ8_0),
        entry_pair<FmtQ4_0, PairQ4_0>(kQ4_0), entry_pair<FmtQ4_1, PairQ4_1>(kQ4_1), entry_pair<FmtQ5_0, PairQ5_0>(kQ5_0), entry_pair<FmtQ5_1, PairQ5_1>(kQ5_1),
        entry<FmtQ2_K>(kQ2_K), entry_int<FmtQ3_K, IntQ3_K>(kQ3_K), entry_q8<FmtQ4_K, IntQ4_K, Q8Q4_K>(kQ4_K), entry_q8<FmtQ5_K, IntQ5_K, Q8Q5_K>(kQ5_K),
        entry_q8<FmtQ6_K, IntQ6_K, Q8Q6_K>(kQ6_K), entry_pair<FmtIQ4_NL, PairIQ4_NL>(kIQ4_NL), entry_int<FmtIQ4_XS, IntIQ4_XS>(kIQ4_XS),
    };
    for (const auto& e : table)
        if (e.type == type) return &e;
    return nullptr;
}

// Rows of W handed out per work item: about 16 KiB of weights (or at least one group), finer
// when there are few groups for the pool's threads.
i64 grain_for(const Pool* pool, i64 groups, i64 row_bytes) {
    const i64 group_bytes = row_bytes * kRows;
    i64 grain = (i64(16) << 10) / (group_bytes > 0 ? group_bytes : 1);
    const i64 fair = groups / (i64(pool->threads()) * 4);
    if (grain > fair) grain = fair;
    return grain < 1 ? 1 : grain;
}

// One matrix of a ql_linear_many call: its row groups are items [first, first + groups) of the job.
enum class Path { kFloat, kInt, kPair, kQ8 };

struct ManyPart {
    const FormatEntry* e;
    Path path;
    Problem fp;
    QProblem qp;
    PProblem pp;
    Q8Problem q8;
    i64 first, groups;
};

struct ManyJob {
    const ManyPart* parts;
    int count;
};

void run_many(const void* ctx, i64 g0, i64 g1) {
    const ManyJob& job = *static_cast<const ManyJob*>(ctx);
    for (int i = 0; i < job.count && g0 < g1; ++i) {
        const ManyPart& m = job.parts[i];
        const i64 end = m.first + m.groups;
        if (g0 >= end) continue;
        const i64 stop = g1 < end ? g1 : end;
        switch (m.path) {
            case Path::kInt: m.e->run_int(&m.qp, g0 - m.first, stop - m.first); break;
            case Path::kPair: m.e->run_pair(&m.pp, g0 - m.first, stop - m.first); break;
            case Path::kQ8: m.e->run_q8(&m.q8, g0 - m.first, stop - m.first); break;
            default: m.e->run(&m.fp, g0 - m.first, stop - m.first);
        }
        g0 = stop;
    }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// C ABI (ctypes). Return codes: 0 ok, 1 unknown type, 2 bad shape, 3 out of memory.
// Pointers are not checked here; the Python launcher validates dtypes, shapes and sizes.
// ---------------------------------------------------------------------------------------------
QL_EXPORT int ql_abi_version() { return 7; }

QL_EXPORT int ql_isa() { return QL_AVX512 ? 512 : 0; }

// Block size and bytes per block of a GGML type id; 0 if the type is not supported.
QL_EXPORT int ql_format_info(int type, int* block, int* bytes) {
    const FormatEntry* e = find_format(type);
    if (!e) return 0;
    *block = e->block;
    *bytes = e->bytes;
    return 1;
}

// Rows per interleaved group (row_at) in which the resident store should lay out a matrix of this GGML
// type for this build and `mode` (as ql_linear_many's), 1 for the file's rows: kInterleave for the 8-bit
// path's formats in mode 2 on AVX-512 builds. Measured on a decode token of 2 Llama-70B-shaped blocks
// streamed from memory, layouts alternated ABBA (scripts/bench_cpu_kernels.py --layout, Zen 5), over the
// file's rows: 8-bit activations 1.02x (Q4_K, Q6_K; memory at ~52 GB/s) to 1.04-1.08x (Q4_K, Q5_K, Q6_K;
// ~81 GB/s) at two threads, 1.00-1.06x at one; in the 70B-shaped model (--layout-model) 1.03x at one
// thread, 1.00-1.05x at two; int16 0.97-1.00x for Q4_K / Q5_K, 0.93-1.00x for Q6_K's 8-row tiles
// (int_direct_tile): the int16 path keeps the file's rows. The AVX2 build's 1-row T = 1 tiles: 0.83x
// (8-bit) / 0.95x (int16) at one thread.
QL_EXPORT int ql_row_interleave(int type, int mode) {
    const FormatEntry* e = find_format(type);
    return QL_AVX512 && mode == 2 && e && e->run_q8 ? kInterleave : 1;
}

QL_EXPORT void* ql_pool_new(int threads) { return new (std::nothrow) Pool(threads < 1 ? 1 : threads); }
QL_EXPORT void ql_pool_free(void* pool) { delete static_cast<Pool*>(pool); }
QL_EXPORT void ql_pool_set_threads(void* pool, int threads) { static_cast<Pool*>(pool)->set_threads(threads < 1 ? 1 : threads); }
QL_EXPORT int ql_pool_threads(void* pool) { return static_cast<Pool*>(pool)->threads(); }

// mode: 0 = each format's fastest path (integer where it has one), 1 = the fp32 path, 2 = 8-bit
// activations (q8_path.h) for the formats that have that path, mode 0's path for the others.
// types[i]: the GGML type id of W_i, plus (il << 8) where its rows are interleaved in groups of
// il = kInterleave (row_at; formats with an integer path, ns[i] a multiple of il).
// outs[i] (T, ns[i]) = x (T, K) @ W_i (ns[i], K)^T for `count` matrices sharing x, in one pool job
// (x is quantized or permuted once). Every output element is computed exactly as by a call with
// that matrix alone.
QL_EXPORT int ql_linear_many(void* pool_handle, int count, const int* types, int mode, const float* x,
                             const uint8_t* const* ws, float* const* outs, i64 T, const i64* ns, i64 K) {
    constexpr int kMaxParts = 16;
    if (count < 1 || count > kMaxParts || T < 0 || K < 1 || mode < 0 || mode > 2) return 2;
    ManyPart parts[kMaxParts];
    bool need_q = false, need_pair = false, need_perm = false, need_q8 = false;
    i64 il[kMaxParts];
    for (int i = 0; i < count; ++i) {
        const FormatEntry* e = find_format(types[i] & 0xff);
        il[i] = types[i] >> 8 ? types[i] >> 8 : 1;
        if (!e || (il[i] != 1 && (il[i] != kInterleave || !e->run_int))) return 1;
        if (ns[i] < 1 || ns[i] % il[i] || K % e->block != 0 || (e->block > 1 && K % 32 != 0)) return 2;
        parts[i].e = e;
        parts[i].path = mode == 1                  ? Path::kFloat
                        : mode == 2 && e->run_q8 ? Path::kQ8
                        : e->run_int             ? Path::kInt
                        : e->run_pair            ? Path::kPair
                                                 : Path::kFloat;
        need_q8 |= parts[i].path == Path::kQ8;
        need_q |= parts[i].path == Path::kInt;
        need_pair |= parts[i].path == Path::kPair;
        need_perm |= parts[i].path == Path::kFloat && e->permuted;
    }
    if (T == 0) return 0;
    const uint64_t failures = g_alloc_failures.load(std::memory_order_relaxed);
    thread_local Scratch buf;  // x16 (T*K/2 floats' worth), sx (T*K/256), chunk sums (T*K/32)
    const int16_t* xq = nullptr;
    const float *xs = nullptr, *xm = nullptr, *xp = nullptr;
    if (need_q) {
        float* base = buf.try_get(T * K / 2 + T * K / kQBlock + T * K / 32);
        if (!base) return 3;
        int16_t* q = reinterpret_cast<int16_t*>(base);
        float* s = base + T * K / 2;
        float* m = s + T * K / kQBlock;
        quantize_x(x, T, K, q, s, m);
        xq = q, xs = s, xm = m;
    }
    const int16_t* pq = nullptr;
    const float* pg = nullptr;
    if (need_pair) {  // words (32 floats' worth a pair) and [sx, xsum] x 2 (4 floats a pair)
        const i64 pairs = (K / 32 + 1) / 2;
        float* base = pair_scratch().try_get(T * pairs * 36);
        if (!base) return 3;
        quantize_pairs(x, T, K, reinterpret_cast<int16_t*>(base), base + T * pairs * 32);
        pq = reinterpret_cast<const int16_t*>(base), pg = base + T * pairs * 32;
    }
    Q8Problem q8{};
    if (need_q8) {
        float* base = q8_scratch().try_get(Q8Layout(T, K).floats);
        if (!base) return 3;
        q8_quantize_x(x, T, K, base, q8);
    }
    if (need_perm && !(xp = permute_x(x, T, K))) return 3;
    Pool* pool = static_cast<Pool*>(pool_handle);
    i64 items = 0, row_bytes_max = 0;
    for (int i = 0; i < count; ++i) {
        ManyPart& m = parts[i];
        const i64 row_bytes = K / m.e->block * m.e->bytes;
        m.fp = Problem{m.e->permuted ? xp : x, ws[i], outs[i], T, ns[i], K, row_bytes, il[i]};
        m.qp = QProblem{xq, xs, xm, ws[i], outs[i], T, ns[i], K, row_bytes, il[i]};
        m.pp = PProblem{pq, pg, ws[i], outs[i], T, ns[i], K, row_bytes, il[i]};
        m.q8 = Q8Problem{q8.xq, q8.bs, q8.cs, q8.xs, q8.xt, q8.ct, q8.bt, ws[i], outs[i], T, ns[i], K, row_bytes, il[i]};
        m.first = items;
        m.groups = (ns[i] + kRows - 1) / kRows;
        items += m.groups;
        row_bytes_max = row_bytes > row_bytes_max ? row_bytes : row_bytes_max;
    }
    const ManyJob job{parts, count};
    pool->run(run_many, &job, items, grain_for(pool, items, row_bytes_max));
    constexpr i64 kKeepScratchFloats = i64(1) << 20;  // per calling thread; a long prompt's is freed
    buf.shrink(kKeepScratchFloats);
    pair_scratch().shrink(kKeepScratchFloats);
    q8_scratch().shrink(kKeepScratchFloats);
    permute_scratch().shrink(kKeepScratchFloats);
    return g_alloc_failures.load(std::memory_order_relaxed) != failures ? 3 : 0;
}

QL_EXPORT int ql_linear(void* pool_handle, int type, int mode, const float* x, const uint8_t* w, float* out,
                        i64 T, i64 N, i64 K) {
    return ql_linear_many(pool_handle, 1, &type, mode, x, &w, &out, T, &N, K);
}

#include "decode_step.h"

// One block for R rows of one decode token each (see decode_step.h): x, out (R, dim) fp32 (out may
// not overlap x), rot (R, rope_dim / 2) (cos, sin) pairs, keys/vals[r] row r's KV slot (Hkv, n_ctx,
// head_dim) of the layer's KV type, starts[r] the tokens it holds (the new key goes there).
QL_EXPORT int ql_decode_block(void* pool_handle, const DecodeLayer* layer, i64 rows, const float* x, float* out,
                              const float* rot, void* const* keys, void* const* vals, const i64* starts) {
    const uint64_t failures = g_alloc_failures.load(std::memory_order_relaxed);
    const int rc = decode_block(static_cast<Pool*>(pool_handle), *layer, rows, x, out, rot, keys, vals, starts);
    decode_scratch().shrink(i64(1) << 20);  // a large batch's activations are not kept for the process's life
    if (rc) return rc;
    return g_alloc_failures.load(std::memory_order_relaxed) != failures ? 3 : 0;
}

QL_EXPORT int ql_decode_layer_size() { return int(sizeof(DecodeLayer)); }
