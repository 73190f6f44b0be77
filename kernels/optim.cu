// The optimiser step on the device: global gradient norm, clip coefficient and a fused Adam,
// each over every parameter tensor in one launch (multi-tensor: 3 launches per step, not 3
// per tensor).
//
// Layout: a table of MultiTensorEntry, one per tensor (pointers, length, and the index of the
// tensor's first block in each kernel's grid; blocks are numbered tensor after tensor). A
// block finds its tensor by binary search on `first_*`, then works on its chunk of it.
//   multi_sumsq: block b (chunk j of tensor k) sums g_k[j * per_block ..) squared in f64
//     (fixed tree) -> out[b]; the partials are thus in tensor order, then chunk order     (=)
//   clip_finalize: one block; norm = sqrt(sum part), coef = min(1, max_norm / (norm + 1e-6));
//     stats[0] = norm, stats[1] = coef (f32), as torch.nn.utils.clip_grad_norm_              (=)
//     A non-finite norm (as f32) or loss (loss[0], when given) makes coef NaN: the step is
//     skipped, and multi_adam then changes nothing (a diverged step never reaches the weights).
//   multi_adam: per element of chunk j of tensor k (PyTorch Adam, f32 arithmetic), g scaled
//     by coef[0] first (a non-finite coef[0]: no update at all, p, m and v untouched):
//     m += (1 - b1)(g - m); v = b2 v + (1 - b2) g^2; p -= step_size m / (sqrt(v) / bc2 + eps)
//     (p, m, v updated in place); schedule = [step_size, bc2] in device memory, so that the
//     launch's arguments do not change from step to step
#include "common.cuh"

struct MultiTensorEntry {
    float* p;
    const float* g;
    float* m;
    float* v;
    i64 n;
    i64 first_sumsq;
    i64 first_adam;
    i64 unused;
};

// The tensor that block b belongs to: the last entry whose first block is <= b.
__device__ int multi_tensor_find(const MultiTensorEntry* t, int count, i64 b, bool adam) {
    int lo = 0, hi = count - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        const i64 first = adam ? t[mid].first_adam : t[mid].first_sumsq;
        if (first <= b) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

extern "C" __global__ void __launch_bounds__(256) multi_sumsq(const MultiTensorEntry* t, int count, i64 per_block, double* out) {
    __shared__ double scratch[256];
    const int k = multi_tensor_find(t, count, blockIdx.x, false);
    const float* g = t[k].g;
    const i64 b0 = ((i64)blockIdx.x - t[k].first_sumsq) * per_block, b1 = min(t[k].n, b0 + per_block);
    double s = 0.0;
    for (i64 i = b0 + threadIdx.x; i < b1; i += blockDim.x) s += (double)g[i] * (double)g[i];
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) out[blockIdx.x] = s;
}

extern "C" __global__ void __launch_bounds__(256) clip_finalize(const double* part, i64 count, double max_norm, const float* loss, float* stats) {
    __shared__ double scratch[256];
    double s = 0.0;
    for (i64 i = threadIdx.x; i < count; i += blockDim.x) s += part[i];
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) {
        double norm = sqrt(s);
        stats[0] = (float)norm;
        const bool finite = isfinite((float)norm) && (!loss || isfinite(loss[0]));
        stats[1] = finite ? (float)fmin(1.0, max_norm / (norm + 1e-6)) : __int_as_float(0x7fc00000);
    }
}

extern "C" __global__ void __launch_bounds__(256) multi_adam(const MultiTensorEntry* t, int count, i64 per_block, const float* schedule, float b1, float b2, float eps, const float* coef) {
    const int k = multi_tensor_find(t, count, blockIdx.x, true);
    float* p = t[k].p;
    const float* g = t[k].g;
    float* m = t[k].m;
    float* v = t[k].v;
    const float c = coef ? coef[0] : 1.f;
    if (!isfinite(c)) return;  // a skipped step (clip_finalize)
    const float step_size = schedule[0], bc2_sqrt = schedule[1];
    const i64 i0 = ((i64)blockIdx.x - t[k].first_adam) * per_block, i1 = min(t[k].n, i0 + per_block);
    for (i64 i = i0 + threadIdx.x; i < i1; i += blockDim.x) {
        float gi = g[i] * c;
        float mi = m[i] + (1.f - b1) * (gi - m[i]);
        float vi = b2 * v[i] + (1.f - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] -= step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
    }
}
