// InfoNCE without an N x N matrix (ops/infonce.rs has the loss and its gradient): a
// flash-style pass over tiles of the similarity matrices, the logits recomputed wherever
// they are needed, O(N d) memory, deterministic (every sum in a fixed order, no atomics).
//
// Layout: e = [e1; e2], two row-major [N, d] f32 matrices (unit rows); view v in {0, 1}.
// Logits s_vp(i, j) = <e_v[i], e_p[j]> / t; the diagonal of s_vv is masked out (-inf).
//
//   infonce_row_lse: grid (ceil(N / 32), 2). Block (r, v) takes rows i of view v and streams
//     every column tile j of both partner views p = 0, 1:
//       lse[v * N + i] = logsumexp_{p, j} s_vp(i, j)                                    (=)
//     (v = 0: the rows of [l11 | l12]; v = 1: the rows of [l21 | l22], l21 = l12^T.) Each
//     thread keeps an online (max, sum) over its own columns; the 16 threads of a row merge
//     theirs with a fixed butterfly. Block (r, 0) also writes diag[i] = s_01(i, i).      (=)
//   infonce_loss: one block; loss = ((sum lse_0 - sum diag) / N + (sum lse_1 - sum diag) / N) / 2
//     written as f32 to loss[0].                                                        (=)
//   infonce_backward: grid (ceil(N / 32), 2). Block (r, v) writes the gradient rows of view
//     v (de1 or de2), recomputing each logit tile:
//       de_v[i] = g * ( k * sum_{p, j} w_vp(i, j) e_p[j] - e_{1-v}[i] / (N t) )            (=)
//       w_vp(i, j) = exp(s_vp(i, j) - lse_v[i]) + exp(s_vp(i, j) - lse_p[j])  (0 if masked)
//     with k = 1 / (2 N t) and g = dloss[0] (the upstream gradient, read on the device).
//     The first term is the softmax of row i's own log-sum-exp, the second that of the
//     partner's row j in which s_vp(i, j) also appears (s_pv(j, i) = s_vp(i, j)).
//
//   infonce_signal_hits: grid (ceil(A / 32), 2), the learning signal's top-1 accuracy
//     (ops/infonce.rs, signal_cpu): block (r, v) takes anchors i < A of view v against every
//     row j of the other view, dot-product tiles as the loss's (unscaled), and per anchor
//     keeps the diagonal and the maximum over j != i; hits[v * blocks + r] = the number of
//     its anchors whose diagonal is strictly the largest                              (=)
//   infonce_signal_finalize: one block; pos = sum_i <e1_i, e2_i> and the column sums of e1
//     and e2 in f64 (fixed thread assignment, block_sum), then
//       out = { sum hits / (2 A), pos / N, ((sum e1) . (sum e2) - pos) / (N (N - 1)) }    (=, f64)
//
// Tiles: 32 rows x 64 columns per step, 256 threads; the dot-product tile in registers
// (2 x 4 per thread, d in chunks of 32 through shared memory); in the backward the weight
// tile goes through shared memory and each thread accumulates d / 8 values of its row.
// fp32 arithmetic on CUDA cores; log-sum-exps merged and stored in f64.
#include "common.cuh"

#define NCE_BR 32
#define NCE_BC 64
#define NCE_DK 32
#define NCE_THREADS 256

