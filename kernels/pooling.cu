// Max pooling 2x2x2, stride 2, ceil mode, on [N, X, Y, Z, C] (f32 or bf16).
//   forward: one thread per output element; scans the (clipped) window in (x, y, z) order,
//     keeps the first strictly greater value (PyTorch's tie rule; NaN wins), writes y and the
//     winning offset arg = a * 4 + b * 2 + c (u8)                                     (=)
//   backward: one thread per input element (each lies in exactly one window):
//     dx = acc + (dy[window] if this element was the window's winner, else 0)         (=)
//     acc (nullable, dx's shape and type): the gradient dx already accumulated from another
//     consumer of the pooled tensor, so that autograd needs no separate add pass.
//   NAME_f32x4 / NAME_bf16x8: the same per element, one thread-iteration per pooled voxel and
//     16-byte channel group (C a multiple of 4 / 8, pointers 16-byte aligned, fewer than 2^32
//     groups; the launcher checks); the backward writes the window's children from it.
#include "common.cuh"

template <typename T>
__device__ void maxpool2_forward(const T* x, T* y, unsigned char* arg, int nb, int X, int Y, int Z, int C) {
    const int OX = (X + 1) / 2, OY = (Y + 1) / 2, OZ = (Z + 1) / 2;
    GRID_STRIDE(i, (i64)nb * OX * OY * OZ * C) {
        const VoxelIndex o = unpack_voxel(i, OX, OY, OZ, C);
        float best = 0.f;
        int besto = 0;
        bool first = true;
        for_each_child(o.x, o.y, o.z, X, Y, Z, [&](int off, int xi, int yi, int zi) {
            float v = ld(x, voxel_offset(o.n, xi, yi, zi, X, Y, Z, C, o.c));
            if (first || v > best || v != v) {
                best = v;
                besto = off;
                first = false;
            }
        });
        st(y, i, best);
        arg[i] = (unsigned char)besto;
    }
}
extern "C" __global__ void maxpool2_forward_f32(const float* x, float* y, unsigned char* arg, int nb, int X, int Y, int Z, int C) { maxpool2_forward(x, y, arg, nb, X, Y, Z, C); }
extern "C" __global__ void maxpool2_forward_bf16(const bf16* x, bf16* y, unsigned char* arg, int nb, int X, int Y, int Z, int C) { maxpool2_forward(x, y, arg, nb, X, Y, Z, C); }

template <typename T>
__device__ void maxpool2_backward(const T* dy, const unsigned char* arg, const T* acc, T* dx, int nb, int X, int Y, int Z, int C) {
    const int OX = (X + 1) / 2, OY = (Y + 1) / 2, OZ = (Z + 1) / 2;
    GRID_STRIDE(i, (i64)nb * X * Y * Z * C) {
        const VoxelIndex v = unpack_voxel(i, X, Y, Z, C);
        i64 oi = voxel_offset(v.n, v.x / 2, v.y / 2, v.z / 2, OX, OY, OZ, C, v.c);
        int off = (v.x % 2) * 4 + (v.y % 2) * 2 + v.z % 2;
        const float g = arg[oi] == off ? ld(dy, oi) : 0.f;
        st(dx, i, acc ? ld(acc, i) + g : g);
    }
}
extern "C" __global__ void maxpool2_backward_f32(const float* dy, const unsigned char* arg, const float* acc, float* dx, int nb, int X, int Y, int Z, int C) { maxpool2_backward(dy, arg, acc, dx, nb, X, Y, Z, C); }
extern "C" __global__ void maxpool2_backward_bf16(const bf16* dy, const unsigned char* arg, const bf16* acc, bf16* dx, int nb, int X, int Y, int Z, int C) { maxpool2_backward(dy, arg, acc, dx, nb, X, Y, Z, C); }

// The V winning offsets of one channel group, stored as one V-byte word.
__device__ __forceinline__ void st_args(unsigned char* p, const unsigned char* a, int V) {
    if (V == 8) {
        unsigned long long w;
        memcpy(&w, a, 8);
        *(unsigned long long*)p = w;
    } else {
        unsigned w;
        memcpy(&w, a, 4);
        *(unsigned*)p = w;
    }
}

template <typename T>
__device__ void maxpool2_forward_vec(const T* x, T* y, unsigned char* arg, int nb, int X, int Y, int Z, int C) {
    constexpr int V = VEC_OF(T);
    const int OX = (X + 1) / 2, OY = (Y + 1) / 2, OZ = (Z + 1) / 2, G = C / V;
    for (i64 i = GRID_FIRST; i < (i64)nb * OX * OY * OZ * G; i += GRID_STEP) {
        const GroupIndex o = unpack_group((unsigned)i, OX, OY, OZ, G);
        float best[V];
        unsigned char besto[V];
        bool first = true;
        for_each_child(o.x, o.y, o.z, X, Y, Z, [&](int off, int xi, int yi, int zi) {
            float v[V];
            ld_lanes(x + voxel_offset(o.n, xi, yi, zi, X, Y, Z, C, o.g * V), v);
#pragma unroll
            for (int j = 0; j < V; ++j) {
                if (first || v[j] > best[j] || v[j] != v[j]) {
                    best[j] = v[j];
                    besto[j] = (unsigned char)off;
                }
            }
            first = false;
        });
        st_lanes(y + i * V, best);
        st_args(arg + i * V, besto, V);
    }
}
extern "C" __global__ void maxpool2_forward_f32x4(const float* x, float* y, unsigned char* arg, int nb, int X, int Y, int Z, int C) { maxpool2_forward_vec(x, y, arg, nb, X, Y, Z, C); }
extern "C" __global__ void maxpool2_forward_bf16x8(const bf16* x, bf16* y, unsigned char* arg, int nb, int X, int Y, int Z, int C) { maxpool2_forward_vec(x, y, arg, nb, X, Y, Z, C); }

template <typename T>
__device__ void maxpool2_backward_vec(const T* dy, const unsigned char* arg, const T* acc, T* dx, int nb, int X, int Y, int Z, int C) {
    constexpr int V = VEC_OF(T);
    const int OX = (X + 1) / 2, OY = (Y + 1) / 2, OZ = (Z + 1) / 2, G = C / V;
    for (i64 i = GRID_FIRST; i < (i64)nb * OX * OY * OZ * G; i += GRID_STEP) {
        const GroupIndex o = unpack_group((unsigned)i, OX, OY, OZ, G);
        float g[V];
        unsigned char a[V];
        ld_lanes(dy + i * V, g);
        memcpy(a, arg + i * V, V);
        for_each_child(o.x, o.y, o.z, X, Y, Z, [&](int off, int xi, int yi, int zi) {
            const i64 e = voxel_offset(o.n, xi, yi, zi, X, Y, Z, C, o.g * V);
            float v[V];
            if (acc) ld_lanes(acc + e, v);
#pragma unroll
            for (int j = 0; j < V; ++j) {
                const float d = a[j] == off ? g[j] : 0.f;
                v[j] = acc ? v[j] + d : d;
            }
            st_lanes(dx + e, v);
        });
    }
}
extern "C" __global__ void maxpool2_backward_f32x4(const float* dy, const unsigned char* arg, const float* acc, float* dx, int nb, int X, int Y, int Z, int C) { maxpool2_backward_vec(dy, arg, acc, dx, nb, X, Y, Z, C); }
extern "C" __global__ void maxpool2_backward_bf16x8(const bf16* dy, const unsigned char* arg, const bf16* acc, bf16* dx, int nb, int X, int Y, int Z, int C) { maxpool2_backward_vec(dy, arg, acc, dx, nb, X, Y, Z, C); }
