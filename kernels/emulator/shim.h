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
#include <cstdio>
#include <cstdlib>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// One block runs at a time, so a function-local static is exactly the block's shared memory.
// Every one lives in the linker section "emu_shared", which the runtime fills with 0xff bytes
// (NaN as f32 and bf16) before each block: a kernel reading shared memory it did not write in
// this block reads NaN, not the previous block's values.
#define __shared__ static __attribute__((section("emu_shared")))

// The running block's dynamic shared memory (runtime.cpp; common.cuh's DYNAMIC_SHARED).
extern "C" unsigned char* emu_dynamic_shared();

struct emu_dim3 {
    unsigned x, y, z;
};
extern emu_dim3 threadIdx, blockIdx, blockDim, gridDim;

extern "C" void emu_syncthreads();
#define __syncthreads() emu_syncthreads()

// Warp-level rendezvous: returns once every live thread of the calling thread's warp (32
// consecutive linear thread indices) has called it (runtime.cpp).
extern "C" void emu_syncwarp();
extern "C" unsigned emu_linear_tid();
#define __syncwarp(...) emu_syncwarp()
// Exchange slots of warp collectives: [warp][lane][word], 16 32-bit words per lane.
extern unsigned emu_warp_slots[32][32][16];

// Warp shuffles: each lane posts its value, rendezvous, reads its partner's, rendezvous (so
// the slots can be reused). Only the warp takes part, as on the GPU.
template <typename T>
inline T emu_shfl_xor(T v, int lane_mask) {
    static_assert(sizeof(T) <= 16 * sizeof(unsigned), "shuffle of a value wider than the slot");
    const unsigned t = emu_linear_tid(), w = t / 32, l = t % 32;
    std::memcpy(emu_warp_slots[w][l], &v, sizeof(T));
    emu_syncwarp();
    T r;
    std::memcpy(&r, emu_warp_slots[w][(l ^ (unsigned)lane_mask) % 32], sizeof(T));
    emu_syncwarp();
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
using std::isfinite;

inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}

// CUDA's 16-byte vector type.
struct __attribute__((aligned(16))) uint4 {
    unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
struct __attribute__((aligned(8))) float2 {
    float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
struct __attribute__((aligned(16))) float4 {
    float x, y, z, w;
};

// A misaligned vector access faults on the GPU; here it stops the process with its address.
inline void emu_check_align(const void* p, unsigned bytes, const char* what) {
    if ((uintptr_t)p % bytes != 0) {
        std::fprintf(stderr, "CUDA emulator: %s address %p is not %u-byte aligned\n", what, p, bytes);
        std::abort();
    }
}

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
