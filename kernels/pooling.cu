// Max pooling 2x2x2, stride 2, ceil mode, on [N, X, Y, Z, C] (f32 or bf16).
//   forward: one thread per output element; scans the (clipped) window in (x, y, z) order,
//     keeps the first strictly greater value (PyTorch's tie rule; NaN wins), writes y and the
//     winning offset arg = a * 4 + b * 2 + c (u8)                                     (=)
//   backward: one thread per input element (each lies in exactly one window):
//     dx = acc + (dy[window] if this element was the window's winner, else 0)         (=)
//     acc (nullable, dx's shape and type): the gradient dx already accumulated from another
//     consumer of the pooled tensor, so that autograd needs no separate add pass.
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
