// 8-bit-activation path (Q4_K, Q5_K, Q6_K; ql_linear_many mode 2). Included by qlinear.cpp after its
// integer path, whose vector types and helpers it uses. Opt-in: x is rounded to 8 bits, as llama.cpp
// does (Q8_K), which costs ~1e-2 relative on logits; the default int16 path costs ~1e-5.
//
// Numerics (identical in every code path, so results never depend on the tiling, the thread count,
// T, linear vs linear_many, or the AVX-512 vs portable build):
//   * each row of x is quantized per 256-element block b: sx_b = amax_b / 127 and
//     x8 = rint(x * (127 / amax_b)) in [-127, 127] (int8; error <= 0.5 sx_b = amax_b / 254 per
//     element); a block holding a NaN or an infinity gets sx_b = NaN (the result is NaN), an all-zero
//     block sx_b = 0; bs_i = sum of x8 over 16-element sub-block i, cs_j over 32-element chunk j;
//   * a weight super-block gives unsigned codes q (Q4_K 0..15, Q5_K 0..31, Q6_K 0..63, standing for
//     q - 32), per-element scales (Q4_K/Q5_K sc_j of chunk j, 6 bits; Q6_K sc_i of sub-block i,
//     signed 8 bits), d, and for Q4_K/Q5_K the mins m_j (6 bits) and dmin;
//   * the products are exact integers and the float part one fixed sequence: see "The contract and
//     kernels" below.
//
// The registers of one row of x (T < 8 and the rest of T % 8): x8 is stored once per call with the
// 32-element chunks of each block in the order kQ8Slot (chunks 0, 2, 1, 3, 4, 6, 5, 7): then a 64-byte
// load of Q4_K/Q5_K quants holds in its low nibbles exactly the chunks of x8 bytes 0..63 (chunks 0
// and 2) and in its high nibbles those of bytes 64..127 (chunks 1 and 3): no byte shuffles on the
// weight side. Q6_K broadcasts its 32-byte ql/qh groups (one variable shift per half). q8_int gives 16
// int32 lanes summing to the block's integer: lane l of each of the block's 4 registers r (x8 bytes
// 64r..64r+63) sums the 4 products of its bytes 4l..4l+3 (one scale), times that scale. AVX-512:
// vpdpbusd makes the 4-byte sums D_r (|D| <= 4 * 63 * 127 < 2^15), one vpackssdw packs two registers'
// D into words and one vpdpwssd applies both scales (6 multiplies a block and
// row of x where vpmaddubsw + vpdpwssd per register took 8); the portable build: vpmaddubsw pairs
// (|word| <= 2 * 63 * 127), vpmaddwd with the scale words. Q6_K's offsets: ow * bs summed in adjacent
// pairs, times 32, off lanes 0..7.
namespace {

// Chunk c of a block goes to slot kQ8Slot[c] of the stored x8 (its own inverse).
constexpr int kQ8Slot[8] = {0, 2, 1, 3, 4, 6, 5, 7};
// Register r (x8 bytes 64r..64r+63) holds 16-element sub-blocks kQ8Sub[r][0..3] in its 128-bit lanes.
constexpr int kQ8Sub[4][4] = {{0, 1, 4, 5}, {2, 3, 6, 7}, {8, 9, 12, 13}, {10, 11, 14, 15}};

struct Q8Problem {
    const int8_t* xq;   // (T, K + kQ8RowPad) x8, chunks of each 256-block in kQ8Slot order
    const int16_t* bs;  // (T, K / 16) sums of x8 per 16 elements
    const int16_t* cs;  // (T, K / 32) sums of x8 per 32 elements (cs_j)
    const float* xs;    // (K / 256, T) sx_b: block b of every row together
    const int8_t* xt;   // x8 of rows kLanes g.. as lanes, (q8_lane_rows(T) / kLanes, K / 256, 64, kLanes, 4 bytes)
    const int16_t* ct;  // with xt: (., K / 256, 4, kLanes rows, 2) words (cs_2q, cs_2q+1)
    const int16_t* bt;  // with xt: (., K / 256, 8, kLanes rows, 2) words (bs_2k, bs_2k+1)
    const uint8_t* w;   // N rows of row_bytes (see row_at)
    float* out;         // (T, N)
    i64 T, N, K, row_bytes, il;
};

// Bytes after each row of x8. Rows exactly K bytes apart put the same block of every row of a tile
// into the same L1 sets whenever K is a multiple of 4 KiB (8 rows x 4 lines each, beside the weights);
// 256 more bytes a row spread them. Measured 1.07-1.08x at T = 32 (8192 x 8192, 8192 x 28672, one thread).
constexpr i64 kQ8RowPad = 256;

Scratch& q8_scratch() {  // the caller's quantized x
    thread_local Scratch buf;
    return buf;
}

// Rows of x per lanes tile: 16 in the int32 lanes of a zmm register (AVX-512 VNNI), 8 in a ymm (AVX2).
#if QL_AVX512 && defined(__AVX512VNNI__)
#define kLANES_ZMM 1
constexpr int kLanes = 16;
#elif defined(__AVX2__)
#define kLANES_ZMM 0
constexpr int kLanes = 8;
#else
#define kLANES_ZMM 0
constexpr int kLanes = 0;  // no lanes kernel
#endif

// Rows of x the lanes kernel takes (tiles of kLanes; a last tile of 8..15 rows is padded with zero
// rows): they also get xt, ct and bt. 0 on builds without AVX2.
constexpr i64 kTileRows = kLanes ? kLanes : 8;  // kLanes, or 8 (a divisor) where there are none
inline i64 q8_lane_rows(i64 T) {
    if constexpr (kLanes == 0) return 0;
    const i64 full = T / kTileRows * kTileRows;
    return T - full >= 8 ? full + kLanes : full;
}

// The scratch of T quantized rows: x8 ((K + kQ8RowPad) bytes a row), bs, cs (int16), xs, then
// xt, ct and bt of the q8_lane_rows(T) rows (Q8Problem).
struct Q8Layout {
    i64 bs, cs, xs, xt, ct, bt, floats;  // offsets in floats from the base (64-byte multiples), the total
    static i64 up(i64 f) { return (f + 15) / 16 * 16; }
    Q8Layout(i64 T, i64 K)
        : bs(up(T * (K + kQ8RowPad) / 4)), cs(up(bs + T * K / 32)), xs(up(cs + T * K / 64)),
          xt(up(xs + T * K / kQBlock)), ct(up(xt + q8_lane_rows(T) * K / 4)),
          bt(up(ct + q8_lane_rows(T) * K / 64)), floats(bt + q8_lane_rows(T) * K / 32) {}
};

// Quantize T rows of x into the scratch `base` (Q8Layout(T, K).floats floats); the problem's x fields.
void q8_quantize_x(const float* x, i64 T, i64 K, float* base, Q8Problem& p) {
    const Q8Layout lay(T, K);
    int8_t* xq = reinterpret_cast<int8_t*>(base);
    int16_t* bs = reinterpret_cast<int16_t*>(base + lay.bs);
    int16_t* cs = reinterpret_cast<int16_t*>(base + lay.cs);
    float* xs = base + lay.xs;
    int8_t* xt = reinterpret_cast<int8_t*>(base + lay.xt);
    int16_t* ct = reinterpret_cast<int16_t*>(base + lay.ct);
    int16_t* bt = reinterpret_cast<int16_t*>(base + lay.bt);
    p.xq = xq, p.bs = bs, p.cs = cs, p.xs = xs, p.xt = xt, p.ct = ct, p.bt = bt;
    const i64 nb = K / kQBlock, lanes = q8_lane_rows(T);
    if (lanes > T) {  // the padding rows of the last tile: zeros
        const i64 g = lanes / kTileRows - 1;
        std::memset(xt + g * nb * 256 * kLanes, 0, size_t(nb * 256 * kLanes));
        std::memset(ct + g * nb * 8 * kLanes, 0, size_t(nb * 8 * kLanes) * sizeof(int16_t));
        std::memset(bt + g * nb * 16 * kLanes, 0, size_t(nb * 16 * kLanes) * sizeof(int16_t));
    }
    for (i64 b = 0; b < T * nb; ++b) {
        const i64 t = b / nb, blk = b % nb;
        int8_t* dst = xq + t * (K + kQ8RowPad) + blk * kQBlock;
        int8_t q[kQBlock];
        const float sx = quantize_block<127>(x + b * kQBlock, kQBlock, q);
        xs[blk * T + t] = sx;
        for (int i = 0; i < 16; ++i) {
            int s = 0;
            for (int l = 0; l < 16; ++l) s += q[16 * i + l];
            bs[b * 16 + i] = int16_t(s);
        }
        for (int j = 0; j < 8; ++j) cs[b * 8 + j] = int16_t(bs[b * 16 + 2 * j] + bs[b * 16 + 2 * j + 1]);
        for (int c = 0; c < 8; ++c) std::memcpy(dst + 32 * kQ8Slot[c], q + 32 * c, 32);
        if (t < lanes) {
            const i64 tile = (t / kTileRows * nb + blk), lane = t % kTileRows;
            for (int o = 0; o < 64; ++o) std::memcpy(xt + (tile * 64 + o) * 4 * kLanes + 4 * lane, q + 4 * o, 4);
            for (int j = 0; j < 8; ++j) ct[(tile * 4 + j / 2) * 2 * kLanes + 2 * lane + j % 2] = cs[b * 8 + j];
            for (int i = 0; i < 16; ++i) bt[(tile * 8 + i / 2) * 2 * kLanes + 2 * lane + i % 2] = bs[b * 16 + i];
        }
    }
}

// A vpshufb control making 4 words of byte b each (high bytes zero).
constexpr long long q8_ctrl4(int b) { return 0x8000800080008000ll | 0x0001000100010001ll * b; }

// One decoded super-block: codes q[r] (pairing with x8 bytes 64r..64r+63), scale words s (AVX-512: s[G]
// for registers 2G and 2G + 1, interleaved; portable: s[r]), Q6_K's offset words ow or Q4_K/Q5_K's
// mins (see the contract), d.
#if QL_AVX512
using QB = __m512i;   // 64 unsigned codes
using SW = __m256i;   // 16 words
using M8I = __m256i;  // 8 int32 lanes
inline SW sw_load(const int16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
// The contract's D_r of codes q against x8.
inline __m512i q8_lanes(QB q, const int8_t* x8) {
#if defined(__AVX512VNNI__)
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, _mm512_loadu_si512(x8));
#else
    return _mm512_madd_epi16(_mm512_maddubs_epi16(q, _mm512_loadu_si512(x8)), _mm512_set1_epi16(1));
#endif
}
// acc + the I_b lanes of one pair of registers (q0 against x8, q1 against x8 + 64), their D packed
// into words (vpackssdw, exact: |D| < 2^15): 128-bit lane k holds q0's lanes 4k..4k+3 then q1's; s:
// the scale word of each.
inline AI q8_pair(AI acc, QB q0, QB q1, WI s, const int8_t* x8) {
    const __m512i p = _mm512_packs_epi32(q8_lanes(q0, x8), q8_lanes(q1, x8 + 64));
#if defined(__AVX512VNNI__)
    return _mm512_dpwssd_epi32(acc, p, s);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(p, s));
#endif
}
constexpr int kQ8Scales = 2;  // scale-word registers: one per pair of registers
inline M8I q8_offsets(SW ow, const int16_t* ox) { return _mm256_madd_epi16(ow, sw_load(ox)); }
inline AI sub_lo32(AI I, M8I m) { return _mm512_sub_epi32(I, _mm512_zextsi256_si512(_mm256_slli_epi32(m, 5))); }
#else
typedef uint8_t UB32 __attribute__((vector_size(32)));
using QB = Pair<UB32>;
using SW = W16;
using M8I = I8;
inline SW sw_load(const int16_t* p) { SW v; std::memcpy(&v, p, sizeof v); return v; }
inline UB32 ub_load(const uint8_t* p) { UB32 v; std::memcpy(&v, p, sizeof v); return v; }
// Words i x8 then j x8 of v.
template <int i, int j>
inline W16 two_words(W16 v) {
    return __builtin_shufflevector(v, v, i, i, i, i, i, i, i, i, j, j, j, j, j, j, j, j);
}
// 32 unsigned bytes times 32 signed bytes, adjacent products summed -> 16 words.
inline W16 maddubs32(UB32 q, const int8_t* x) {
#if defined(__AVX2__)
    return W16(_mm256_maddubs_epi16(__m256i(q), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))));
