// The CUDA emulator's stand-ins for CUDA's language extensions, force-included when build.rs
// compiles kernels/*.cu as C++ for the host (cargo feature `cuda-emulator`). Each CUDA thread
// of a block runs as a fiber (runtime.cpp); __syncthreads() switches fibers, so barrier
// semantics, shared memory and warp shuffles behave as on a GPU, one block at a time.
// This checks the kernels' logic and the launchers' argument lists on any machine; it says
// nothing about speed, and it is not a GPU.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// One block runs at a time, so a function-local static is exactly the block's shared memory.
#define __shared__ static

struct emu_dim3 {
    unsigned x, y, z;
};
extern emu_dim3 threadIdx, blockIdx, blockDim, gridDim;

extern "C" void emu_syncthreads();
#define __syncthreads() emu_syncthreads()

// Value exchange for warp shuffles: every thread of the block posts, barrier, reads, barrier.
extern double emu_exchange[1024];
template <typename T>
inline T emu_shfl_xor(T v, int lane_mask) {
    emu_exchange[threadIdx.x] = (double)v;
    emu_syncthreads();
    T r = (T)emu_exchange[threadIdx.x ^ (unsigned)lane_mask];
    emu_syncthreads();
    return r;
}
#define __shfl_xor_sync(mask, v, o) emu_shfl_xor(v, o)

// Fibers of a block switch only at barriers, so a plain add is atomic among them.
inline float atomicAdd(float* p, float v) {
    float old = *p;
    *p = old + v;
    return old;
}

using std::min;
using std::max;

// bf16 as on the device: the upper 16 bits of an f32, rounded to nearest even.
struct __nv_bfloat16 {
    uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 b) {
    uint32_t u = (uint32_t)b.bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{(uint16_t)((u >> 16) | 0x40)};  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return __nv_bfloat16{(uint16_t)(u >> 16)};
}
