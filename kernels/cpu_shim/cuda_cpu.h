// cuda_cpu.h -- run the project's CUDA kernels, unchanged, on the CPU (g++ >= 12, C++20).
//
// Execution model
//   * Every CUDA thread of a block is a cooperative fiber (ucontext) on one OS "worker" thread.
//     A fiber runs until it reaches a synchronisation point (__syncthreads, a warp op) or exits,
//     then a deterministic scheduler picks the next ready fiber by policy:
//       Forward  - lowest linear thread id first,
//       Reverse  - highest first,
//       Random   - seeded uniform choice.
//     Code between synchronisation points therefore runs without interleaving; a kernel that is only
//     correct under one order (a missing barrier) gives a different answer under another policy.
//   * __syncthreads is a real barrier over all threads of the block. Exited threads do not count as
//     arrived: a barrier that not every thread reaches is reported as divergence (a deadlock).
//   * Warp ops (__shfl*_sync, __syncwarp, __ballot_sync, __any_sync, __all_sync) are a per-warp
//     exchange: lanes are linear thread ids % 32 (x fastest, then y, then z), every lane named in the
//     mask must arrive at the same op with the same mask; the last lane to arrive computes every
//     lane's result. Reading a lane outside the mask, a caller outside its own mask, mismatched masks
//     or ops are reported as errors instead of returning garbage.
//   * static __shared__ variables are `static thread_local`: one copy per worker, and a worker runs
//     one block at a time, so they are per-block storage. Like on a GPU they are not cleared between
//     blocks (stale values from the previous block stay).
//   * Blocks are distributed over `workers` OS threads (block i -> worker i % workers); atomics are
//     real atomics.
//   * Errors never throw: the first one is recorded, the block is abandoned and the launch returns
//     non-zero; cuda_cpu_last_error() gives the message.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>
#include <ucontext.h>

#if defined(__SANITIZE_ADDRESS__)
extern "C" void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
extern "C" void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old,
                                                size_t* size_old);
#define CUDA_CPU_ASAN 1
#else
#define CUDA_CPU_ASAN 0
#endif

// ---------------------------------------------------------------------------------------------
// Qualifiers
// ---------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static thread_local
// __restrict__ is understood by g++ as is.

constexpr int warpSize = 32;

// ---------------------------------------------------------------------------------------------
// Built-in vector types (CUDA alignments)
// ---------------------------------------------------------------------------------------------
struct uint3 { unsigned int x, y, z; };
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

#define CUDA_CPU_VEC2(name, T, A) struct alignas(A) name { T x, y; };                                 \
    inline name make_##name(T x, T y) { return name{x, y}; }
#define CUDA_CPU_VEC4(name, T, A) struct alignas(A) name { T x, y, z, w; };                           \
    inline name make_##name(T x, T y, T z, T w) { return name{x, y, z, w}; }
CUDA_CPU_VEC2(char2, signed char, 2)
CUDA_CPU_VEC4(char4, signed char, 4)
CUDA_CPU_VEC2(uchar2, unsigned char, 2)
CUDA_CPU_VEC4(uchar4, unsigned char, 4)
CUDA_CPU_VEC2(short2, short, 4)
CUDA_CPU_VEC4(short4, short, 8)
CUDA_CPU_VEC2(ushort2, unsigned short, 4)
CUDA_CPU_VEC4(ushort4, unsigned short, 8)
CUDA_CPU_VEC2(int2, int, 8)
CUDA_CPU_VEC4(int4, int, 16)
CUDA_CPU_VEC2(uint2, unsigned int, 8)
CUDA_CPU_VEC4(uint4, unsigned int, 16)
CUDA_CPU_VEC2(float2, float, 8)
CUDA_CPU_VEC4(float4, float, 16)
#undef CUDA_CPU_VEC2
#undef CUDA_CPU_VEC4
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return uint3{x, y, z}; }