#else
    W16 r;
    for (int l = 0; l < 16; ++l) r[l] = int16_t(int(q[2 * l]) * x[2 * l] + int(q[2 * l + 1]) * x[2 * l + 1]);
    return r;
#endif
}
// 16 words times 16 words, adjacent products summed -> 8 int32 lanes.
inline I8 madd16(W16 a, W16 b) {
#if defined(__AVX2__)
    return I8(_mm256_madd_epi16(__m256i(a), __m256i(b)));
#else
    I8 r;
    for (int l = 0; l < 8; ++l) r[l] = int32_t(a[2 * l]) * b[2 * l] + int32_t(a[2 * l + 1]) * b[2 * l + 1];
    return r;
#endif
}
// sc * D_r of one register (s: its scale words).
inline AI q8_reg(QB q, WI s, const int8_t* x8) { return {madd16(maddubs32(q.a, x8), s.a), madd16(maddubs32(q.b, x8 + 32), s.b)}; }
constexpr int kQ8Scales = 4;  // scale-word registers: one per register
inline M8I q8_offsets(SW ow, const int16_t* ox) { return madd16(ow, sw_load(ox)); }
inline AI sub_lo32(AI I, M8I m) { return {I.a - (m << 5), I.b}; }
#endif

struct Q8Dec {
    QB q[4];
    WI s[kQ8Scales];
    SW ow;           // Q6_K
    float d;
    float dmin;      // Q4_K / Q5_K
    int16_t mw[8];   // Q4_K / Q5_K: m_0..7
};

