// gemv.cu -- fused dequant-GEMV straight from GGUF block bytes: y = x W^T.
//
//   W: (N, K) ggml layout, row n = output feature n, K/QK blocks of BYTES bytes, rows contiguous.
//   x: (T, K) fp16 or bf16, T = 1..8 (template), row stride x_stride elements (multiple of 8,
//      base 16-byte aligned).
//   y: (T, N) fp32, row stride y_stride elements. Accumulation is fp32.
//
// Launch: grid (ceil(N / GK_GEMV_ROWS)), block (32, nwarps) with 1 <= nwarps <= GK_GEMV_MAX_WARPS.
// The block's 32*nwarps threads share the K loop of GK_GEMV_ROWS rows: thread i takes chunks
// i, i + 32*nwarps, ... (consecutive lanes read consecutive chunks, so a warp's weight loads are
// contiguous). Partial sums are reduced with xor-shuffles inside each warp, then across warps
// through a small shared array (written once per warp, after the hot loop: no shared memory traffic
// in the hot loop, hence no bank conflicts there).
//
// Entry points: gemv_<fmt>_<xtype>_t<T>, e.g. gemv_q4_k_bf16_t3.
// Injected bugs (shim self-test only): GK_BUG_NO_SYNC drops the barrier before the cross-warp
// reduction; GK_BUG_TAIL makes the row tail check off by one; GK_BUG_SHFL_LANE (common.cuh).
#include "quant_formats.cuh"

#define GK_GEMV_ROWS 2
#define GK_GEMV_MAX_WARPS 4

#if defined(GK_BUG_TAIL)
#define GK_ROW_OK(row, n) ((row) <= (n))
#else
#define GK_ROW_OK(row, n) ((row) < (n))
#endif

namespace gk {

template <class F, class XT, int T>
__device__ __forceinline__ void gemv_body(const u8* __restrict__ w, const XT* __restrict__ x, float* __restrict__ y,
                                          int n, int k, int x_stride, int y_stride) {
    constexpr int R = GK_GEMV_ROWS;
    const int lane = threadIdx.x, warp = threadIdx.y;
    const int tid = warp * 32 + lane, nthreads = 32 * blockDim.y;
    const int row0 = blockIdx.x * R;
    const int nblocks = k / F::QK;
    const i64 row_bytes = static_cast<i64>(nblocks) * F::BYTES;
    const int nchunks = nblocks * F::SUBS;

    float acc[R][T];
    GK_UNROLL
    for (int r = 0; r < R; ++r)
        GK_UNROLL
        for (int t = 0; t < T; ++t) acc[r][t] = 0.0f;

    for (int c = tid; c < nchunks; c += nthreads) {
        const int b = c / F::SUBS, sub = c % F::SUBS;
        const XT* xb = x + static_cast<i64>(b) * F::QK;
        // Rows past the end re-read the last valid row (always in bounds) and are never stored.
        typename F::Raw raw[R];
        GK_UNROLL
        for (int r = 0; r < R; ++r) {
            const int row = GK_ROW_OK(row0 + r, n) ? row0 + r : n - 1;
            raw[r] = F::fetch(w + row * row_bytes + static_cast<i64>(b) * F::BYTES, sub);
        }
        GK_UNROLL
        for (int g = 0; g < F::GROUPS; ++g) {
            float q[R][8], scale[R], bias[R];
            GK_UNROLL
            for (int r = 0; r < R; ++r) F::decode(raw[r], g, q[r], scale[r], bias[r]);
            const int col = F::col(sub, g);
            GK_UNROLL
            for (int t = 0; t < T; ++t) {
                float xf[8];
                load8(xb + static_cast<i64>(t) * x_stride + col, xf);  // one load feeds all R rows
                float sx = 0.0f;
                if (F::BIAS) {
                    GK_UNROLL
                    for (int j = 0; j < 8; ++j) sx += xf[j];
                }
                GK_UNROLL
                for (int r = 0; r < R; ++r) {
                    float dot = 0.0f;
                    GK_UNROLL
                    for (int j = 0; j < 8; ++j) dot = fmaf(q[r][j], xf[j], dot);
                    acc[r][t] = fmaf(scale[r], dot, acc[r][t]);
                    if (F::BIAS) acc[r][t] = fmaf(bias[r], sx, acc[r][t]);
                }
            }
        }
    }

    __shared__ float partial[GK_GEMV_MAX_WARPS][R * T];  // (warps, R*T)
    GK_UNROLL
    for (int r = 0; r < R; ++r)
        GK_UNROLL
        for (int t = 0; t < T; ++t) {
            const float v = warp_sum(acc[r][t]);
            if (lane == 0) partial[warp][r * T + t] = v;
        }
#if !defined(GK_BUG_NO_SYNC)
    __syncthreads();
#endif
    if (tid < R * T) {
        const int r = tid / T, t = tid % T;
        float s = 0.0f;
        for (int wi = 0; wi < static_cast<int>(blockDim.y); ++wi) s += partial[wi][tid];
        const int row = row0 + r;
        if (GK_ROW_OK(row, n)) y[static_cast<i64>(t) * y_stride + row] = s;
    }
}

}  // namespace gk

// Launch bounds: at most 4 warps, and "1 block per SM" so ptxas sizes registers to the kernel's
// need instead of to an occupancy target: its occupancy heuristic spills a few bytes for some
// (format, T, arch) combinations. The compile gate checks 0 spills and the register budgets.
#define GK_GEMV_BOUNDS __launch_bounds__(32 * GK_GEMV_MAX_WARPS, 1)

#define GK_GEMV_ENTRY(fname, Fmt, xname, XT, T)                                                          \
    extern "C" __global__ void GK_GEMV_BOUNDS                                                              \
        gemv_##fname##_##xname##_t##T(const gk::u8* __restrict__ w, const void* __restrict__ x,         \
                                      float* __restrict__ y, int n, int k, int x_stride, int y_stride) { \
        gk::gemv_body<gk::Fmt, XT, T>(w, static_cast<const XT*>(x), y, n, k, x_stride, y_stride);      \
    }
#define GK_GEMV_T(fname, Fmt, xname, XT)        \
    GK_GEMV_ENTRY(fname, Fmt, xname, XT, 1)     \
    GK_GEMV_ENTRY(fname, Fmt, xname, XT, 2)     \
    GK_GEMV_ENTRY(fname, Fmt, xname, XT, 3)     \
    GK_GEMV_ENTRY(fname, Fmt, xname, XT, 4)     \
    GK_GEMV_ENTRY(fname, Fmt, xname, XT, 5)     \
    GK_GEMV_ENTRY(fname, Fmt, xname, XT, 6)     \
    GK_GEMV_ENTRY(fname, Fmt, xname, XT, 7)     \
    GK_GEMV_ENTRY(fname, Fmt, xname, XT, 8)
#define GK_GEMV_FORMAT(fname, Fmt) GK_HALF_TYPES(GK_GEMV_T, fname, Fmt)

GK_FORMATS(GK_GEMV_FORMAT)

#if !defined(__CUDACC__) && !defined(__CUDACC_RTC__)
CUDA_CPU_LAUNCHER(cuda_cpu_launch_gemv,
                  (const gk::u8* w, const void* x, float* y, int n, int k, int x_stride, int y_stride),
                  (w, x, y, n, k, x_stride, y_stride))
#endif