// ---------------------------------------------------------------------------------------------
// Bit casts and float intrinsics
// ---------------------------------------------------------------------------------------------
template <class To, class From>
inline To cuda_cpu_bit_cast(const From& f) {
    static_assert(sizeof(To) == sizeof(From));
    To t;
    std::memcpy(&t, &f, sizeof(To));
    return t;
}
inline float __int_as_float(int v) { return cuda_cpu_bit_cast<float>(v); }
inline float __uint_as_float(unsigned v) { return cuda_cpu_bit_cast<float>(v); }
inline int __float_as_int(float v) { return cuda_cpu_bit_cast<int>(v); }
inline unsigned __float_as_uint(float v) { return cuda_cpu_bit_cast<unsigned>(v); }
// Built with -ffp-contract=off: these are single IEEE roundings like their device counterparts.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
// Byte n of the result is byte (s >> 4n) & 7 of the 8 bytes {y:x} (x = bytes 0..3); s bits 16+ unused.
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
    const unsigned long long v = (static_cast<unsigned long long>(y) << 32) | x;
    unsigned r = 0;
    for (int n = 0; n < 4; ++n) r |= static_cast<unsigned>((v >> (8 * ((s >> (4 * n)) & 7u))) & 0xffu) << (8 * n);
    return r;
}
template <class T>
inline T __ldg(const T* p) { return *p; }
using std::max;
using std::min;

// ---------------------------------------------------------------------------------------------
// __half / __nv_bfloat16 (storage types; arithmetic goes through float like the kernels do)
// ---------------------------------------------------------------------------------------------
struct alignas(2) __half {
    unsigned short __x;
};
struct alignas(4) __half2 {
    __half x, y;
};
struct alignas(2) __nv_bfloat16 {
    unsigned short __x;
};
struct alignas(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
using half = __half;
using half2 = __half2;

inline __half __ushort_as_half(unsigned short v) { return __half{v}; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline float __half2float(__half h) { return static_cast<float>(cuda_cpu_bit_cast<_Float16>(h.__x)); }
// _Float16 conversion is IEEE round-to-nearest-even, like __float2half_rn.
inline __half __float2half_rn(float f) { return __half{cuda_cpu_bit_cast<unsigned short>(static_cast<_Float16>(f))}; }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float2 __half22float2(__half2 h) { return float2{__half2float(h.x), __half2float(h.y)}; }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half_rn(a), __float2half_rn(b)}; }
inline __half2 __float22half2_rn(float2 f) { return __floats2half2_rn(f.x, f.y); }
inline __half2 __halves2half2(__half a, __half b) { return __half2{a, b}; }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }

inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short v) { return __nv_bfloat16{v}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float(static_cast<unsigned>(h.__x) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<unsigned short>((u >> 16) | 0x40u)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return __nv_bfloat16{static_cast<unsigned short>(u >> 16)};
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return float2{__bfloat162float(h.x), __bfloat162float(h.y)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
    return __nv_bfloat162{__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}

// ---------------------------------------------------------------------------------------------
// Atomics (real atomics: blocks run on several OS threads)
// ---------------------------------------------------------------------------------------------
template <class T>
inline T atomicAdd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_add(v); }
template <class T>
inline T atomicSub(T* p, T v) { return std::atomic_ref<T>(*p).fetch_sub(v); }
template <class T>
inline T atomicExch(T* p, T v) { return std::atomic_ref<T>(*p).exchange(v); }
template <class T>
inline T atomicCAS(T* p, T expected, T desired) {
    std::atomic_ref<T>(*p).compare_exchange_strong(expected, desired);
    return expected;  // the old value either way
}
template <class T>
inline T atomicMax(T* p, T v) {
    std::atomic_ref<T> a(*p);
    T old = a.load();
    while (old < v && !a.compare_exchange_weak(old, v)) {}
    return old;
}
template <class T>
inline T atomicMin(T* p, T v) {
    std::atomic_ref<T> a(*p);
    T old = a.load();
    while (v < old && !a.compare_exchange_weak(old, v)) {}
    return old;
}
template <class T>
inline T atomicOr(T* p, T v) { return std::atomic_ref<T>(*p).fetch_or(v); }
template <class T>
inline T atomicAnd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_and(v); }
template <class T>
inline T atomicXor(T* p, T v) { return std::atomic_ref<T>(*p).fetch_xor(v); }

// ---------------------------------------------------------------------------------------------
// Fiber scheduler
// ---------------------------------------------------------------------------------------------
namespace cuda_cpu {

enum class Policy : int { Forward = 0, Reverse = 1, Random = 2 };

// Mirrors engine/cuda/cpu_shim.py's ctypes Structure field for field.
struct LaunchConfig {
    unsigned grid[3];
    unsigned block[3];
    int policy;
    unsigned seed;
    int workers;
};

namespace detail {

enum class WarpOp : int { Shfl, Sync, Ballot, Any, All };
inline const char* op_name(WarpOp op) {
    switch (op) {
        case WarpOp::Shfl: return "__shfl*_sync";
        case WarpOp::Sync: return "__syncwarp";
        case WarpOp::Ballot: return "__ballot_sync";
        case WarpOp::Any: return "__any_sync";
        case WarpOp::All: return "__all_sync";
    }
    return "?";
}

enum class State : int { Ready, AtBarrier, AtWarpOp, Done };

struct Fiber {
    ucontext_t ctx;
    std::unique_ptr<char[]> stack;
    uint3 tid;
    unsigned linear = 0;
    State state = State::Ready;
    uint64_t warp_result = 0;
    void* asan_fake = nullptr;
};

struct OpenWarpOp {  // one warp op collecting its lanes
    unsigned mask = 0;
    unsigned arrived = 0;
    WarpOp op = WarpOp::Sync;
    uint64_t value[32] = {};
    int src[32] = {};
};

struct Worker;
inline thread_local Worker* tl_worker = nullptr;

#if CUDA_CPU_ASAN
constexpr size_t kStackBytes = 512 * 1024;
#else
constexpr size_t kStackBytes = 128 * 1024;
#endif

struct Worker {
    ucontext_t sched_ctx;
    std::vector<Fiber> fibers;
    std::vector<std::vector<OpenWarpOp>> warps;
    unsigned barrier_arrived = 0;
    Fiber* cur = nullptr;
    uint3 block_idx{0, 0, 0};
    dim3 block_dim, grid_dim;
    const std::function<void()>* body = nullptr;
    Policy policy = Policy::Forward;
    std::mt19937 rng;
    std::string error;
    const void* sched_stack_bottom = nullptr;
    size_t sched_stack_size = 0;
    void* sched_fake = nullptr;

    // Records the first error and abandons the calling fiber (the scheduler then stops the block).
    [[noreturn]] void fail(const char* fmt, ...) __attribute__((format(printf, 2, 3))) {
        char buf[512];
        va_list ap;
        va_start(ap, fmt);
        std::vsnprintf(buf, sizeof buf, fmt, ap);
        va_end(ap);
        if (error.empty()) {
            char where[96];
            std::snprintf(where, sizeof where, "block (%u,%u,%u) thread %u: ", block_idx.x, block_idx.y,
                          block_idx.z, cur ? cur->linear : 0u);
            error = std::string(where) + buf;
        }
        if (!cur) std::abort();  // only fibers call fail()
        cur->state = State::Done;
        switch_to_scheduler(/*exiting=*/true);
        __builtin_unreachable();  // an abandoned fiber is never resumed
    }

    void switch_to_scheduler(bool exiting) {
        Fiber* f = cur;
#if CUDA_CPU_ASAN
        __sanitizer_start_switch_fiber(exiting ? nullptr : &f->asan_fake, sched_stack_bottom, sched_stack_size);
#else
        (void)exiting;
#endif
        swapcontext(&f->ctx, &sched_ctx);
#if CUDA_CPU_ASAN
        __sanitizer_finish_switch_fiber(f->asan_fake, &sched_stack_bottom, &sched_stack_size);
#endif
    }

    void resume(Fiber& f) {
        cur = &f;
#if CUDA_CPU_ASAN
        __sanitizer_start_switch_fiber(&sched_fake, f.stack.get(), kStackBytes);
#endif
        swapcontext(&sched_ctx, &f.ctx);
#if CUDA_CPU_ASAN
        __sanitizer_finish_switch_fiber(sched_fake, nullptr, nullptr);
#endif
        cur = nullptr;
    }

    static void fiber_entry() {
        Worker* w = tl_worker;
#if CUDA_CPU_ASAN
        __sanitizer_finish_switch_fiber(nullptr, &w->sched_stack_bottom, &w->sched_stack_size);
#endif
        (*w->body)();
        w->cur->state = State::Done;
        w->switch_to_scheduler(/*exiting=*/true);
    }

    void prepare(const dim3& block, Policy pol, unsigned seed) {
        block_dim = block;
        policy = pol;
        rng.seed(seed);
        const unsigned n = block.x * block.y * block.z;
        fibers.resize(n);
        warps.assign((n + 31) / 32, {});
        for (auto& f : fibers)
            if (!f.stack) f.stack.reset(new char[kStackBytes]);
    }

    int pick_ready() {
        const int n = static_cast<int>(fibers.size());
        if (policy == Policy::Random) {
            int count = 0;
            for (auto& f : fibers) count += f.state == State::Ready;
            if (count == 0) return -1;
            int k = static_cast<int>(rng() % static_cast<unsigned>(count));
            for (int i = 0; i < n; ++i)
                if (fibers[i].state == State::Ready && k-- == 0) return i;
            return -1;
        }
        for (int j = 0; j < n; ++j) {
            const int i = policy == Policy::Forward ? j : n - 1 - j;
            if (fibers[i].state == State::Ready) return i;
        }
        return -1;
    }

    // Separate (and not inlined) because getcontext returns twice: keeps the caller's loop state safe.
    __attribute__((noinline)) static void init_fiber(Fiber& f, unsigned linear, uint3 tid) {
        f.linear = linear;
        f.tid = tid;
        f.state = State::Ready;
        f.asan_fake = nullptr;
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack.get();
        f.ctx.uc_stack.ss_size = kStackBytes;
        f.ctx.uc_link = nullptr;
        makecontext(&f.ctx, &Worker::fiber_entry, 0);
    }

    // Runs one block to completion; returns false on error (message in `error`).
    bool run_block(const uint3& bidx) {
        block_idx = bidx;
        barrier_arrived = 0;
        for (auto& ops : warps) ops.clear();
        const unsigned bx = block_dim.x, by = block_dim.y;
        for (unsigned i = 0; i < fibers.size(); ++i)
            init_fiber(fibers[i], i, uint3{i % bx, (i / bx) % by, i / (bx * by)});
        for (;;) {
            if (!error.empty()) return false;
            const int i = pick_ready();
            if (i < 0) break;
            resume(fibers[i]);
        }
        if (!error.empty()) return false;
        unsigned at_bar = 0, at_warp = 0, done = 0;
        for (auto& f : fibers) {
            at_bar += f.state == State::AtBarrier;
            at_warp += f.state == State::AtWarpOp;
            done += f.state == State::Done;
        }
        if (done != fibers.size()) {
            char buf[256];
            std::snprintf(buf, sizeof buf,
                          "block (%u,%u,%u): deadlock: %u threads wait at __syncthreads, %u at warp ops, "
                          "%u exited (barrier divergence or incomplete warp op)",
                          bidx.x, bidx.y, bidx.z, at_bar, at_warp, done);
            error = buf;
            return false;
        }
        return true;
    }

    void block_barrier() {
        cur->state = State::AtBarrier;
        if (++barrier_arrived == fibers.size()) {
            barrier_arrived = 0;
            for (auto& f : fibers) f.state = State::Ready;
            return;  // the last arriver keeps running
        }
        switch_to_scheduler(false);
    }

    // Lane `cur` joins warp op `op` with `mask`, offering `value` and asking for lane `src`'s value.
    uint64_t warp_op(WarpOp op, unsigned mask, uint64_t value, int src) {
        Fiber& f = *cur;
        const unsigned lane = f.linear % 32, wi = f.linear / 32;
        const unsigned nlanes = std::min<unsigned>(32, static_cast<unsigned>(fibers.size()) - wi * 32);
        const unsigned exist = nlanes == 32 ? 0xffffffffu : ((1u << nlanes) - 1u);
        if (!((mask >> lane) & 1u)) fail("%s: calling lane %u is not in mask 0x%08x", op_name(op), lane, mask);
        if (mask & ~exist) fail("%s: mask 0x%08x names lanes that do not exist (warp has %u)", op_name(op), mask, nlanes);
        auto& ops = warps[wi];
        OpenWarpOp* o = nullptr;
        for (auto& cand : ops) {
            if (cand.mask == mask) { o = &cand; break; }
            if (cand.mask & mask)
                fail("%s: mask 0x%08x overlaps a pending warp op with mask 0x%08x", op_name(op), mask, cand.mask);
        }
        if (!o) {
            ops.push_back(OpenWarpOp{});
            o = &ops.back();
            o->mask = mask;
            o->op = op;
        } else if (o->op != op) {
            fail("warp op mismatch: lane %u in %s while other lanes are in %s", lane, op_name(op), op_name(o->op));
        }
        o->value[lane] = value;
        o->src[lane] = src;
        o->arrived |= 1u << lane;
        f.state = State::AtWarpOp;
        if (o->arrived != mask) {
            switch_to_scheduler(false);
            return f.warp_result;
        }
        // Last lane: compute every lane's result, then release the warp.
        unsigned ballot = 0;
        for (unsigned l = 0; l < 32; ++l)
            if (((mask >> l) & 1u) && o->value[l] != 0) ballot |= 1u << l;
        for (unsigned l = 0; l < 32; ++l) {
            if (!((mask >> l) & 1u)) continue;
            Fiber& g = fibers[wi * 32 + l];
            uint64_t r = 0;
            switch (op) {
                case WarpOp::Shfl: {
                    const int s = o->src[l];
                    if (s < 0 || s > 31 || !((mask >> s) & 1u))
                        fail("__shfl*_sync: lane %u reads lane %d, which is not in mask 0x%08x", l, s, mask);
                    r = o->value[s];
                    break;
                }
                case WarpOp::Sync: break;
                case WarpOp::Ballot: r = ballot; break;
                case WarpOp::Any: r = ballot != 0; break;
                case WarpOp::All: r = ballot == mask; break;
            }
            g.warp_result = r;
            g.state = State::Ready;
        }
        const uint64_t mine = f.warp_result;
        ops.erase(ops.begin() + (o - ops.data()));
        return mine;
    }
};

inline Worker& worker() { return *tl_worker; }
inline const uint3& thread_idx() { return tl_worker->cur->tid; }
inline const uint3& block_idx() { return tl_worker->block_idx; }
inline const dim3& block_dim() { return tl_worker->block_dim; }
inline const dim3& grid_dim() { return tl_worker->grid_dim; }

template <class V>
inline uint64_t to_bits(V v) {
    static_assert(std::is_trivially_copyable_v<V> && sizeof(V) <= 8, "warp shuffles move at most 8 bytes");
    uint64_t b = 0;
    std::memcpy(&b, &v, sizeof(V));
    return b;
}
template <class V>
inline V from_bits(uint64_t b) {
    V v;
    std::memcpy(&v, &b, sizeof(V));
    return v;
}
inline int lane_id() { return static_cast<int>(tl_worker->cur->linear % 32); }

inline std::mutex& error_mutex() {
    static std::mutex m;
    return m;
}
inline std::string& last_error() {
    static std::string s;
    return s;
}

}  // namespace detail

// The <<<grid, block>>> equivalent: runs `body` (a kernel call with its arguments bound) once per
// CUDA thread. Returns 0 on success, 1 on a detected error (see cuda_cpu_last_error()).
inline int launch(const LaunchConfig& cfg, const std::function<void()>& body) {
    using namespace detail;
    const dim3 grid(cfg.grid[0], cfg.grid[1], cfg.grid[2]);
    const dim3 block(cfg.block[0], cfg.block[1], cfg.block[2]);
    auto set_error = [](const std::string& e) {
        std::lock_guard<std::mutex> lock(error_mutex());
        last_error() = e;
    };
    const unsigned long long nthreads = 1ull * block.x * block.y * block.z;
    if (nthreads == 0 || nthreads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64) {
        set_error("invalid block dimensions");
        return 1;
    }
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
        set_error("invalid grid dimensions");
        return 1;
    }
    if (cfg.policy < 0 || cfg.policy > 2) {
        set_error("invalid scheduling policy");
        return 1;
    }
    const unsigned long long nblocks = 1ull * grid.x * grid.y * grid.z;
    const unsigned nworkers = static_cast<unsigned>(
        std::max<unsigned long long>(1, std::min<unsigned long long>(cfg.workers > 0 ? cfg.workers : 1, nblocks)));
    std::vector<std::string> errors(nworkers);
    auto run = [&](unsigned wid) {
        Worker w;
        tl_worker = &w;
        w.grid_dim = grid;
        w.body = &body;
        w.prepare(block, static_cast<Policy>(cfg.policy), cfg.seed + wid);
        for (unsigned long long b = wid; b < nblocks; b += nworkers) {
            const uint3 bidx{static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                             static_cast<unsigned>(b / (1ull * grid.x * grid.y))};
            if (!w.run_block(bidx)) break;
        }
        errors[wid] = w.error;
        tl_worker = nullptr;
    };
    if (nworkers == 1) {
        run(0);
    } else {
        std::vector<std::thread> pool;
        for (unsigned i = 0; i < nworkers; ++i) pool.emplace_back(run, i);
        for (auto& t : pool) t.join();
    }
    for (auto& e : errors)
        if (!e.empty()) {
            set_error(e);
            return 1;
        }
    return 0;
}

// Convenience for C++ callers: launch_kernel(cfg, kernel, args...) ~ kernel<<<grid, block>>>(args...).
template <class... P, class... A>
inline int launch_kernel(const LaunchConfig& cfg, void (*kernel)(P...), A... args) {
    return launch(cfg, [=] { kernel(args...); });
}

}  // namespace cuda_cpu