// Q4_K (kQ5 false) / Q5_K: element 32j + l is nibble j & 1 of qs[32(j >> 1) + l] (Q5_K: plus bit j of
// qh[l] as bit 4), scale sc_j, min m_j (6 bits each, packed in 12 bytes at offset 4). Register
// r = 2G + h holds chunks 4G + h (bytes 0..31 of qs + 64G, nibble h) and 4G + 2 + h (bytes 32..63).
template <bool kQ5>
struct Q8Q45_K {
    static constexpr int kBytes = kQ5 ? 176 : 144;
    static constexpr bool kMins = true;
    static constexpr int kQs = kQ5 ? 48 : 16;
#if QL_AVX512
    static void decode(const uint8_t* sb, Q8Dec& o) { decode(sb, kquant_scale_min_bytes(sb + 4), o); }
    static void decode(const uint8_t* sb, __m128i sm, Q8Dec& o) {  // sm: kquant_scale_min_bytes(sb + 4)
        const __m128 dd = _mm_cvtph_ps(_mm_cvtsi32_si128(int(load_u32(sb))));  // d, dmin
        o.d = _mm_cvtss_f32(dd);
        o.dmin = _mm_cvtss_f32(_mm_movehdup_ps(dd));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(o.mw), _mm_cvtepu8_epi16(_mm_srli_si128(sm, 8)));
        const __m512i smb = _mm512_broadcast_i32x4(sm);
        const __m512i m4 = _mm512_set1_epi8(15);
        for (int G = 0; G < 2; ++G) {
            const __m512i v = _mm512_loadu_si512(sb + kQs + 64 * G);
            o.q[2 * G] = _mm512_and_si512(v, m4);
            o.q[2 * G + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
            // registers 2G, 2G + 1 hold chunks 4G, 4G + 1 in 128-bit lanes 0, 1 and 4G + 2, 4G + 3 in 2, 3
            const long long a0 = q8_ctrl4(4 * G), a1 = q8_ctrl4(4 * G + 1), b0 = q8_ctrl4(4 * G + 2), b1 = q8_ctrl4(4 * G + 3);
            o.s[G] = _mm512_shuffle_epi8(smb, _mm512_set_epi64(b1, b0, b1, b0, a1, a0, a1, a0));
        }
        if constexpr (kQ5) {
            const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + 16)));
            for (int r = 0; r < 4; ++r) {
                const int c0 = 4 * (r >> 1) + (r & 1);
                const __m512i sh = _mm512_inserti64x4(_mm512_set1_epi16(short(c0)), _mm256_set1_epi16(short(c0 + 2)), 1);
                const __m512i hb = _mm512_slli_epi16(_mm512_srlv_epi16(qh, sh), 4);
                o.q[r] = _mm512_ternarylogic_epi32(o.q[r], hb, _mm512_set1_epi8(16), 0xF8);  // q | (hb & 16)
            }
        }
    }
#else
    static void decode(const uint8_t* sb, Q8Dec& o) {
        o.d = half_at(sb);
        o.dmin = half_at(sb + 2);
#if defined(__AVX2__)
        const __m128i sm = kquant_scale_min_bytes(sb + 4);  // bytes sc_0..7, m_0..7
        _mm_storeu_si128(reinterpret_cast<__m128i*>(o.mw), _mm_cvtepu8_epi16(_mm_srli_si128(sm, 8)));
        const __m256i smb = _mm256_broadcastsi128_si256(sm);
        const auto scale_words = [&](int c) { return W16(_mm256_shuffle_epi8(smb, _mm256_set1_epi64x(q8_ctrl4(c)))); };
#else
        int sc[8];
        for (int i = 0; i < 8; ++i) {
            int mn;
            kquant_scale_min(sb + 4, i, sc[i], mn);
            o.mw[i] = int16_t(mn);
        }
        const auto scale_words = [&](int c) { return W16{} + int16_t(sc[c]); };
#endif
        for (int r = 0; r < 4; ++r) {
            const int G = r >> 1, h = r & 1, c0 = 4 * G + h;
            const UB32 a = ub_load(sb + kQs + 64 * G), b = ub_load(sb + kQs + 64 * G + 32);
            o.q[r] = {UB32((a >> (4 * h)) & 15), UB32((b >> (4 * h)) & 15)};
            if constexpr (kQ5) {
                const UB32 qh = ub_load(sb + 16);
                o.q[r].a |= UB32(((qh >> c0) & 1) << 4);
                o.q[r].b |= UB32(((qh >> (c0 + 2)) & 1) << 4);
            }
            o.s[r] = {scale_words(c0), scale_words(c0 + 2)};
        }
    }
#endif
};
using Q8Q4_K = Q8Q45_K<false>;
using Q8Q5_K = Q8Q45_K<true>;

