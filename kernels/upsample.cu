// Nearest-neighbour upsampling x2 then crop to (TX, TY, TZ), on [N, X, Y, Z, C] (f32 or bf16).
//   forward: one thread per output element, y[n, x, y, z, c] = in[n, x/2, y/2, z/2, c]       (=)
//   backward: one thread per input element, din = sum of dy over its (up to 8) copies inside
//     the crop, in (a, b, c) order, accumulated in f32                                     (=)
#include "common.cuh"

template <typename T>
__device__ void upsample2_forward(const T* x, T* y, int nb, int X, int Y, int Z, int C, int TX, int TY, int TZ) {
    GRID_STRIDE(i, (i64)nb * TX * TY * TZ * C) {
        i64 q = i;
        int ch = (int)(q % C); q /= C;
        int zi = (int)(q % TZ); q /= TZ;
        int yi = (int)(q % TY); q /= TY;
        int xi = (int)(q % TX);
        i64 n = q / TX;
        st(y, i, ld(x, (((n * X + xi / 2) * Y + yi / 2) * (i64)Z + zi / 2) * C + ch));
    }
}
extern "C" __global__ void upsample2_forward_f32(const float* x, float* y, int nb, int X, int Y, int Z, int C, int TX, int TY, int TZ) { upsample2_forward(x, y, nb, X, Y, Z, C, TX, TY, TZ); }
extern "C" __global__ void upsample2_forward_bf16(const bf16* x, bf16* y, int nb, int X, int Y, int Z, int C, int TX, int TY, int TZ) { upsample2_forward(x, y, nb, X, Y, Z, C, TX, TY, TZ); }

template <typename T>
__device__ void upsample2_backward(const T* dy, T* dx, int nb, int X, int Y, int Z, int C, int TX, int TY, int TZ) {
    GRID_STRIDE(i, (i64)nb * X * Y * Z * C) {
        i64 q = i;
        int ch = (int)(q % C); q /= C;
        int zi = (int)(q % Z); q /= Z;
        int yi = (int)(q % Y); q /= Y;
        int xi = (int)(q % X);
        i64 n = q / X;
        float s = 0.f;
        for (int a = 0; a < 2; ++a) {
            int ox = 2 * xi + a;
            if (ox >= TX) continue;
            for (int b = 0; b < 2; ++b) {
                int oy = 2 * yi + b;
                if (oy >= TY) continue;
                for (int c = 0; c < 2; ++c) {
                    int oz = 2 * zi + c;
                    if (oz >= TZ) continue;
                    s += ld(dy, (((n * TX + ox) * TY + oy) * (i64)TZ + oz) * C + ch);
                }
            }
        }
        st(dx, i, s);
    }
}
extern "C" __global__ void upsample2_backward_f32(const float* dy, float* dx, int nb, int X, int Y, int Z, int C, int TX, int TY, int TZ) { upsample2_backward(dy, dx, nb, X, Y, Z, C, TX, TY, TZ); }
extern "C" __global__ void upsample2_backward_bf16(const bf16* dy, bf16* dx, int nb, int X, int Y, int Z, int C, int TX, int TY, int TZ) { upsample2_backward(dy, dx, nb, X, Y, Z, C, TX, TY, TZ); }
