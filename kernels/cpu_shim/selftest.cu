// selftest.cu -- probe kernels for the CPU shim itself (CPU build only; not a device source).
// tests/test_kernels_cpu.py checks their output against CUDA's documented semantics computed in
// Python, and checks that the broken probes are reported as errors.
#include "common.cuh"

#define PROBE_OUTS 10

// Per thread: ids, shuffles of every kind (with and without width), ballot/any/all.
extern "C" __global__ void probe_warp(unsigned* out) {
    const unsigned b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const unsigned nt = blockDim.x * blockDim.y * blockDim.z;
    unsigned* o = out + (static_cast<unsigned long long>(b) * nt + t) * PROBE_OUTS;
    o[0] = b;
    o[1] = t;
    o[2] = __shfl_xor_sync(0xffffffffu, t, 1);
    o[3] = __shfl_down_sync(0xffffffffu, t, 3);
    o[4] = __shfl_up_sync(0xffffffffu, t, 2, 8);
    o[5] = __shfl_sync(0xffffffffu, t, 5, 16);
    o[6] = __ballot_sync(0xffffffffu, t & 1u);
    __syncwarp();
    o[7] = __any_sync(0xffffffffu, t % 32 == 7);
    o[8] = __all_sync(0xffffffffu, t % 32 != 7);
    o[9] = __shfl_xor_sync(0xffffffffu, t, 16, 32);
}

// Barrier: every thread reads what its neighbour wrote before the barrier.
extern "C" __global__ void probe_barrier(unsigned* out) {
    __shared__ unsigned s[1024];
    const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const unsigned nt = blockDim.x * blockDim.y * blockDim.z;
    const unsigned b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    s[t] = t * t + b;
    __syncthreads();
    out[b * nt + t] = s[(t + 1) % nt];
}

// Atomics across blocks (and worker threads): out[0] += 1 per thread, out[1] = max of linear ids.
extern "C" __global__ void probe_atomics(unsigned* out) {
    const unsigned nt = blockDim.x * blockDim.y * blockDim.z;
    const unsigned b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const unsigned id = b * nt + threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    atomicAdd(out, 1u);
    atomicMax(out + 1, id);
}

// Broken: only half the block reaches the barrier (must be reported, not hang).
extern "C" __global__ void probe_divergent_barrier(unsigned* out) {
    if (threadIdx.x < 16) __syncthreads();
    out[threadIdx.x] = 1;
}

// Broken: lanes 0..15 shuffle with mask 0x0000ffff but read lane 20, outside the mask.
extern "C" __global__ void probe_bad_shuffle(unsigned* out) {
    if (threadIdx.x < 16) out[threadIdx.x] = __shfl_sync(0x0000ffffu, threadIdx.x, 20);
}

CUDA_CPU_LAUNCHER(cuda_cpu_launch_probe, (unsigned* out), (out))