// Q6_K: {ql[128], qh[64], int8 sc[16], fp16 d}. Register r = 2h + p holds chunks 4h + p (low nibbles
// of ql[64h + 32p + l], bits 2p..2p+1 of qh[32h + l]) and 4h + 2 + p (high nibbles, bits 2p+4..2p+5);
// its 128-bit lanes hold 16-element sub-blocks kQ8Sub[r]. ow = sc_0..15; the x side is bs.
struct Q8Q6_K {
    static constexpr int kBytes = 210;
    static constexpr bool kMins = false;
    static void decode(const uint8_t* sb, Q8Dec& o) {
        o.d = half_at(sb + 208);
#if QL_AVX512
        o.ow = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sb + 192)));
        const auto bcast32 = [](const uint8_t* p) {
            return _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
        };
        const __m512i lsh = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
        for (int r = 0; r < 4; ++r) {
            const int h = r >> 1, p = r & 1;
            const __m512i lo = _mm512_and_si512(_mm512_srlv_epi16(bcast32(sb + 64 * h + 32 * p), lsh), _mm512_set1_epi8(15));
            const __m512i hsh = _mm512_add_epi16(lsh, _mm512_set1_epi16(short(2 * p)));
            const __m512i hb = _mm512_slli_epi16(_mm512_srlv_epi16(bcast32(sb + 128 + 32 * h), hsh), 4);
            o.q[r] = _mm512_ternarylogic_epi32(lo, hb, _mm512_set1_epi8(0x30), 0xF8);  // lo | (hb & 0x30)
        }
        for (int G = 0; G < 2; ++G) {  // 128-bit lane k: 4 words sc of kQ8Sub[2G][k], then 4 of kQ8Sub[2G + 1][k]
            long long w[8];
            for (int k = 0; k < 4; ++k)
                for (int h = 0; h < 2; ++h) w[2 * k + h] = 0x0001000100010001ll * kQ8Sub[2 * G + h][k];
            o.s[G] = _mm512_permutexvar_epi16(_mm512_set_epi64(w[7], w[6], w[5], w[4], w[3], w[2], w[1], w[0]),
                                              _mm512_castsi256_si512(o.ow));
        }
#else
        o.ow = SW{};
        for (int i = 0; i < 16; ++i) o.ow[i] = int8_t(sb[192 + i]);
        for (int r = 0; r < 4; ++r) {
            const int h = r >> 1, p = r & 1;
            const UB32 ql = ub_load(sb + 64 * h + 32 * p), qh = ub_load(sb + 128 + 32 * h);
            o.q[r] = {UB32((ql & 15) | (((qh >> (2 * p)) & 3) << 4)), UB32((ql >> 4) | (((qh >> (2 * p + 4)) & 3) << 4))};
        }
        o.s[0] = {two_words<0, 1>(o.ow), two_words<4, 5>(o.ow)};
        o.s[1] = {two_words<2, 3>(o.ow), two_words<6, 7>(o.ow)};
        o.s[2] = {two_words<8, 9>(o.ow), two_words<12, 13>(o.ow)};
        o.s[3] = {two_words<10, 11>(o.ow), two_words<14, 15>(o.ow)};
#endif
    }
};

// The I_b lanes (before Q6_K's offsets) of one decoded super-block against block b of x8.
inline AI q8_int(const Q8Dec& w, const int8_t* x8) {
#if QL_AVX512
    return q8_pair(q8_pair(izero(), w.q[0], w.q[1], w.s[0], x8), w.q[2], w.q[3], w.s[1], x8 + 128);
#else
    return iadd(iadd(q8_reg(w.q[0], w.s[0], x8), q8_reg(w.q[1], w.s[1], x8 + 64)),
                iadd(q8_reg(w.q[2], w.s[2], x8 + 128), q8_reg(w.q[3], w.s[3], x8 + 192)));
#endif
}

constexpr int kQ8RowsT1 = QL_AVX512 ? 4 : 1;   // rows of W per tile, T = 1
constexpr int kQ8RowsSmallT = QL_AVX512 ? 2 : 1;  // rows of W per tile, T = 2..3
constexpr int kQ8Rows = QL_AVX512 ? 1 : 2;     // rows of W per group of row tiles, T >= 4
// x8 bytes a block of rows of x may span: each row of W reads the whole block, which then stays in L2
// beside the weights instead of coming from L3 once per row of W (the weights are read once per block:
// at T = 64 and K = 28672, 4 passes). Measured against no blocks, one thread, on the AVX-512 machine
// (1 MiB L2 a core): 8192 x 28672 1.14x at T = 32, 1.25x at T = 64; 8192 x 8192 1.02x at T = 64
// (256 KiB: 1.08x less at K = 28672). On the AVX2 machine (512 KiB L2) 256 KiB measured 0.87-1.04x.
constexpr i64 kQ8XBlockBytes = 512 << 10;

// ---------------------------------------------------------------------------------------------
// The contract and kernels
// ---------------------------------------------------------------------------------------------
// No lanes of partial sums: per (row of W, row of x, block b) exact integers,
//     Q4_K, Q5_K: I_b = sum_j sc_j * sum_{l < 32} q_{32j+l} x8_{32j+l},   M_b = sum_j m_j * cs_j
//     Q6_K: I_b = sum_i sc_i * sum_{l < 16} (q_{16i+l} - 32) x8_{16i+l}   (sc_i signed)
// (|I_b| < 2^25, |M_b| < 2^21: exact in any order of summation), then 8 fp32 accumulators a_0..7 = 0,
// for b in order with i = b mod 8:
//     a_i = fma(float(I_b), d_b * sx_b, a_i);   Q4_K/Q5_K also a_i = fma(-float(M_b), dmin_b * sx_b, a_i);
// and out = ((a_0 + a_4) + (a_2 + a_6)) + ((a_1 + a_5) + (a_3 + a_7)). (An a_i no block reaches stays
// +0; an fma of zeros leaves any a_i as it is, since no a_i is ever -0.) So any layout of the work
// gives the same bits, and the kernels may put rows of x in lanes:
//   * tiles of 16 rows of x (AVX-512 VNNI builds; a last tile of 8..15 rows padded with zero rows):
//     lane t of a zmm is row 16g + t, one vpdpbusd per 4 elements of a row of W (broadcast) against
//     16 rows of x, one vpmulld per scale group (k8_lane_tile below; 1.92-2.05x the AVX2 kernel at
//     T = 16..32, one thread, Zen 5);
//   * tiles of 8 rows of x (AVX2, the other x86 builds): 32-bit lane t of a register is row 8g + t of x
//     (xt: its 4 bytes of each group of 4 elements), a row of W's 4 codes are broadcast, and the 16-bit
//     pair sums of vpmaddubsw add up in words before one vpmaddwd applies a scale: Q4_K over a whole
//     32-element chunk (|.| <= 16 * 15 * 127 < 2^15; 9 multiplies per chunk, row of W and 8 rows of x
//     where one row of x per register takes 16), Q5_K over 16 elements (8 * 31 * 127; 10), Q6_K over
//     8 (4 * 63 * 127; 12); the float part is 8 rows of x an instruction. Measured at T = 8..64 (8192 x
//     8192, 8192 x 28672, 28672 x 8192, one thread, AVX2): Q4_K 1.41-1.59x, Q5_K 1.62-1.72x, Q6_K 1.34-1.45x;
//   * every other row of x (T < 8, the rest of T past the tiles) and builds without AVX2: the 8-bit path's registers
//     above (Q8Q45_K / Q8Q6_K, q8_int); per 8 blocks their lanes are summed 8 at a time (vphaddd) and
//     the float part is one instruction for the 8 a_i.