// acc[a][b] = <X[i0 + tr * 2 + a], P[j0 + tc * 4 + b]> for this thread (tr = tid / 16,
// tc = tid % 16); rows beyond n read as zeros.
__device__ __forceinline__ void nce_dot_tile(const float* X, const float* P, int n, int d, int i0, int j0, float acc[2][4]) {
    __shared__ float Xs[NCE_DK][NCE_BR + 1];
    __shared__ float Ps[NCE_DK][NCE_BC + 1];
    const int tid = threadIdx.x, tr = tid / 16, tc = tid % 16;
    for (int a = 0; a < 2; ++a)
        for (int b = 0; b < 4; ++b) acc[a][b] = 0.f;
    for (int k0 = 0; k0 < d; k0 += NCE_DK) {
        for (int e = tid; e < NCE_BR * NCE_DK; e += NCE_THREADS) {
            int r = e / NCE_DK, kk = e % NCE_DK;
            Xs[kk][r] = (i0 + r < n && k0 + kk < d) ? X[(i64)(i0 + r) * d + k0 + kk] : 0.f;
        }
        for (int e = tid; e < NCE_BC * NCE_DK; e += NCE_THREADS) {
            int c = e / NCE_DK, kk = e % NCE_DK;
            Ps[kk][c] = (j0 + c < n && k0 + kk < d) ? P[(i64)(j0 + c) * d + k0 + kk] : 0.f;
        }
        __syncthreads();
#pragma unroll 8
        for (int kk = 0; kk < NCE_DK; ++kk) {
            float x0 = Xs[kk][tr * 2], x1 = Xs[kk][tr * 2 + 1];
#pragma unroll
            for (int b = 0; b < 4; ++b) {
                float p = Ps[kk][tc * 4 + b];
                acc[0][b] = fmaf(x0, p, acc[0][b]);
                acc[1][b] = fmaf(x1, p, acc[1][b]);
            }
        }
        __syncthreads();
    }
}

extern "C" __global__ void __launch_bounds__(NCE_THREADS) infonce_row_lse(const float* e1, const float* e2, int n, int d, float inv_t, double* lse, double* diag) {
    const int v = blockIdx.y, i0 = blockIdx.x * NCE_BR;
    const int tid = threadIdx.x, tr = tid / 16, tc = tid % 16;
    const float* X = v == 0 ? e1 : e2;
    // Per thread and row: running max and sum of exp(s - max) over this thread's columns.
    float m[2] = {-INFINITY, -INFINITY}, s[2] = {0.f, 0.f};
    for (int p = 0; p < 2; ++p) {
        const float* P = p == 0 ? e1 : e2;
        for (int j0 = 0; j0 < n; j0 += NCE_BC) {
            float acc[2][4];
            nce_dot_tile(X, P, n, d, i0, j0, acc);
            for (int a = 0; a < 2; ++a) {
                const int i = i0 + tr * 2 + a;
                for (int b = 0; b < 4; ++b) {
                    const int j = j0 + tc * 4 + b;
                    if (i >= n || j >= n) continue;
                    const float x = acc[a][b] * inv_t;
                    if (v == 0 && p == 1 && i == j) diag[i] = (double)x;
                    if (p == v && i == j) continue;
                    if (x > m[a]) {
                        s[a] = s[a] * expf(m[a] - x) + 1.f;
                        m[a] = x;
                    } else {
                        s[a] += expf(x - m[a]);
                    }
                }
            }
        }
    }
    // Merge the 16 threads of each row (lanes tc = 0..15 of one half-warp), fixed order.
    for (int a = 0; a < 2; ++a) {
        double mm = m[a], ss = s[a];
        for (int o = 8; o > 0; o >>= 1) {
            double mo = __shfl_xor_sync(0xffffffffu, mm, o);
            double so = __shfl_xor_sync(0xffffffffu, ss, o);
            double mx = fmax(mm, mo);
            ss = (mx == -INFINITY) ? 0.0 : ss * exp(mm - mx) + so * exp(mo - mx);
            mm = mx;
        }
        const int i = i0 + tr * 2 + a;
        if (tc == 0 && i < n) lse[(i64)v * n + i] = mm + log(ss);
    }
}

extern "C" __global__ void __launch_bounds__(256) infonce_loss(const double* lse, const double* diag, int n, float* loss) {
    __shared__ double scratch[256];
    double a = 0.0, b = 0.0, dg = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        a += lse[i];
        b += lse[n + i];
        dg += diag[i];
    }
    a = block_sum(a, scratch);
    b = block_sum(b, scratch);
    dg = block_sum(dg, scratch);
    if (threadIdx.x == 0) loss[0] = (float)(((a - dg) / n + (b - dg) / n) / 2.0);
}

