// Batch normalisation over the channel (last) axis of x viewed as [M, C] rows; the
// statistics come from reduce.cu's column partials (f64), so the host never sees them.
//
//   bn_train_finalize: from column partials s1 = sum (x - k), s2 = sum (x - k)^2 ([chunks] rows
//     of `stride` values, summed in order; col_partials mode 2 or a fused convolution's
//     per-brick partials reduced by col_partials mode 0), k = shift[c] when shift is given,
//     else the shift col_partials wrote to mean[c]: mean = k + s1 / M,
//     var = s2 / M - (s1 / M)^2 (biased, clamped at 0), invstd = 1 / sqrt(var + eps),
//     running_mean' = (1 - momentum) running_mean + momentum mean,
//     running_var'  = (1 - momentum) running_var + momentum var M / (M - 1)   (all =)
//   bn_eval_stats: mean = running_mean, invstd = 1 / sqrt(running_var + eps)   (=)
//   bn_affine_table: tab [3, C] f32 = (mean, invstd gamma, beta): the per-channel constants
//     of bn_apply, for the fused convolutions that apply BatchNorm while loading      (=)
//   bn_apply: y = (x - mean) * (invstd * gamma) + beta (per element in f32, bn_affine_value),
//     then max(y, 0) when relu != 0 (BN -> ReLU in one pass)                          (=)
//   bn_table_relu_bf16: y = max(bn_affine_value(x, tab[0][c], tab[1][c], tab[2][c]), 0) from an
//     affine table, bf16 (the value a fused convolution's loader computes; the 1x1x1 tensor-core
//     convolutions take their BN -> ReLU input from it)                             (=)
//   bn_backward_finalize: from part0 = sum dy, part1 = sum dy (x - mean) ([chunks] rows of
//     `stride` values):
//     dbeta = sum dy, dgamma = invstd * sum dy (x - mean), and per-channel coefficients
//     k = gamma invstd, u = -gamma invstd^2 dgamma / M, w = -gamma invstd dbeta / M
//     (u = w = 0 in eval mode)                                                   (=)
//   bn_backward_apply: dx = k dy + u (x - mean) + w (+ add[i] when add is given: the
//     ResBlock's skip gradient joins the main path's in the same pass)            (=)
//   bn_apply and bn_backward_apply also come as NAME_f32x4 / NAME_bf16x8: the same expression
//     per element over 16-byte accesses (C a multiple of 4 / 8, pointers 16-byte aligned)
#include "common.cuh"

extern "C" __global__ void bn_train_finalize(const double* s1_part, const double* s2_part, int chunks, int stride, int C, const float* shift, i64 M, double eps,
                                             double momentum, double* mean, double* invstd, const float* rm_in, const float* rv_in, float* rm_out, float* rv_out) {
    GRID_STRIDE(c, C) {
        double s1 = 0.0, s2 = 0.0;
        for (int k = 0; k < chunks; ++k) {
            s1 += s1_part[(i64)k * stride + c];
            s2 += s2_part[(i64)k * stride + c];
        }
        const double d = s1 / (double)M;
        const double var = fmax(s2 / (double)M - d * d, 0.0);
        const double mu = (shift ? (double)shift[c] : mean[c]) + d;
        mean[c] = mu;
        invstd[c] = 1.0 / sqrt(var + eps);
        rm_out[c] = (float)((1.0 - momentum) * (double)rm_in[c] + momentum * mu);
        rv_out[c] = (float)((1.0 - momentum) * (double)rv_in[c] + momentum * var * ((double)M / (double)(M - 1)));
    }
}

extern "C" __global__ void bn_eval_stats(const float* rm, const float* rv, int C, double eps, double* mean, double* invstd) {
    GRID_STRIDE(c, C) {
        mean[c] = (double)rm[c];
        invstd[c] = 1.0 / sqrt((double)rv[c] + eps);
    }
}

extern "C" __global__ void bn_affine_table(const double* mean, const double* invstd, const float* gamma, const float* beta, int C, float* tab) {
    GRID_STRIDE(c, C) {
        tab[c] = (float)mean[c];
        tab[C + c] = (float)(invstd[c] * (double)gamma[c]);
        tab[2 * C + c] = beta[c];
    }
}