// The 8 fp32 accumulators of one output, summed as the contract says.
inline float k8_sum8(const float* a) { return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7])); }

#if defined(__AVX2__)
// Lane j: the sum of the 8 int32 lanes of v[j].
inline __m256i k8_reduce8(const __m256i* v) {
    const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}
// Lane j: the sum of the 4 int32 of block j (v: blocks 2k, 2k + 1 in register k).
inline __m256i k8_reduce4(const __m256i* v) {
    const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    return _mm256_permutevar8x32_epi32(a, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}
// The 8 I_b lanes of q8_int, halves added.
inline __m256i q8_half_sum(AI v) {
#if QL_AVX512
    return _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
#else
    return __m256i(v.a + v.b);
#endif
}
#else
inline int32_t q8_isum(AI v) {
    const I8 h = v.a + v.b;
    return ((h[0] + h[1]) + (h[2] + h[3])) + ((h[4] + h[5]) + (h[6] + h[7]));
}
#endif

// The I_b lanes of one decoded super-block against block b of row tt of x (Q6_K: offsets subtracted).
template <class F>
inline AI k8_int(const Q8Problem& p, const Q8Dec& w, i64 tt, i64 b) {
    const AI v = q8_int(w, p.xq + tt * (p.K + kQ8RowPad) + b * kQBlock);
    if constexpr (F::kMins) return v;
    else return sub_lo32(v, q8_offsets(w.ow, p.bs + (tt * (p.K / kQBlock) + b) * 16));
}

// R rows of W (from n) times rows t0..t0+TT-1 of x, one row of x per register.
template <class F, int R, int TT>
void k8_row_tile(const Q8Problem& p, i64 n, i64 t0) {
    const i64 nb = p.K / kQBlock;
    const uint8_t* row0 = p.w + n * p.row_bytes;  // the tile's bytes start here (row_at)
    const uint8_t* rows[R];
    for (int r = 0; r < R; ++r) rows[r] = row_at<F::kBytes>(p, n + r);
    const i64 bstep = block_step<F::kBytes>(p);
    // into L1 (prefetcht0): over L2 only, 1.11-1.23x at T = 1 streaming from memory on Q4_K / Q5_K / Q6_K
    // (one thread; two threads 0.99-1.15x), 1.02x in cache, 0.99x at T = 2..3 (Zen 5)
    NextTilePrefetch<3> pf(row0, R * p.row_bytes, p.w + p.N * p.row_bytes, nb);
#if defined(__AVX2__)
    __m256 acc[R][TT];
    alignas(32) int32_t ib[R][TT][8][8], mb[R][TT][8][4];  // a group of 8 blocks: I_b lanes, M_b parts
    alignas(32) float dd[R][8], dm[R][8], sxb[TT][8];
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < TT; ++t) acc[r][t] = _mm256_setzero_ps();
#else
    float acc[R][TT][8] = {};
#endif
    // AVX-512, Q4_K / Q5_K, 4 rows of W: their scale bytes unpacked together
    constexpr bool kScales4 = QL_AVX512 && F::kMins && R == 4;
    for (i64 b = 0; b < nb; ++b) {
        pf.step();
        const int j = int(b & 7);
#if QL_AVX512
        alignas(64) __m128i sm[4];
        if constexpr (kScales4) _mm512_store_si512(sm, kquant_scale_min_bytes4(rows[0] + b * bstep + 4, row_step<F::kBytes>(p)));
#endif
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
            Q8Dec w;
#if QL_AVX512
            if constexpr (kScales4) F::decode(rows[r] + b * bstep, _mm_load_si128(sm + r), w);
            else
#endif
                F::decode(rows[r] + b * bstep, w);
#if defined(__AVX2__)
            dd[r][j] = w.d;
            __m128i mw = _mm_setzero_si128();
            if constexpr (F::kMins) dm[r][j] = w.dmin, mw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.mw));
#endif
            for (int t = 0; t < TT; ++t) {
                const i64 tt = t0 + t;
                const AI v = k8_int<F>(p, w, tt, b);
                const int16_t* cs = p.cs + (tt * nb + b) * 8;
#if defined(__AVX2__)
                _mm256_store_si256(reinterpret_cast<__m256i*>(ib[r][t][j]), q8_half_sum(v));
                if constexpr (F::kMins)
                    _mm_store_si128(reinterpret_cast<__m128i*>(mb[r][t][j]),
                                    _mm_madd_epi16(mw, _mm_loadu_si128(reinterpret_cast<const __m128i*>(cs))));
#else
                const float sx = p.xs[b * p.T + tt];
                acc[r][t][j] = __builtin_fmaf(float(q8_isum(v)), w.d * sx, acc[r][t][j]);
                if constexpr (F::kMins) {
                    int32_t M = 0;
                    for (int k = 0; k < 8; ++k) M += int32_t(w.mw[k]) * cs[k];
                    acc[r][t][j] = __builtin_fmaf(-float(M), w.dmin * sx, acc[r][t][j]);
                }
#endif
            }
        }
#if defined(__AVX2__)
        for (int t = 0; t < TT; ++t) sxb[t][j] = p.xs[b * p.T + t0 + t];
        if (j == 7 || b == nb - 1) {
            for (int k = j + 1; k < 8; ++k) {  // a short last group: zeros (the fma leaves a_k as it is)
                for (int r = 0; r < R; ++r) {
                    dd[r][k] = dm[r][k] = 0.0f;
                    for (int t = 0; t < TT; ++t) {
                        std::memset(ib[r][t][k], 0, sizeof ib[r][t][k]);
                        std::memset(mb[r][t][k], 0, sizeof mb[r][t][k]);
                    }
                }
                for (int t = 0; t < TT; ++t) sxb[t][k] = 0.0f;
            }
            for (int r = 0; r < R; ++r) {
                const __m256 d = _mm256_load_ps(dd[r]);
                for (int t = 0; t < TT; ++t) {
                    const __m256 sx = _mm256_load_ps(sxb[t]);
                    const __m256i I = k8_reduce8(reinterpret_cast<const __m256i*>(ib[r][t]));
                    acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(I), _mm256_mul_ps(d, sx), acc[r][t]);
                    if constexpr (F::kMins) {
                        const __m256i M = k8_reduce4(reinterpret_cast<const __m256i*>(mb[r][t]));
                        acc[r][t] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(M), _mm256_mul_ps(_mm256_load_ps(dm[r]), sx), acc[r][t]);
                    }
                }
            }
        }
