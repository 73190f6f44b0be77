// Nearest-neighbour upsampling x2 then crop to (TX, TY, TZ), on [N, X, Y, Z, C] (f32 or bf16).
//   forward: one thread per output element, y[n, x, y, z, c] = in[n, x/2, y/2, z/2, c]       (=)
//   backward: one thread per input element, din = sum of dy over its (up to 8) copies inside
//     the crop, in (a, b, c) order, accumulated in f32                                     (=)
//   NAME_f32x4 / NAME_bf16x8: the same per element, one thread-iteration per input voxel and
//     16-byte channel group (C a multiple of 4 / 8, pointers 16-byte aligned, fewer than 2^32
//     groups; the launcher checks); the forward writes the voxel's copies from it.
#include "common.cuh"

template <typename T>
__device__ void upsample2_forward(const T* x, T* y, int nb, int X, int Y, int Z, int C, int TX, int TY, int TZ) {
    GRID_STRIDE(i, (i64)nb * TX * TY * TZ * C) {
        const VoxelIndex o = unpack_voxel(i, TX, TY, TZ, C);
        st(y, i, ld(x, voxel_offset(o.n, o.x / 2, o.y / 2, o.z / 2, X, Y, Z, C, o.c)));
    }
}
extern "C" __global__ void upsample2_forward_f32(const float* x, float* y, int nb, int X, int Y, int Z, int C, int TX, int TY, int TZ) { upsample2_forward(x, y, nb, X, Y, Z, C, TX, TY, TZ); }
extern "C" __global__ void upsample2_forward_bf16(const bf16* x, bf16* y, int nb, int X, int Y, int Z, int C, int TX, int TY, int TZ) { upsample2_forward(x, y, nb, X, Y, Z, C, TX, TY, TZ); }

template <typename T>
__device__ void upsample2_backward(const T* dy, T* dx, int nb, int X, int Y, int Z, int C, int TX, int TY, int TZ) {
    GRID_STRIDE(i, (i64)nb * X * Y * Z * C) {
        const VoxelIndex v = unpack_voxel(i, X, Y, Z, C);
        float s = 0.f;
        for_each_child(v.x, v.y, v.z, TX, TY, TZ, [&](int, int ox, int oy, int oz) {
            s += ld(dy, voxel_offset(v.n, ox, oy, oz, TX, TY, TZ, C, v.c));
        });
        st(dx, i, s);
    }
}
extern "C" __global__ void upsample2_backward_f32(const float* dy, float* dx, int nb, int X, int Y, int Z, int C, int TX, int TY, int TZ) { upsample2_backward(dy, dx, nb, X, Y, Z, C, TX, TY, TZ); }
extern "C" __global__ void upsample2_backward_bf16(const bf16* dy, bf16* dx, int nb, int X, int Y, int Z, int C, int TX, int TY, int TZ) { upsample2_backward(dy, dx, nb, X, Y, Z, C, TX, TY, TZ); }

template <typename T>
__device__ void upsample2_forward_vec(const T* x, T* y, int nb, int X, int Y, int Z, int C, int TX, int TY, int TZ) {
    constexpr int V = VEC_OF(T);
    const int G = C / V;
    for (i64 i = GRID_FIRST; i < (i64)nb * X * Y * Z * G; i += GRID_STEP) {
        const GroupIndex v = unpack_group((unsigned)i, X, Y, Z, G);
        float s[V];
        ld_lanes(x + i * V, s);
        for_each_child(v.x, v.y, v.z, TX, TY, TZ, [&](int, int ox, int oy, int oz) { st_lanes(y + voxel_offset(v.n, ox, oy, oz, TX, TY, TZ, C, v.g * V), s); });
    }
}
extern "C" __global__ void upsample2_forward_f32x4(const float* x, float* y, int nb, int X, int Y, int Z, int C, int TX, int TY, int TZ) { upsample2_forward_vec(x, y, nb, X, Y, Z, C, TX, TY, TZ); }
extern "C" __global__ void upsample2_forward_bf16x8(const bf16* x, bf16* y, int nb, int X, int Y, int Z, int C, int TX, int TY, int TZ) { upsample2_forward_vec(x, y, nb, X, Y, Z, C, TX, TY, TZ); }

template <typename T>
__device__ void upsample2_backward_vec(const T* dy, T* dx, int nb, int X, int Y, int Z, int C, int TX, int TY, int TZ) {
    constexpr int V = VEC_OF(T);
    const int G = C / V;
    for (i64 i = GRID_FIRST; i < (i64)nb * X * Y * Z * G; i += GRID_STEP) {
        const GroupIndex v = unpack_group((unsigned)i, X, Y, Z, G);
        float s[V];
#pragma unroll
        for (int j = 0; j < V; ++j) s[j] = 0.f;
        for_each_child(v.x, v.y, v.z, TX, TY, TZ, [&](int, int ox, int oy, int oz) {
            float d[V];
            ld_lanes(dy + voxel_offset(v.n, ox, oy, oz, TX, TY, TZ, C, v.g * V), d);
#pragma unroll
            for (int j = 0; j < V; ++j) s[j] += d[j];
        });
        st_lanes(dx + i * V, s);
    }
}
extern "C" __global__ void upsample2_backward_f32x4(const float* dy, float* dx, int nb, int X, int Y, int Z, int C, int TX, int TY, int TZ) { upsample2_backward_vec(dy, dx, nb, X, Y, Z, C, TX, TY, TZ); }
extern "C" __global__ void upsample2_backward_bf16x8(const bf16* dy, bf16* dx, int nb, int X, int Y, int Z, int C, int TX, int TY, int TZ) { upsample2_backward_vec(dy, dx, nb, X, Y, Z, C, TX, TY, TZ); }
