// Deterministic column reductions over a row-major [M, C] matrix (channels-last activations
// viewed as rows of C channels), in two stages so that no atomics are needed:
//
//   col_partials: grid.x = chunks of `rows` consecutive rows, block 256. Threads are laid out
//     as lanes x channels (lanes = 256 / min(C, 256)); each sums its lane's rows of one channel
//     in f64, then lane sums are added in lane order. Writes (=) part0/part1 [chunks, C]:
//       mode 0: part0 = sum x
//       mode 1: part0 = sum g, part1 = sum g * (x - mean[c])        (g: a second [M, C] input)
//       mode 2: part0 = sum (x - k[c]), part1 = sum (x - k[c])^2 with the shift k[c] = x[0, c],
//               which block 0 also writes (=) to mean[c]: BatchNorm's statistics in one pass.
//               Shifting by a sample of the column keeps E[d^2] - E[d]^2 free of the
//               cancellation a raw sum of squares would suffer when |mean| >> std.
//   reduce_chunks: one thread per channel sums the chunks in order (f64) and writes
//     out_d[c] = s * scale (f64) and/or out_f[c] = (float)(s * scale) (=), plus acc_f[c] when
//     acc_f is given (a gradient accumulated before: acc + new, as autograd's add).
#include "common.cuh"

template <typename T>
__device__ void col_partials(const T* x, const T* g, double* mean, double* part0, double* part1, i64 M, int C, i64 rows, int mode) {
    __shared__ double s0[256];
    __shared__ double s1[256];
    const int cw = C < 256 ? C : 256, lanes = 256 / cw;
    const int tid = threadIdx.x, lane = tid / cw, cc = tid % cw;
    const i64 r0 = (i64)blockIdx.x * rows, r1 = min(M, r0 + rows);
    for (int cbase = 0; cbase < C; cbase += cw) {
        const int c = cbase + cc;
        double a0 = 0.0, a1 = 0.0;
        if (lane < lanes && c < C) {
            const double mu = mode == 2 ? (double)ld(x, (i64)c) : mean ? mean[c] : 0.0;
            if (mode == 2 && blockIdx.x == 0 && lane == 0) mean[c] = mu;
            for (i64 r = r0 + lane; r < r1; r += lanes) {
                double v = ld(x, r * C + c);
                if (mode == 0) {
                    a0 += v;
                } else if (mode == 2) {
                    a0 += v - mu;
                    a1 += (v - mu) * (v - mu);
                } else {
                    double gv = ld(g, r * C + c);
                    a0 += gv;
                    a1 += gv * (v - mu);
                }
            }
        }
        s0[tid] = a0;
        s1[tid] = a1;
        __syncthreads();
        if (lane == 0 && c < C) {
            double t0 = 0.0, t1 = 0.0;
            for (int l = 0; l < lanes; ++l) {
                t0 += s0[l * cw + cc];
                t1 += s1[l * cw + cc];
            }
            part0[(i64)blockIdx.x * C + c] = t0;
            if (part1) part1[(i64)blockIdx.x * C + c] = t1;
        }
        __syncthreads();
    }
}
extern "C" __global__ void __launch_bounds__(256) col_partials_f32(const float* x, const float* g, double* mean, double* part0, double* part1, i64 M, int C, i64 rows, int mode) {
    col_partials(x, g, mean, part0, part1, M, C, rows, mode);
}
extern "C" __global__ void __launch_bounds__(256) col_partials_bf16(const bf16* x, const bf16* g, double* mean, double* part0, double* part1, i64 M, int C, i64 rows, int mode) {
    col_partials(x, g, mean, part0, part1, M, C, rows, mode);
}

extern "C" __global__ void reduce_chunks(const double* part, int chunks, int C, double scale, double* out_d, float* out_f, const float* acc_f) {
    GRID_STRIDE(c, C) {
        double s = 0.0;
        for (int k = 0; k < chunks; ++k) s += part[(i64)k * C + c];
        if (out_d) out_d[c] = s * scale;
        if (out_f) out_f[c] = acc_f ? acc_f[c] + (float)(s * scale) : (float)(s * scale);
    }
}