#endif
    }
    for (int t = 0; t < TT; ++t)
        for (int r = 0; r < R; ++r) {
#if defined(__AVX2__)
            alignas(32) float a[8];
            _mm256_store_ps(a, acc[r][t]);
            p.out[(t0 + t) * p.N + n + r] = k8_sum8(a);
#else
            p.out[(t0 + t) * p.N + n + r] = k8_sum8(acc[r][t]);
#endif
        }
}

template <class F, int R, int TT>
void k8_row_range(const Q8Problem& p, i64 n, i64 n_end, i64 t0) {
    for (; n + R <= n_end; n += R) k8_row_tile<F, R, TT>(p, n, t0);
    for (; n < n_end; ++n) k8_row_tile<F, 1, TT>(p, n, t0);
}

#if defined(__AVX2__)
inline __m256i bcast4(const uint8_t* p) { return _mm256_set1_epi32(int(load_u32(p))); }
inline __m256i xt_group(const int8_t* xb, int o) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + o * 32)); }

// The lanes kernel's view of one super-block of one row of W: its codes in element order, broadcast
// 4 at a time against the 8 rows of x of a tile. dot() adds to I[r] (lanes: rows of x) row r's I_b
// (before Q6_K's offsets); mins() / offsets() the rest of the contract's integers from ct / bt.
template <bool kQ5>
struct Q45KLanes {
    struct Row {
        alignas(64) uint8_t q[256];
        int32_t sc[8], mn[4];  // sc_c; words (m_2q, m_2q+1)
        float d, dmin;
    };
    static constexpr bool kMins = true;
    static constexpr int kGroups = 8;  // groups of 4 elements per scale
    static constexpr int kBytes = Q8Q45_K<kQ5>::kBytes, kQs = Q8Q45_K<kQ5>::kQs;
    // Word sums of this many groups of 4 elements stay in int16: 2 * 15 * 127 * 8, 2 * 31 * 127 * 4.
    static constexpr int kRun = kQ5 ? 4 : 8;
    static void decode(const uint8_t* sb, Row& o) {
        const __m128 dd = _mm_cvtph_ps(_mm_cvtsi32_si128(int(load_u32(sb))));  // d, dmin
        o.d = _mm_cvtss_f32(dd);
        o.dmin = _mm_cvtss_f32(_mm_movehdup_ps(dd));
        const __m128i sm = kquant_scale_min_bytes(sb + 4);  // bytes sc_0..7, m_0..7
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o.sc), _mm256_cvtepu8_epi32(sm));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(o.mn), _mm_cvtepu8_epi16(_mm_srli_si128(sm, 8)));
        const __m256i m4 = _mm256_set1_epi8(15), one = _mm256_set1_epi8(1);
        for (int i = 0; i < 4; ++i) {  // chunk 2i: low nibbles of qs[32i..32i+31], chunk 2i + 1: high
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + kQs + 32 * i));
            __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
            if constexpr (kQ5) {  // bit j of qh[l] is bit 4 of element 32j + l
                const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + 16));
                lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * i), one), 4));
                hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * i + 1), one), 4));
            }
            _mm256_store_si256(reinterpret_cast<__m256i*>(o.q + 64 * i), lo);
            _mm256_store_si256(reinterpret_cast<__m256i*>(o.q + 64 * i + 32), hi);
        }
    }
    template <int R>
    static void dot(const Row* w, const int8_t* xb, __m256i* I) {
        for (int c = 0; c < 8; ++c) {  // chunk c: groups 8c..8c+7, kRun at a time summed in words, then its scale
            for (int o0 = 0; o0 < 8; o0 += kRun) {
                __m256i s[R];
                for (int r = 0; r < R; ++r) s[r] = _mm256_setzero_si256();
                for (int o = o0; o < o0 + kRun; ++o) {
                    const __m256i x = xt_group(xb, 8 * c + o);
                    for (int r = 0; r < R; ++r) {
                        s[r] = _mm256_add_epi16(s[r], _mm256_maddubs_epi16(bcast4(w[r].q + 32 * c + 4 * o), x));
                        asm("" : "+x"(s[r]));  // keep the chain: GCC otherwise builds a tree of all 32 products and spills
                    }
                }
                for (int r = 0; r < R; ++r) I[r] = _mm256_add_epi32(I[r], _mm256_madd_epi16(s[r], _mm256_set1_epi16(short(w[r].sc[c]))));
            }
        }
    }
    template <int R>
    static void mins(const Row* w, const int16_t* ctb, __m256i* M) {  // M_b
        for (int q = 0; q < 4; ++q) {
            const __m256i cs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ctb + q * 16));
            for (int r = 0; r < R; ++r) M[r] = _mm256_add_epi32(M[r], _mm256_madd_epi16(_mm256_set1_epi32(w[r].mn[q]), cs));
        }
    }
};

