// Shared helpers of every kernel file: element loads/stores for the two activation storage
// types (fp32 and bf16; arithmetic is always fp32 or wider), grid-stride loops with 64-bit
// indices, and a deterministic block reduction (fixed tree, so results do not depend on
// scheduling).
#pragma once
#ifndef VOX2VEC_EMULATOR
#include <cuda_bf16.h>
#endif
#include <stdint.h>

typedef __nv_bfloat16 bf16;
typedef long long i64;

__device__ __forceinline__ float ld(const float* p, i64 i) { return p[i]; }
__device__ __forceinline__ float ld(const bf16* p, i64 i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void st(float* p, i64 i, float v) { p[i] = v; }
__device__ __forceinline__ void st(bf16* p, i64 i, float v) { p[i] = __float2bfloat16_rn(v); }

// 16-byte vector load and store (8 bf16 or 4 f32); the address must be 16-byte aligned (the
// emulator checks it).
#ifdef VOX2VEC_EMULATOR
inline uint4 ld_vec16(const void* p) {
    emu_check_align(p, 16, "16-byte load");
    uint4 v;
    memcpy(&v, p, 16);
    return v;
}
inline void st_vec16(void* p, uint4 v) {
    emu_check_align(p, 16, "16-byte store");
    memcpy(p, &v, 16);
}
#else
__device__ __forceinline__ uint4 ld_vec16(const void* p) { return *(const uint4*)p; }
__device__ __forceinline__ void st_vec16(void* p, uint4 v) { *(uint4*)p = v; }
#endif

// The block's dynamic shared memory (the launch's shared_bytes, 16-byte aligned) as a T*.
// Above 48 KiB a launch needs the kernel's opt-in (CudaDevice::set_max_dynamic_shared, up to
// 227 KiB on sm_90); the emulator enforces both limits, poisons the buffer with NaN before
// each block and fails a launch whose block wrote past its end.
#ifdef VOX2VEC_EMULATOR
#define DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(emu_dynamic_shared())
#else
#define DYNAMIC_SHARED(T, name)                                      \
    extern __shared__ __align__(16) unsigned char vox2vec_dyn_smem[]; \
    T* name = reinterpret_cast<T*>(vox2vec_dyn_smem)
#endif

// BatchNorm's affine map of one value with per-channel (mean, scale = invstd gamma, beta) as
// f32, and BN -> ReLU. Every kernel that applies BatchNorm (bn_apply, the fused convolutions'
// input loads and ReLU masks) goes through these, so a recomputed activation is bit-identical
// to the forward's.
__device__ __forceinline__ float bn_affine_value(float x, float mean, float scale, float beta) { return fmaf(x - mean, scale, beta); }
__device__ __forceinline__ float bn_relu_value(float x, float mean, float scale, float beta) { return fmaxf(bn_affine_value(x, mean, scale, beta), 0.f); }

#define GRID_STRIDE(i, n) for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (i64)(n); i += (i64)gridDim.x * blockDim.x)

// A flat channels-last index i of an [N, X, Y, Z, C] volume, unpacked.
struct VoxelIndex {
    i64 n;
    int x, y, z, c;
};
__device__ __forceinline__ VoxelIndex unpack_voxel(i64 i, int X, int Y, int Z, int C) {
    VoxelIndex v;
    v.c = (int)(i % C); i /= C;
    v.z = (int)(i % Z); i /= Z;
    v.y = (int)(i % Y); i /= Y;
    v.x = (int)(i % X);
    v.n = i / X;
    return v;
}
// The flat index of (n, x, y, z, c) in an [N, X, Y, Z, C] volume.
__device__ __forceinline__ i64 voxel_offset(i64 n, int x, int y, int z, int X, int Y, int Z, int C, int c) {
    return (((n * X + x) * Y + y) * (i64)Z + z) * C + c;
}

// Calls f(offset, xi, yi, zi) for each child (2x + a, 2y + b, 2z + c), a, b, c in {0, 1}, of
// the coarse voxel (x, y, z) that lies inside [0, X) x [0, Y) x [0, Z), in (a, b, c) order;
// offset = a * 4 + b * 2 + c. The 2x2x2 window of max-pooling and of upsampling's backward.
template <class F>
__device__ __forceinline__ void for_each_child(int x, int y, int z, int X, int Y, int Z, F f) {
    for (int a = 0; a < 2; ++a) {
        if (2 * x + a >= X) continue;
        for (int b = 0; b < 2; ++b) {
            if (2 * y + b >= Y) continue;
            for (int c = 0; c < 2; ++c) {
                if (2 * z + c >= Z) continue;
                f(a * 4 + b * 2 + c, 2 * x + a, 2 * y + b, 2 * z + c);
            }
        }
    }
}

// Sum of `v` over the block (blockDim.x a power of two, at most 1024); every thread gets the
// result. `scratch` holds blockDim.x values. Fixed pairing order: deterministic.
template <typename A>
__device__ A block_sum(A v, A* scratch) {
    scratch[threadIdx.x] = v;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) scratch[threadIdx.x] += scratch[threadIdx.x + s];
        __syncthreads();
    }
    A r = scratch[0];
    __syncthreads();
    return r;
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    scratch[threadIdx.x] = v;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) scratch[threadIdx.x] = fmaxf(scratch[threadIdx.x], scratch[threadIdx.x + s]);
        __syncthreads();
    }
    float r = scratch[0];
    __syncthreads();
    return r;
}

// Kernels templated on the activation type T are exported twice, as NAME_f32 and NAME_bf16,
// by one-line extern "C" wrappers beside each template (names stay plain C symbols for the
// driver API's cuModuleGetFunction).