// DMAX: the largest d this instantiation serves (a multiple of 32); each thread holds
// DMAX / 8 accumulators of its row (r = tid / 8, columns lane8 + 8 q of every d chunk).
template <int DMAX>
__device__ void infonce_backward_impl(const float* e1, const float* e2, int n, int d, float inv_t, const double* lse, const float* dloss, float* de1, float* de2) {
    __shared__ float Ws[NCE_BR][NCE_BC + 1];
    __shared__ float Pt[NCE_DK][NCE_BC + 1];
    const int v = blockIdx.y, i0 = blockIdx.x * NCE_BR;
    const int tid = threadIdx.x, tr = tid / 16, tc = tid % 16;
    const int r = tid / 8, lane8 = tid % 8;
    const float* X = v == 0 ? e1 : e2;
    float out[DMAX / NCE_DK][4];
#pragma unroll
    for (int ch = 0; ch < DMAX / NCE_DK; ++ch)
        for (int q = 0; q < 4; ++q) out[ch][q] = 0.f;
    double lse_i[2];
    for (int a = 0; a < 2; ++a) {
        const int i = i0 + tr * 2 + a;
        lse_i[a] = i < n ? lse[(i64)v * n + i] : 0.0;
    }
    for (int p = 0; p < 2; ++p) {
        const float* P = p == 0 ? e1 : e2;
        for (int j0 = 0; j0 < n; j0 += NCE_BC) {
            float acc[2][4];
            nce_dot_tile(X, P, n, d, i0, j0, acc);
            for (int a = 0; a < 2; ++a) {
                const int i = i0 + tr * 2 + a;
                for (int b = 0; b < 4; ++b) {
                    const int j = j0 + tc * 4 + b;
                    float w = 0.f;
                    if (i < n && j < n && !(p == v && i == j)) {
                        const float x = acc[a][b] * inv_t;
                        w = expf(x - (float)lse_i[a]) + expf(x - (float)lse[(i64)p * n + j]);
                    }
                    Ws[tr * 2 + a][tc * 4 + b] = w;
                }
            }
            // out[r, :] += W[r, :] . P[j0 .. j0 + 64, :], d in chunks of 32.
#pragma unroll
            for (int ch = 0; ch < DMAX / NCE_DK; ++ch) {
                const int k0 = ch * NCE_DK;
                if (k0 >= d) break;
                __syncthreads();  // Ws written (first chunk) / Pt free (later chunks)
                for (int e = tid; e < NCE_BC * NCE_DK; e += NCE_THREADS) {
                    int c = e / NCE_DK, kk = e % NCE_DK;
                    Pt[kk][c] = (j0 + c < n && k0 + kk < d) ? P[(i64)(j0 + c) * d + k0 + kk] : 0.f;
                }
                __syncthreads();
                for (int c = 0; c < NCE_BC; ++c) {
                    const float w = Ws[r][c];
#pragma unroll
                    for (int q = 0; q < 4; ++q) out[ch][q] = fmaf(w, Pt[lane8 + 8 * q][c], out[ch][q]);
                }
            }
            __syncthreads();  // Ws and Pt are rewritten by the next tile
        }
    }
    const int i = i0 + r;
    if (i >= n) return;
    const float g = dloss ? dloss[0] : 1.f;
    const float k = 0.5f * inv_t / (float)n, diag_k = inv_t / (float)n;
    const float* other = v == 0 ? e2 : e1;
    float* dst = (v == 0 ? de1 : de2) + (i64)i * d;
#pragma unroll
    for (int ch = 0; ch < DMAX / NCE_DK; ++ch) {
        for (int q = 0; q < 4; ++q) {
            const int col = ch * NCE_DK + lane8 + 8 * q;
            if (col < d) dst[col] = g * (k * out[ch][q] - diag_k * other[(i64)i * d + col]);
        }
    }
}