template <typename T>
__device__ void bn_apply(const T* x, T* y, const double* mean, const double* invstd, const float* gamma, const float* beta, i64 M, int C, int relu) {
    ChannelCursor cc(GRID_FIRST, GRID_STEP, C);
    for (i64 i = GRID_FIRST; i < M * C; i += GRID_STEP, cc.advance()) {
        const int c = cc.c;
        float scale = (float)(invstd[c] * (double)gamma[c]);
        float v = bn_affine_value(ld(x, i), (float)mean[c], scale, beta[c]);
        st(y, i, relu ? fmaxf(v, 0.f) : v);
    }
}
extern "C" __global__ void bn_apply_f32(const float* x, float* y, const double* mean, const double* invstd, const float* gamma, const float* beta, i64 M, int C, int relu) {
    bn_apply(x, y, mean, invstd, gamma, beta, M, C, relu);
}
extern "C" __global__ void bn_apply_bf16(const bf16* x, bf16* y, const double* mean, const double* invstd, const float* gamma, const float* beta, i64 M, int C, int relu) {
    bn_apply(x, y, mean, invstd, gamma, beta, M, C, relu);
}
// bn_apply over 16-byte groups of V channels (C % V == 0): thread-iteration g covers elements
// [g V, g V + V), whose channel group the cursor keeps.
template <typename T>
__device__ void bn_apply_vec(const T* x, T* y, const double* mean, const double* invstd, const float* gamma, const float* beta, i64 M, int C, int relu) {
    constexpr int V = VEC_OF(T);
    ChannelCursor cg(GRID_FIRST, GRID_STEP, C / V);
    for (i64 g = GRID_FIRST; g < M * (C / V); g += GRID_STEP, cg.advance()) {
        float v[V];
        ld_lanes(x + g * V, v);
#pragma unroll
        for (int j = 0; j < V; ++j) {
            const int c = cg.c * V + j;
            const float u = bn_affine_value(v[j], (float)mean[c], (float)(invstd[c] * (double)gamma[c]), beta[c]);
            v[j] = relu ? fmaxf(u, 0.f) : u;
        }
        st_lanes(y + g * V, v);
    }
}
extern "C" __global__ void bn_apply_f32x4(const float* x, float* y, const double* mean, const double* invstd, const float* gamma, const float* beta, i64 M, int C, int relu) {
    bn_apply_vec(x, y, mean, invstd, gamma, beta, M, C, relu);
}
extern "C" __global__ void bn_apply_bf16x8(const bf16* x, bf16* y, const double* mean, const double* invstd, const float* gamma, const float* beta, i64 M, int C, int relu) {
    bn_apply_vec(x, y, mean, invstd, gamma, beta, M, C, relu);
}

extern "C" __global__ void bn_table_relu_bf16(const bf16* x, bf16* y, const float* tab, int M, int C) {
    ChannelCursor cc(GRID_FIRST, GRID_STEP, C);
    for (int i = GRID_FIRST; i < M * C; i += GRID_STEP, cc.advance()) {
        const int c = cc.c;
        y[i] = __float2bfloat16_rn(bn_relu_value(__bfloat162float(x[i]), tab[c], tab[C + c], tab[2 * C + c]));
    }
}

// coef [3, C]: k, u, w.
extern "C" __global__ void bn_backward_finalize(const double* part0, const double* part1, int chunks, int stride, int C, i64 M, const double* invstd, const float* gamma, int train,
                                                float* dgamma, float* dbeta, float* coef) {
    GRID_STRIDE(c, C) {
        double sg = 0.0, sgx = 0.0;
        for (int k = 0; k < chunks; ++k) {
            sg += part0[(i64)k * stride + c];
            sgx += part1[(i64)k * stride + c];
        }
        double is = invstd[c], ga = (double)gamma[c];
        double dg = sgx * is;
        dgamma[c] = (float)dg;
        dbeta[c] = (float)sg;
        coef[c] = (float)(ga * is);
        coef[C + c] = train ? (float)(-ga * is * is * dg / (double)M) : 0.f;
        coef[2 * C + c] = train ? (float)(-ga * is * sg / (double)M) : 0.f;
    }
}

template <typename T>
__device__ void bn_backward_apply(const T* x, const T* dy, const T* add, T* dx, const double* mean, const float* coef, i64 M, int C) {
    ChannelCursor cc(GRID_FIRST, GRID_STEP, C);
    for (i64 i = GRID_FIRST; i < M * C; i += GRID_STEP, cc.advance()) {
        const int c = cc.c;
        const float v = coef[c] * ld(dy, i) + coef[C + c] * (ld(x, i) - (float)mean[c]) + coef[2 * C + c];
        st(dx, i, add ? v + ld(add, i) : v);
    }
}
extern "C" __global__ void bn_backward_apply_f32(const float* x, const float* dy, const float* add, float* dx, const double* mean, const float* coef, i64 M, int C) {
    bn_backward_apply(x, dy, add, dx, mean, coef, M, C);
}
extern "C" __global__ void bn_backward_apply_bf16(const bf16* x, const bf16* dy, const bf16* add, bf16* dx, const double* mean, const float* coef, i64 M, int C) {
    bn_backward_apply(x, dy, add, dx, mean, coef, M, C);
}
// bn_backward_apply over 16-byte groups of V channels (C % V == 0), as bn_apply_vec.
template <typename T>
__device__ void bn_backward_apply_vec(const T* x, const T* dy, const T* add, T* dx, const double* mean, const float* coef, i64 M, int C) {
    constexpr int V = VEC_OF(T);
    ChannelCursor cg(GRID_FIRST, GRID_STEP, C / V);
    for (i64 g = GRID_FIRST; g < M * (C / V); g += GRID_STEP, cg.advance()) {
        float xs[V], ds[V], as[V];
        ld_lanes(x + g * V, xs);
        ld_lanes(dy + g * V, ds);
        if (add) ld_lanes(add + g * V, as);
#pragma unroll
        for (int j = 0; j < V; ++j) {
            const int c = cg.c * V + j;
            const float v = coef[c] * ds[j] + coef[C + c] * (xs[j] - (float)mean[c]) + coef[2 * C + c];
            ds[j] = add ? v + as[j] : v;
        }
        st_lanes(dx + g * V, ds);
    }
}
extern "C" __global__ void bn_backward_apply_f32x4(const float* x, const float* dy, const float* add, float* dx, const double* mean, const float* coef, i64 M, int C) {
    bn_backward_apply_vec(x, dy, add, dx, mean, coef, M, C);
}
extern "C" __global__ void bn_backward_apply_bf16x8(const bf16* x, const bf16* dy, const bf16* add, bf16* dx, const double* mean, const float* coef, i64 M, int C) {
    bn_backward_apply_vec(x, dy, add, dx, mean, coef, M, C);
}
