// The optimiser step on the device: global gradient norm, clip coefficient and a fused Adam.
//   sumsq_blocks: block b sums g[b * per_block ..) squared in f64 (fixed tree) -> out[b]       (=)
//   clip_finalize: one block; norm = sqrt(sum part), coef = min(1, max_norm / (norm + 1e-6));
//     stats[0] = norm, stats[1] = coef (f32), as torch.nn.utils.clip_grad_norm_              (=)
//   adam_update: per element (PyTorch Adam, f32 arithmetic), g scaled by coef[0] first:
//     m += (1 - b1)(g - m); v = b2 v + (1 - b2) g^2; p -= step_size m / (sqrt(v) / bc2 + eps)
//     (p, m, v updated in place)
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(256) sumsq_blocks(const float* g, i64 n, i64 per_block, double* out) {
    __shared__ double scratch[256];
    const i64 b0 = (i64)blockIdx.x * per_block, b1 = min(n, b0 + per_block);
    double s = 0.0;
    for (i64 i = b0 + threadIdx.x; i < b1; i += blockDim.x) s += (double)g[i] * (double)g[i];
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) out[blockIdx.x] = s;
}

extern "C" __global__ void __launch_bounds__(256) clip_finalize(const double* part, i64 count, double max_norm, float* stats) {
    __shared__ double scratch[256];
    double s = 0.0;
    for (i64 i = threadIdx.x; i < count; i += blockDim.x) s += part[i];
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) {
        double norm = sqrt(s);
        stats[0] = (float)norm;
        stats[1] = (float)fmin(1.0, max_norm / (norm + 1e-6));
    }
}

extern "C" __global__ void adam_update(float* p, const float* g, float* m, float* v, i64 n, float step_size, float b1, float b2, float eps, float bc2_sqrt, const float* coef) {
    const float k = coef ? coef[0] : 1.f;
    GRID_STRIDE(i, n) {
        float gi = g[i] * k;
        float mi = m[i] + (1.f - b1) * (gi - m[i]);
        float vi = b2 * v[i] + (1.f - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] -= step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
    }
}
