// InfoNCE (ops/infonce.rs has the derivation). The four N x N similarity products are cuBLAS
// SGEMMs; these kernels do the rest on the device, so the loss never visits the host.
//
//   infonce_softmax_rows: block i (256 threads) takes row i of [L | R] (each N x N, logits
//     = value / t, diagonal of L and/or R masked out), computes lse_i = logsumexp (f64) and
//     overwrites the row by its softmax (masked entries 0). With diag != null, first stores
//     diag[i] = R[i, i] / t.                                                           (=)
//   infonce_loss: one block; loss = ((sum lse1 - sum diag) / N + (sum lse2 - sum diag) / N) / 2
//     written as f32 to loss[0].                                                        (=)
//   infonce_grad_matrices: one thread per (i, j):
//     g11 = (A + A^T) k, g22 = (D + D^T) k, g12 = (B + C^T) k - [i == j] diag_term       (=)
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(256) infonce_softmax_rows(float* L, float* R, int n, double t, int mask_left, int mask_right, double* lse, double* diag) {
    __shared__ float fscratch[256];
    __shared__ double dscratch[256];
    const i64 i = blockIdx.x;
    float* l = L + i * n;
    float* r = R + i * n;
    if (diag && threadIdx.x == 0) diag[i] = (double)r[i] / t;
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        if (!(mask_left && j == i)) mx = fmaxf(mx, l[j]);
        if (!(mask_right && j == i)) mx = fmaxf(mx, r[j]);
    }
    const double m = (double)block_max(mx, fscratch) / t;
    double s = 0.0;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        if (!(mask_left && j == i)) s += exp((double)l[j] / t - m);
        if (!(mask_right && j == i)) s += exp((double)r[j] / t - m);
    }
    const double lse_i = m + log(block_sum(s, dscratch));
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        l[j] = (mask_left && j == i) ? 0.f : (float)exp((double)l[j] / t - lse_i);
        r[j] = (mask_right && j == i) ? 0.f : (float)exp((double)r[j] / t - lse_i);
    }
    if (threadIdx.x == 0) lse[i] = lse_i;
}

extern "C" __global__ void __launch_bounds__(256) infonce_loss(const double* lse1, const double* lse2, const double* diag, int n, float* loss) {
    __shared__ double scratch[256];
    double a = 0.0, b = 0.0, d = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        a += lse1[i];
        b += lse2[i];
        d += diag[i];
    }
    a = block_sum(a, scratch);
    b = block_sum(b, scratch);
    d = block_sum(d, scratch);
    if (threadIdx.x == 0) loss[0] = (float)(((a - d) / n + (b - d) / n) / 2.0);
}

extern "C" __global__ void infonce_grad_matrices(const float* A, const float* B, const float* C, const float* D, float* g11, float* g12, float* g22, int n, float k, float diag_term) {
    GRID_STRIDE(idx, (i64)n * n) {
        i64 i = idx / n, j = idx - i * n;
        i64 tr = j * n + i;
        g11[idx] = (A[idx] + A[tr]) * k;
        g22[idx] = (D[idx] + D[tr]) * k;
        g12[idx] = (B[idx] + C[tr]) * k - (i == j ? diag_term : 0.f);
    }
}
