// Row-wise L2 normalisation of x [N, D] (f32), one warp per row, sums in f64 with a fixed
// butterfly (deterministic). Block 256 = 8 rows.
//   forward:  y = x / max(||x||, 1e-12)                                                     (=)
//   backward: dx = (dy - y (y . dy)) / ||x|| if ||x|| > 1e-12, else dy / 1e-12               (=)
#include "common.cuh"

#define NORM_EPS 1e-12

__device__ __forceinline__ double warp_sum(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

extern "C" __global__ void l2_normalize_forward(const float* x, float* y, i64 N, int D) {
    i64 row = (i64)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= N) return;
    const float* xr = x + row * D;
    double s = 0.0;
    for (int j = lane; j < D; j += 32) s += (double)xr[j] * (double)xr[j];
    double n = fmax(sqrt(warp_sum(s)), NORM_EPS);
    for (int j = lane; j < D; j += 32) y[row * D + j] = (float)((double)xr[j] / n);
}

extern "C" __global__ void l2_normalize_backward(const float* x, const float* dy, float* dx, i64 N, int D) {
    i64 row = (i64)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= N) return;
    const float* xr = x + row * D;
    const float* gr = dy + row * D;
    double s = 0.0, dot = 0.0;
    for (int j = lane; j < D; j += 32) {
        s += (double)xr[j] * (double)xr[j];
        dot += (double)xr[j] * (double)gr[j];
    }
    double norm = sqrt(warp_sum(s));
    dot = warp_sum(dot);
    if (norm > NORM_EPS) {
        dot /= norm;
        for (int j = lane; j < D; j += 32) dx[row * D + j] = (float)(((double)gr[j] - (double)xr[j] / norm * dot) / norm);
    } else {
        for (int j = lane; j < D; j += 32) dx[row * D + j] = (float)((double)gr[j] / NORM_EPS);
    }
}
