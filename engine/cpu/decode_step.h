// One transformer block for a pass of single decode tokens (included by qlinear.cpp; C ABI at the end).
//
// The Llama block of engine/models/llama.py (its definition and reference) for R rows of one token
// each, every row with its own KV slot, in one native call: RMSNorm, fused q/k/v, optional biases and
// per-head q/k RMSNorm, rope (adjacent pairs or NeoX halves), the new key/value written into the slot,
// grouped-query attention over the slot, output projection + residual, RMSNorm, fused gate/up,
// SiLU(gate) * up, down projection + residual. The matrix products are ql_linear_many calls, so they
// are bit-identical to the Python block's given the same inputs; the small ops are plain fp32 loops
// (their own summation order and exp), so the block as a whole equals the Python one within rounding
// (tests/test_cpu_decode_step.py states the tolerance). Every row is computed the same way whatever R.
namespace {

// A layer's constant data (weights, norms, shapes): built once per bound layer on the Python side.
struct DecodeLayer {
    i64 dim, n_heads, n_kv_heads, head_dim, ffn, rope_dim, n_ctx;
    int32_t neox, kv_f16;  // rope style; KV slot element type (0 fp32, 1 fp16)
    float eps;
    int32_t mode;            // ql_linear_many mode of the block's matrix products (0 or 2)
    const float* attn_norm;  // (dim,)
    const float* ffn_norm;   // (dim,)
    const float* bias[3];    // q, k, v biases or nullptr
    const float* qk_norm[2]; // per-head q, k RMSNorm weights (head_dim,) or nullptr
    const uint8_t* w[7];     // q, k, v, output, gate, up, down (raw GGUF bytes)
    int32_t type[7];
    int32_t pad2_;
};

// exp for 16 lanes at once: Cephes' expf polynomial after rounding x / ln 2 to an integer n
// (error ~1 ulp); inputs are clamped to [-87.3, 88.7] (exp(-87.3) ~ 1e-38 stands for 0).
typedef float FV __attribute__((vector_size(64)));
typedef int32_t IV __attribute__((vector_size(64)));
inline void exp16(float* p16) {  // in place on 16 floats (no vector-typed arguments: the portable ABI)
    FV x;
    std::memcpy(&x, p16, sizeof x);
    x = x < -87.3f ? FV{} - 87.3f : x;
    x = x > 88.7f ? FV{} + 88.7f : x;
    const FV shifter = FV{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
    const FV n = (x * 1.44269504088896341f + shifter) - shifter;
    FV r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    FV p = FV{} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    const IV bits = (__builtin_convertvector(n, IV) + 127) << 23;
    FV scale;
    std::memcpy(&scale, &bits, sizeof scale);
    x = p * scale;
    std::memcpy(p16, &x, sizeof x);
}

// x[i] = exp(x[i]) for i < n.
void exp_inplace(float* x, i64 n) {
    i64 i = 0;
    for (; i + 16 <= n; i += 16) exp16(x + i);
    if (i < n) {
        float t[16] = {};
        std::memcpy(t, x + i, size_t(n - i) * sizeof(float));
        exp16(t);
        std::memcpy(x + i, t, size_t(n - i) * sizeof(float));
    }
}

// Sum of a[i] * b[i], 16 lanes then vsum's tree.
inline float dot(const float* a, const float* b, i64 n) {
    V acc = vzero();
    i64 i = 0;
    for (; i + 16 <= n; i += 16) acc = vfma(vload(a + i), vload(b + i), acc);
    if (i < n) acc = vfma(vload_n(a + i, int(n - i)), vload_n(b + i, int(n - i)), acc);
    return vsum(acc);
}

// out = x / sqrt(mean(x^2) + eps) * w over n elements (out may be x).
void rms_norm(const float* x, const float* w, i64 n, float eps, float* out) {
    const float inv = 1.0f / __builtin_sqrtf(dot(x, x, n) / float(n) + eps);
    for (i64 i = 0; i < n; ++i) out[i] = x[i] * inv * w[i];
}

// Rotate the rope_dim first elements of each of `heads` vectors of head_dim by rot (rope_dim / 2
// (cos, sin) pairs): pair i = (x[2i], x[2i+1]) or, NeoX, (x[i], x[i + rope_dim / 2]).
void rope(float* x, i64 heads, i64 head_dim, i64 rope_dim, bool neox, const float* rot) {
    const i64 half = rope_dim / 2;
    for (i64 h = 0; h < heads; ++h) {
        float* v = x + h * head_dim;
        for (i64 i = 0; i < half; ++i) {
            float* a = neox ? v + i : v + 2 * i;
            float* b = neox ? v + i + half : v + 2 * i + 1;
            const float c = rot[2 * i], s = rot[2 * i + 1], x0 = *a, x1 = *b;
            *a = x0 * c - x1 * s;
            *b = x0 * s + x1 * c;
        }
    }
}

// One KV slot row (head g, position t) as fp32: the slot itself (fp32) or `tmp` (fp16 widened).
inline const float* kv_row(const void* slot, bool f16, i64 n_ctx, i64 hd, i64 g, i64 t, float* tmp) {
    const i64 off = (g * n_ctx + t) * hd;
    if (!f16) return static_cast<const float*>(slot) + off;
    const uint16_t* p = static_cast<const uint16_t*>(slot) + off;
    for (i64 i = 0; i < hd; ++i) tmp[i] = half_to_float(p[i]);
    return tmp;
}

inline void kv_store(void* slot, bool f16, i64 n_ctx, i64 hd, i64 g, i64 t, const float* src) {
    const i64 off = (g * n_ctx + t) * hd;
    if (!f16) {
        std::memcpy(static_cast<float*>(slot) + off, src, size_t(hd) * sizeof(float));
        return;
    }
    uint16_t* p = static_cast<uint16_t*>(slot) + off;
    for (i64 i = 0; i < hd; ++i) {  // round to nearest even, as torch's fp32 -> fp16 copy
        const _Float16 f = _Float16(src[i]);
        std::memcpy(p + i, &f, 2);
    }
}

struct AttnJob {
    const DecodeLayer* L;
    const float* q;            // (R, H * hd)
    float* out;                // (R, H * hd)
    void* const* keys;         // per row: (Hkv, n_ctx, hd)
    void* const* vals;
    const i64* starts;         // per row: tokens cached before this one
};

// Items = (row, query head): that head over keys 0..start (the new one included). Every head is
// computed the same way whichever thread takes it (heads of one KV group read the same cached rows).
void attn_items(const void* ctx, i64 i0, i64 i1) {
    const AttnJob& j = *static_cast<const AttnJob*>(ctx);
    const DecodeLayer& L = *j.L;
    const i64 hd = L.head_dim, g = L.n_heads / L.n_kv_heads, qd = L.n_heads * hd;
    const float scale = 1.0f / __builtin_sqrtf(float(hd));
    const bool f16 = L.kv_f16;
    thread_local Scratch buf;
    for (i64 item = i0; item < i1; ++item) {
        const i64 r = item / L.n_heads, h = item % L.n_heads, kh = h / g, n = j.starts[r] + 1;
        float* s = buf.get(n + 2 * hd);  // scores, then two fp16 widening rows
        float* tmp = s + n;
        const float* q = j.q + r * qd + h * hd;
        for (i64 t = 0; t < n; ++t) s[t] = dot(q, kv_row(j.keys[r], f16, L.n_ctx, hd, kh, t, tmp), hd) * scale;
        float m = s[0];  // softmax: exp(s - max) / sum
        for (i64 t = 1; t < n; ++t) m = s[t] > m ? s[t] : m;
        for (i64 t = 0; t < n; ++t) s[t] -= m;
        exp_inplace(s, n);
        float sum = 0.0f;
        for (i64 t = 0; t < n; ++t) sum += s[t];
        const float inv = 1.0f / sum;
        for (i64 t = 0; t < n; ++t) s[t] *= inv;
        float* o = j.out + r * qd + h * hd;
        std::memset(o, 0, size_t(hd) * sizeof(float));
        for (i64 t = 0; t < n; ++t) {
            const float* v = kv_row(j.vals[r], f16, L.n_ctx, hd, kh, t, tmp + hd);
            const float p = s[t];
            for (i64 i = 0; i < hd; ++i) o[i] += p * v[i];
        }
    }
}

Scratch& decode_scratch() {  // the step's activations, per calling thread
    thread_local Scratch buf;
    return buf;
}

int decode_block(Pool* pool, const DecodeLayer& L, i64 R, const float* x, float* out, const float* rot,
                 void* const* keys, void* const* vals, const i64* starts) {
    const i64 D = L.dim, H = L.n_heads, Hkv = L.n_kv_heads, hd = L.head_dim, F = L.ffn;
    const i64 qd = H * hd, kvd = Hkv * hd;
    if (R < 1 || D < 1 || H < 1 || Hkv < 1 || H % Hkv || hd < 1 || F < 1 || L.rope_dim > hd || L.rope_dim % 2)
        return 2;
    for (i64 r = 0; r < R; ++r)
        if (starts[r] < 0 || starts[r] >= L.n_ctx) return 2;
    Scratch& buf = decode_scratch();
    // h (R, max(D, F)) | q (R, qd) | k, v (R, kvd) | att (R, qd) | gate, up (R, F) | y (R, D)
    const i64 hw = D > F ? D : F;
    float* h = buf.try_get(R * (hw + 2 * qd + 2 * kvd + 2 * F + D));
    if (!h) return 3;
    float *q = h + R * hw, *k = q + R * qd, *v = k + R * kvd, *att = v + R * kvd, *gate = att + R * qd,
          *up = gate + R * F, *y = up + R * F;
    int rc;
    // attention half
    for (i64 r = 0; r < R; ++r) rms_norm(x + r * D, L.attn_norm, D, L.eps, h + r * D);
    {
        float* outs[3] = {q, k, v};
        const i64 ns[3] = {qd, kvd, kvd};
        if ((rc = ql_linear_many(pool, 3, L.type, L.mode, h, L.w, outs, R, ns, D))) return rc;
    }
    for (int p = 0; p < 3; ++p)
        if (L.bias[p]) {
            const i64 n = p ? kvd : qd;
            float* dst = p == 0 ? q : p == 1 ? k : v;
            for (i64 r = 0; r < R; ++r)
                for (i64 i = 0; i < n; ++i) dst[r * n + i] += L.bias[p][i];
        }
    for (i64 r = 0; r < R; ++r) {
        if (L.qk_norm[0]) {
            for (i64 e = 0; e < H; ++e) rms_norm(q + r * qd + e * hd, L.qk_norm[0], hd, L.eps, q + r * qd + e * hd);
            for (i64 e = 0; e < Hkv; ++e) rms_norm(k + r * kvd + e * hd, L.qk_norm[1], hd, L.eps, k + r * kvd + e * hd);
        }
        const float* rr = rot + r * L.rope_dim;  // rope_dim / 2 (cos, sin) pairs
        rope(q + r * qd, H, hd, L.rope_dim, L.neox, rr);
        rope(k + r * kvd, Hkv, hd, L.rope_dim, L.neox, rr);
        for (i64 e = 0; e < Hkv; ++e) {
            kv_store(keys[r], L.kv_f16, L.n_ctx, hd, e, starts[r], k + r * kvd + e * hd);
            kv_store(vals[r], L.kv_f16, L.n_ctx, hd, e, starts[r], v + r * kvd + e * hd);
        }
    }
    {
        const AttnJob job{&L, q, att, keys, vals, starts};
        i64 work = 0;
        for (i64 r = 0; r < R; ++r) work += (starts[r] + 1) * qd;
        // Spread over the pool only when there is enough of it to pay for handing it out.
        if (work >= (i64(1) << 14)) pool->run(attn_items, &job, R * H, 1);
        else attn_items(&job, 0, R * H);
        // (allocation failures in the workers are counted in g_alloc_failures: ql_decode_block reports them)
    }
    {
        const int t = L.type[3];
        const uint8_t* w = L.w[3];
        if ((rc = ql_linear_many(pool, 1, &t, L.mode, att, &w, &y, R, &D, qd))) return rc;
    }
    for (i64 i = 0; i < R * D; ++i) out[i] = x[i] + y[i];
    // feed-forward half
    for (i64 r = 0; r < R; ++r) rms_norm(out + r * D, L.ffn_norm, D, L.eps, h + r * D);
    {
        float* outs[2] = {gate, up};
        const i64 ns[2] = {F, F};
        if ((rc = ql_linear_many(pool, 2, L.type + 4, L.mode, h, L.w + 4, outs, R, ns, D))) return rc;
    }
    for (i64 i = 0; i < R * F; ++i) h[i] = -gate[i];
    exp_inplace(h, R * F);  // exp(-gate)
    for (i64 i = 0; i < R * F; ++i) gate[i] = gate[i] / (1.0f + h[i]) * up[i];  // SiLU(gate) * up
    {
        const int t = L.type[6];
        const uint8_t* w = L.w[6];
        if ((rc = ql_linear_many(pool, 1, &t, L.mode, gate, &w, &y, R, &D, F))) return rc;
    }
    for (i64 i = 0; i < R * D; ++i) out[i] += y[i];
    return 0;
}

}  // namespace