struct Q6KLanes {
    struct Row {
        alignas(64) uint8_t q[256];
        int32_t sc[16], sp[8];  // sc_i; words (sc_2k, sc_2k+1)
        float d;
    };
    static constexpr bool kMins = false;
    static constexpr int kGroups = 4;  // groups of 4 elements per scale
    static constexpr int kBytes = Q8Q6_K::kBytes;
    static void decode(const uint8_t* sb, Row& o) {
        o.d = half_at(sb + 208);
        const __m256i scw = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sb + 192)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o.sp), scw);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o.sc), _mm256_cvtepi16_epi32(_mm256_castsi256_si128(scw)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o.sc + 8), _mm256_cvtepi16_epi32(_mm256_extracti128_si256(scw, 1)));
        const __m256i m4 = _mm256_set1_epi8(15), m3 = _mm256_set1_epi8(3);
        for (int h = 0; h < 2; ++h) {  // elements 128h + 32u + l, u = 0..3
            const auto ld = [&](int off) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + off)); };
            const __m256i ql0 = ld(64 * h), ql1 = ld(64 * h + 32), qh = ld(128 + 32 * h);
            const __m256i q[4] = {_mm256_and_si256(ql0, m4), _mm256_and_si256(ql1, m4),
                                  _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4)};
            for (int u = 0; u < 4; ++u) {
                const __m256i hb = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * u), m3);
                _mm256_store_si256(reinterpret_cast<__m256i*>(o.q + 128 * h + 32 * u), _mm256_or_si256(q[u], _mm256_slli_epi16(hb, 4)));
            }
        }
    }
    template <int R>
    static void dot(const Row* w, const int8_t* xb, __m256i* I) {
        for (int i = 0; i < 16; ++i) {  // sub-block i: groups 4i..4i+3, summed in words two at a time
            for (int h = 0; h < 2; ++h) {
                const __m256i x0 = xt_group(xb, 4 * i + 2 * h), x1 = xt_group(xb, 4 * i + 2 * h + 1);
                for (int r = 0; r < R; ++r) {
                    const uint8_t* q = w[r].q + 16 * i + 8 * h;
                    const __m256i s = _mm256_add_epi16(_mm256_maddubs_epi16(bcast4(q), x0), _mm256_maddubs_epi16(bcast4(q + 4), x1));
                    I[r] = _mm256_add_epi32(I[r], _mm256_madd_epi16(s, _mm256_set1_epi16(short(w[r].sc[i]))));
                }
            }
        }
    }
    template <int R>
    static void offsets(const Row* w, const int16_t* btb, __m256i* I) {  // I_b -= 32 sum_i sc_i bs_i
        __m256i o[R];
        for (int r = 0; r < R; ++r) o[r] = _mm256_setzero_si256();
        for (int k = 0; k < 8; ++k) {
            const __m256i bs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(btb + k * 16));
            for (int r = 0; r < R; ++r) o[r] = _mm256_add_epi32(o[r], _mm256_madd_epi16(_mm256_set1_epi32(w[r].sp[k]), bs));
        }
        for (int r = 0; r < R; ++r) I[r] = _mm256_sub_epi32(I[r], _mm256_slli_epi32(o[r], 5));
    }
};

#if kLANES_ZMM
// R rows of W (from n) times rows 16g..16g+15 of x (lanes; rows past T are zeros, not stored). Per
// scale group (Q4_K/Q5_K a chunk of 32 elements, Q6_K 16) vpdpbusd adds the 4 products of a row of W's
// broadcast codes and each row of x's 4 bytes into its lane, then one vpmulld applies the scale
// (|sum| <= 32 * 63 * 127 < 2^18).
template <class L, int R>
void k8_lane_tile(const Q8Problem& p, i64 n, i64 g) {
    const i64 nb = p.K / kQBlock, t0 = g * kLanes;
    const i64 valid = p.T - t0 < kLanes ? p.T - t0 : kLanes;
    const __mmask16 vm = __mmask16((1u << valid) - 1);
    const uint8_t* row0 = p.w + n * p.row_bytes;  // the tile's bytes start here (row_at)
    const uint8_t* rows[R];
    for (int r = 0; r < R; ++r) rows[r] = row_at<L::kBytes>(p, n + r);
    const i64 bstep = block_step<L::kBytes>(p);
    const int8_t* xt = p.xt + g * nb * 256 * kLanes;
    __m512 acc[R][8];  // a_0..7 of rows 16g..16g+15 of x
    for (int r = 0; r < R; ++r)
        for (int i = 0; i < 8; ++i) acc[r][i] = _mm512_setzero_ps();
    NextTilePrefetch<1> pf(row0, R * p.row_bytes, p.w + p.N * p.row_bytes, nb);
    constexpr int kG = L::kGroups;
    for (i64 b = 0; b < nb; ++b) {
        pf.step();
        const int j = int(b & 7);
        typename L::Row w[R];
        for (int r = 0; r < R; ++r) L::decode(rows[r] + b * bstep, w[r]);
        const int8_t* xb = xt + b * 256 * kLanes;
        __m512i I[R];
        for (int r = 0; r < R; ++r) I[r] = _mm512_setzero_si512();
        for (int s = 0; s < 64 / kG; ++s) {
            __m512i S[R];
            for (int r = 0; r < R; ++r) S[r] = _mm512_setzero_si512();
            for (int o = s * kG; o < s * kG + kG; ++o) {
                const __m512i x = _mm512_loadu_si512(xb + o * 64);
                for (int r = 0; r < R; ++r)
                    S[r] = _mm512_dpbusd_epi32(S[r], _mm512_set1_epi32(int(load_u32(w[r].q + 4 * o))), x);
            }
            for (int r = 0; r < R; ++r) I[r] = _mm512_add_epi32(I[r], _mm512_mullo_epi32(S[r], _mm512_set1_epi32(w[r].sc[s])));
        }
        const __m512 sx = _mm512_maskz_loadu_ps(vm, p.xs + b * p.T + t0);
        if constexpr (L::kMins) {  // M_b = sum_q (m_2q, m_2q+1) . (cs_2q, cs_2q+1)
            const int16_t* ctb = p.ct + (g * nb + b) * 8 * kLanes;
            __m512i M[R];
            for (int r = 0; r < R; ++r) M[r] = _mm512_setzero_si512();
            for (int q = 0; q < 4; ++q) {
                const __m512i cs = _mm512_loadu_si512(ctb + q * 2 * kLanes);
                for (int r = 0; r < R; ++r) M[r] = _mm512_dpwssd_epi32(M[r], _mm512_set1_epi32(w[r].mn[q]), cs);
            }
            for (int r = 0; r < R; ++r) {
                acc[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(I[r]), _mm512_mul_ps(_mm512_set1_ps(w[r].d), sx), acc[r][j]);
                acc[r][j] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(M[r]), _mm512_mul_ps(_mm512_set1_ps(w[r].dmin), sx), acc[r][j]);
            }
        } else {  // I_b -= 32 sum_k (sc_2k, sc_2k+1) . (bs_2k, bs_2k+1)
            const int16_t* btb = p.bt + (g * nb + b) * 16 * kLanes;
            __m512i O[R];
            for (int r = 0; r < R; ++r) O[r] = _mm512_setzero_si512();
            for (int k = 0; k < 8; ++k) {
                const __m512i bs = _mm512_loadu_si512(btb + k * 2 * kLanes);
                for (int r = 0; r < R; ++r) O[r] = _mm512_dpwssd_epi32(O[r], _mm512_set1_epi32(w[r].sp[k]), bs);
            }
            for (int r = 0; r < R; ++r) {
                I[r] = _mm512_sub_epi32(I[r], _mm512_slli_epi32(O[r], 5));
                acc[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(I[r]), _mm512_mul_ps(_mm512_set1_ps(w[r].d), sx), acc[r][j]);
            }
        }
    }
    for (int r = 0; r < R; ++r) {
        const __m512* a = acc[r];
        alignas(64) float v[16];
        _mm512_store_ps(v, _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[4]), _mm512_add_ps(a[2], a[6])),
                                         _mm512_add_ps(_mm512_add_ps(a[1], a[5]), _mm512_add_ps(a[3], a[7]))));
        for (i64 t = 0; t < valid; ++t) p.out[(t0 + t) * p.N + n + r] = v[t];
    }
}
#else
// R rows of W (from n) times rows 8g..8g+7 of x (lanes).
template <class L, int R>
void k8_lane_tile(const Q8Problem& p, i64 n, i64 g) {
    const i64 nb = p.K / kQBlock;
    const uint8_t* row0 = p.w + n * p.row_bytes;  // the tile's bytes start here (row_at)
    const uint8_t* rows[R];
    for (int r = 0; r < R; ++r) rows[r] = row_at<L::kBytes>(p, n + r);
    const i64 bstep = block_step<L::kBytes>(p);
    const int8_t* xt = p.xt + g * nb * 2048;
    __m256 acc[R][8];  // a_0..7 of rows 8g..8g+7 of x
    for (int r = 0; r < R; ++r)
        for (int i = 0; i < 8; ++i) acc[r][i] = _mm256_setzero_ps();
    NextTilePrefetch<1> pf(row0, R * p.row_bytes, p.w + p.N * p.row_bytes, nb);
    for (i64 b = 0; b < nb; ++b) {
        pf.step();
        const int j = int(b & 7);
        typename L::Row w[R];
        for (int r = 0; r < R; ++r) L::decode(rows[r] + b * bstep, w[r]);
        __m256i I[R];
        for (int r = 0; r < R; ++r) I[r] = _mm256_setzero_si256();
        L::template dot<R>(w, xt + b * 2048, I);
        const __m256 sx = _mm256_loadu_ps(p.xs + b * p.T + 8 * g);
        if constexpr (L::kMins) {
            __m256i M[R];
            for (int r = 0; r < R; ++r) M[r] = _mm256_setzero_si256();
            L::template mins<R>(w, p.ct + (g * nb + b) * 64, M);
            for (int r = 0; r < R; ++r) {
                acc[r][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(I[r]), _mm256_mul_ps(_mm256_set1_ps(w[r].d), sx), acc[r][j]);
                acc[r][j] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(M[r]), _mm256_mul_ps(_mm256_set1_ps(w[r].dmin), sx), acc[r][j]);
            }
        } else {
            L::template offsets<R>(w, p.bt + (g * nb + b) * 128, I);
            for (int r = 0; r < R; ++r)
                acc[r][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(I[r]), _mm256_mul_ps(_mm256_set1_ps(w[r].d), sx), acc[r][j]);
        }
    }
    for (int r = 0; r < R; ++r) {
        const __m256* a = acc[r];
        alignas(32) float v[8];
        _mm256_store_ps(v, _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a[0], a[4]), _mm256_add_ps(a[2], a[6])),
                                         _mm256_add_ps(_mm256_add_ps(a[1], a[5]), _mm256_add_ps(a[3], a[7]))));
        for (int t = 0; t < 8; ++t) p.out[(8 * g + t) * p.N + n + r] = v[t];
    }
}
#endif