// de1, de2 [N, d] f32. d <= 128 and d <= 512 variants (registers sized to d).
extern "C" __global__ void __launch_bounds__(NCE_THREADS) infonce_backward_d128(const float* e1, const float* e2, int n, int d, float inv_t, const double* lse, const float* dloss, float* de1, float* de2) {
    infonce_backward_impl<128>(e1, e2, n, d, inv_t, lse, dloss, de1, de2);
}
extern "C" __global__ void __launch_bounds__(NCE_THREADS) infonce_backward_d512(const float* e1, const float* e2, int n, int d, float inv_t, const double* lse, const float* dloss, float* de1, float* de2) {
    infonce_backward_impl<512>(e1, e2, n, d, inv_t, lse, dloss, de1, de2);
}

extern "C" __global__ void __launch_bounds__(NCE_THREADS) infonce_signal_hits(const float* e1, const float* e2, int n, int d, int anchors, double* hits) {
    __shared__ int s_hits[NCE_BR];
    const int v = blockIdx.y, i0 = blockIdx.x * NCE_BR;
    const int tid = threadIdx.x, tr = tid / 16, tc = tid % 16;
    const float* X = v == 0 ? e1 : e2;
    const float* P = v == 0 ? e2 : e1;
    float best[2] = {-INFINITY, -INFINITY}, diag[2] = {-INFINITY, -INFINITY};
    for (int j0 = 0; j0 < n; j0 += NCE_BC) {
        float acc[2][4];
        nce_dot_tile(X, P, n, d, i0, j0, acc);
        for (int a = 0; a < 2; ++a) {
            const int i = i0 + tr * 2 + a;
            for (int b = 0; b < 4; ++b) {
                const int j = j0 + tc * 4 + b;
                if (i >= anchors || j >= n) continue;
                if (j == i) diag[a] = acc[a][b];
                else best[a] = fmaxf(best[a], acc[a][b]);
            }
        }
    }
    // The 16 threads of each row: max of both (only one thread saw the diagonal).
    for (int a = 0; a < 2; ++a) {
        for (int o = 8; o > 0; o >>= 1) {
            best[a] = fmaxf(best[a], __shfl_xor_sync(0xffffffffu, best[a], o));
            diag[a] = fmaxf(diag[a], __shfl_xor_sync(0xffffffffu, diag[a], o));
        }
        if (tc == 0) s_hits[tr * 2 + a] = (i0 + tr * 2 + a < anchors && diag[a] > best[a]) ? 1 : 0;
    }
    __syncthreads();
    if (tid == 0) {
        int h = 0;
        for (int r = 0; r < NCE_BR; ++r) h += s_hits[r];
        hits[(i64)v * gridDim.x + blockIdx.x] = (double)h;
    }
}

extern "C" __global__ void __launch_bounds__(256) infonce_signal_finalize(const float* e1, const float* e2, int n, int d, int anchors, const double* hits, int hit_blocks, double* out) {
    __shared__ double scratch[256];
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    double pos = 0.0, cross = 0.0;
    for (int r = warp; r < n; r += 8)
        for (int c = lane; c < d; c += 32) pos += (double)e1[(i64)r * d + c] * (double)e2[(i64)r * d + c];
    for (int c = tid; c < d; c += 256) {
        double s1 = 0.0, s2 = 0.0;
        for (int r = 0; r < n; ++r) {
            s1 += (double)e1[(i64)r * d + c];
            s2 += (double)e2[(i64)r * d + c];
        }
        cross += s1 * s2;
    }
    pos = block_sum(pos, scratch);
    cross = block_sum(cross, scratch);
    if (tid == 0) {
        double h = 0.0;
        for (int b = 0; b < hit_blocks; ++b) h += hits[b];
        out[0] = h / (2.0 * anchors);
        out[1] = pos / n;
        out[2] = n > 1 ? (cross - pos) / ((double)n * (n - 1)) : nan("");
    }
}
