// dequant.cu -- GGUF block bytes -> fp16 or bf16 matrix, for prefill / large batches (then a dense
// matmul). Values are computed exactly as ggml does in fp32 (scale*q [+ bias], no FMA contraction)
// and rounded to nearest-even once, so the output equals fp16/bf16(gguf dequantize) bit for bit.
//
//   W:   (N, K) ggml layout, rows contiguous.
//   out: (N, K) row stride out_stride elements (multiple of 8, base 16-byte aligned).
// Launch: 1-D grid-stride loop over N * (K/QK) * SUBS chunks, any grid, block (GK_DEQUANT_THREADS).
// Each chunk writes its groups of 8 with one 16-byte store.
//
// Entry points: dequant_<fmt>_<otype>, e.g. dequant_q6_k_f16.
// Injected bug (shim self-test only): GK_BUG_TAIL runs one chunk past the end.
#include "quant_formats.cuh"

#define GK_DEQUANT_THREADS 256

namespace gk {

template <class F, class OT>
__device__ __forceinline__ void dequant_body(const u8* __restrict__ w, OT* __restrict__ out, int n, int k,
                                             int out_stride) {
    const i64 per_row = static_cast<i64>(k / F::QK) * F::SUBS;
    const i64 row_bytes = static_cast<i64>(k / F::QK) * F::BYTES;
#if defined(GK_BUG_TAIL)
    const i64 total = per_row * n + 1;
#else
    const i64 total = per_row * n;
#endif
    const i64 stride = static_cast<i64>(gridDim.x) * blockDim.x;
    for (i64 c = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; c < total; c += stride) {
        const i64 row = c / per_row;
        const int rem = static_cast<int>(c - row * per_row);
        const int b = rem / F::SUBS, sub = rem % F::SUBS;
        const typename F::Raw raw = F::fetch(w + row * row_bytes + static_cast<i64>(b) * F::BYTES, sub);
        OT* o = out + row * out_stride + static_cast<i64>(b) * F::QK;
        GK_UNROLL
        for (int g = 0; g < F::GROUPS; ++g) {
            float q[8], scale, bias, v[8];
            F::decode(raw, g, q, scale, bias);
            GK_UNROLL
            for (int j = 0; j < 8; ++j) v[j] = F::BIAS ? __fadd_rn(__fmul_rn(scale, q[j]), bias) : __fmul_rn(scale, q[j]);
            store8(o + F::col(sub, g), v);
        }
    }
}

}  // namespace gk

#define GK_DEQUANT_ENTRY(fname, Fmt, oname, OT)                                                           \
    extern "C" __global__ void __launch_bounds__(GK_DEQUANT_THREADS)                                      \
        dequant_##fname##_##oname(const gk::u8* __restrict__ w, void* __restrict__ out, int n, int k,     \
                                  int out_stride) {                                                       \
        gk::dequant_body<gk::Fmt, OT>(w, static_cast<OT*>(out), n, k, out_stride);                       \
    }
#define GK_DEQUANT_FORMAT(fname, Fmt) GK_HALF_TYPES(GK_DEQUANT_ENTRY, fname, Fmt)

GK_FORMATS(GK_DEQUANT_FORMAT)

#if !defined(__CUDACC__) && !defined(__CUDACC_RTC__)
CUDA_CPU_LAUNCHER(cuda_cpu_launch_dequant, (const gk::u8* w, void* out, int n, int k, int out_stride),
                  (w, out, n, k, out_stride))
#endif