template <class F> struct LanesOf;
template <bool kQ5> struct LanesOf<Q8Q45_K<kQ5>> { using type = Q45KLanes<kQ5>; };
template <> struct LanesOf<Q8Q6_K> { using type = Q6KLanes; };

constexpr int kK8LaneRows = 2;  // rows of W per lanes tile (Q4_K: 0.96-1.10x over 4, T = 16..32, AVX2 machine)
#endif

// Rows [g0 * kRows, g1 * kRows) clipped to N. T <= 3: one pass of row tiles. Larger T: rows of x in
// blocks of at most kQ8XBlockBytes of x8, each against all the rows: kLanes rows of x at a time in
// lanes (AVX2 / AVX-512 VNNI), the rest of the block in row tiles of 8, 4, 2 and 1 rows of x.
template <class F>
void k8_run_groups(const Q8Problem& p, i64 g0, i64 g1) {
    const i64 n_end = g1 * kRows < p.N ? g1 * kRows : p.N, n = g0 * kRows;
    switch (p.T) {
        case 1: return k8_row_range<F, kQ8RowsT1, 1>(p, n, n_end, 0);
        case 2: return k8_row_range<F, kQ8RowsSmallT, 2>(p, n, n_end, 0);
        case 3: return k8_row_range<F, kQ8RowsSmallT, 3>(p, n, n_end, 0);
        default: break;
    }
    const i64 fit = kQ8XBlockBytes / (p.K + kQ8RowPad) / kTileRows * kTileRows;  // whole lanes tiles
    const i64 block = fit > kTileRows ? fit : kTileRows;
    for (i64 tb = 0; tb < p.T; tb += block) {
        const i64 te = tb + block < p.T ? tb + block : p.T;
        i64 t1 = tb;  // rows of x from t1 on take row tiles
#if defined(__AVX2__)
        using L = typename LanesOf<F>::type;
        t1 = tb + q8_lane_rows(te - tb);  // (tb is a multiple of kLanes; past te when the last tile is padded)
        for (i64 m = n; m < n_end; m += kK8LaneRows) {
            if (m + kK8LaneRows <= n_end)
                for (i64 t0 = tb; t0 < t1; t0 += kLanes) k8_lane_tile<L, kK8LaneRows>(p, m, t0 / kLanes);
            else
                for (i64 r = m; r < n_end; ++r)
                    for (i64 t0 = tb; t0 < t1; t0 += kLanes) k8_lane_tile<L, 1>(p, r, t0 / kLanes);
        }
#endif
        for (i64 m = n; m < n_end && t1 < te; m += kQ8Rows) {
            const i64 m_end = m + kQ8Rows < n_end ? m + kQ8Rows : n_end;
            i64 t0 = t1;
            for (; t0 + 8 <= te; t0 += 8) k8_row_range<F, 1, 8>(p, m, m_end, t0);
            if (t0 + 4 <= te) k8_row_range<F, 1, 4>(p, m, m_end, t0), t0 += 4;
            if (t0 + 2 <= te) k8_row_range<F, 1, 2>(p, m, m_end, t0), t0 += 2;
            if (t0 < te) k8_row_range<F, 1, 1>(p, m, m_end, t0);
        }
    }
}

template <class F>
void q8_run_groups(const Q8Problem& p, i64 g0, i64 g1) { k8_run_groups<F>(p, g0, g1); }

}  // namespace
