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

// VEC_OF(T) consecutive elements, 16 bytes (4 f32 or 8 bf16), as f32 values: one vector access
// each (the address 16-byte aligned). The `_f32x4` / `_bf16x8` kernels are built on these.
#define VEC_OF(T) ((int)(16 / sizeof(T)))
__device__ __forceinline__ void ld_lanes(const float* p, float* v) {
    const uint4 t = ld_vec16(p);
    memcpy(v, &t, 16);
}
__device__ __forceinline__ void ld_lanes(const bf16* p, float* v) {
    const uint4 t = ld_vec16(p);
    bf16 b[8];
    memcpy(b, &t, 16);
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = __bfloat162float(b[j]);
}
__device__ __forceinline__ void st_lanes(float* p, const float* v) {
    uint4 t;
    memcpy(&t, v, 16);
    st_vec16(p, t);
}
__device__ __forceinline__ void st_lanes(bf16* p, const float* v) {
    bf16 b[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) b[j] = __float2bfloat16_rn(v[j]);
    uint4 t;
    memcpy(&t, b, 16);
    st_vec16(p, t);
}

// The channel of a grid-stride loop's element, kept without a division per iteration: start at
// (first index) mod C, then each stride adds (stride mod C) with one conditional wrap. Every
// index involved is a 32-bit quantity at start (thread index, grid size), so no 64-bit
// division appears anywhere.
struct ChannelCursor {
    int c, step, C;
    __device__ __forceinline__ ChannelCursor(unsigned first, unsigned stride, int C_) : c((int)(first % (unsigned)C_)), step((int)(stride % (unsigned)C_)), C(C_) {}
    __device__ __forceinline__ void advance() {
        c += step;
        if (c >= C) c -= C;
    }
};
// The (row, column) of a grid-stride loop's element of a [rows, W] matrix, kept the same way:
// one 32-bit division at start, a carry per iteration (W below 2^31).
struct RowCursor {
    i64 r, dr;
    int j, dj, W;
    __device__ __forceinline__ RowCursor(unsigned first, unsigned stride, int W_) : r(first / (unsigned)W_), dr(stride / (unsigned)W_), j((int)(first % (unsigned)W_)), dj((int)(stride % (unsigned)W_)), W(W_) {}
    __device__ __forceinline__ void advance() {
        r += dr;
        j += dj;
        if (j >= W) {
            j -= W;
            ++r;
        }
    }
};
// The first index and the stride of a grid-stride loop (both below 2^32: grids of at most
// 2^16 blocks of 256 threads).
#define GRID_FIRST ((unsigned)(blockIdx.x * blockDim.x + threadIdx.x))
#define GRID_STEP ((unsigned)(gridDim.x * blockDim.x))

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
// A flat index g < 2^32 of an [N, X, Y, Z, G] volume (G channel groups), unpacked with 32-bit
// divisions (the launchers check the bound).
struct GroupIndex {
    unsigned n;
    int x, y, z, g;
};
__device__ __forceinline__ GroupIndex unpack_group(unsigned i, int X, int Y, int Z, int G) {
    GroupIndex v;
    v.g = (int)(i % (unsigned)G); i /= (unsigned)G;
    v.z = (int)(i % (unsigned)Z); i /= (unsigned)Z;
    v.y = (int)(i % (unsigned)Y); i /= (unsigned)Y;
    v.x = (int)(i % (unsigned)X);
    v.n = i / (unsigned)X;
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