#define threadIdx (::cuda_cpu::detail::thread_idx())
#define blockIdx (::cuda_cpu::detail::block_idx())
#define blockDim (::cuda_cpu::detail::block_dim())
#define gridDim (::cuda_cpu::detail::grid_dim())

inline void __syncthreads() { ::cuda_cpu::detail::worker().block_barrier(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    ::cuda_cpu::detail::worker().warp_op(::cuda_cpu::detail::WarpOp::Sync, mask, 0, 0);
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
    return static_cast<unsigned>(
        ::cuda_cpu::detail::worker().warp_op(::cuda_cpu::detail::WarpOp::Ballot, mask, pred != 0, 0));
}
inline int __any_sync(unsigned mask, int pred) {
    return static_cast<int>(::cuda_cpu::detail::worker().warp_op(::cuda_cpu::detail::WarpOp::Any, mask, pred != 0, 0));
}
inline int __all_sync(unsigned mask, int pred) {
    return static_cast<int>(::cuda_cpu::detail::worker().warp_op(::cuda_cpu::detail::WarpOp::All, mask, pred != 0, 0));
}

namespace cuda_cpu::detail {
template <class V>
inline V shfl_from(unsigned mask, V v, int src) {
    return from_bits<V>(worker().warp_op(WarpOp::Shfl, mask, to_bits(v), src));
}
}  // namespace cuda_cpu::detail

// Source-lane rules follow the CUDA programming guide, `width` a power of two <= 32.
template <class V>
inline V __shfl_sync(unsigned mask, V v, int src_lane, int width = warpSize) {
    const int lane = ::cuda_cpu::detail::lane_id();
    return ::cuda_cpu::detail::shfl_from(mask, v, (lane & ~(width - 1)) + (src_lane & (width - 1)));
}
template <class V>
inline V __shfl_up_sync(unsigned mask, V v, unsigned delta, int width = warpSize) {
    const int lane = ::cuda_cpu::detail::lane_id();
    const int src = (lane % width) >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : lane;
    return ::cuda_cpu::detail::shfl_from(mask, v, src);
}
template <class V>
inline V __shfl_down_sync(unsigned mask, V v, unsigned delta, int width = warpSize) {
    const int lane = ::cuda_cpu::detail::lane_id();
    const int src = (lane % width) + static_cast<int>(delta) < width ? lane + static_cast<int>(delta) : lane;
    return ::cuda_cpu::detail::shfl_from(mask, v, src);
}
template <class V>
inline V __shfl_xor_sync(unsigned mask, V v, int lane_mask, int width = warpSize) {
    const int lane = ::cuda_cpu::detail::lane_id();
    const int src = lane ^ lane_mask;
    const int group_end = (lane & ~(width - 1)) + width;
    return ::cuda_cpu::detail::shfl_from(mask, v, src < group_end ? src : lane);
}

// ctypes-facing entry points of a CPU-built kernel library.
extern "C" __attribute__((used)) inline const char* cuda_cpu_last_error() { return ::cuda_cpu::detail::last_error().c_str(); }

#define CUDA_CPU_UNPAREN(...) __VA_ARGS__
// Defines `extern "C" int NAME(void* kernel, const LaunchConfig* cfg, PARAMS)` that launches the
// kernel function pointer `kernel` (looked up by the caller with dlsym) with the given arguments.
#define CUDA_CPU_LAUNCHER(NAME, PARAMS, ARGS)                                                   \
    extern "C" int NAME(void* kernel, const ::cuda_cpu::LaunchConfig* cfg, CUDA_CPU_UNPAREN PARAMS) { \
        using Fn = void(*) PARAMS;                                                              \
        const Fn fn = reinterpret_cast<Fn>(kernel);                                             \
        return ::cuda_cpu::launch(*cfg, [=] { fn ARGS; });                                      \
    }
