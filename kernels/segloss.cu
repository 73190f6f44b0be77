// The segmentation training loss of docs/method.md §5 (BCE in the ROI + soft Dice), the oracle
// being src/ops/segloss.rs (segmentation_loss_cpu). Logits [N, V, C] (channels last, V = X Y Z
// voxels, f32 or bf16), one-hot targets [N, V, C] f32, ROI [N, V] f32 (0 or 1; null = every
// voxel). Three deterministic stages, no atomics:
//
//   segloss_partials: grid (chunks, N), block 256 laid out as lanes x classes (lanes =
//     256 / min(C, 256)); block (k, n) walks voxels [k rows, (k + 1) rows) of sample n, each
//     thread its lane's voxels of one class, and sums in f64, over ROI voxels only:
//       bce = max(l, 0) - l t + log1p(exp(-|l|)),  inter = p t,  sums = p^2 + t^2,
//     p = sigmoid(l) (element math in f32); lane sums are added in lane order. Writes (=)
//     part[n][k] = {bce[C], inter[C], sums[C], roi voxels}: 3C + 1 doubles.
//   segloss_finalize: one block of 256. Thread j of (n, c) pairs sums its chunks in order and
//     writes (=) stats[2 j] = I, stats[2 j + 1] = S + 1; the per-pair bce and Dice terms and
//     the per-sample ROI counts are block-summed (fixed tree) into
//       loss[0] = sum bce / (count C) + mean_{n,c} (1 - 2 I / (S + 1))      (=, f32)
//     and stats[2 N C] = count C (the number of ROI elements). An empty ROI gives NaN.
//   segloss_backward: one thread per element, in the ROI (0 outside):
//       dl = dloss[0] ((p - t) / (count C) - 2 (t (S + 1) - 2 I p) / ((S + 1)^2 N C) p (1 - p))
//     written (=) in the logits' dtype.
#include "common.cuh"

__device__ __forceinline__ float segloss_sigmoid(float l) {
    if (l >= 0.f) return 1.f / (1.f + expf(-l));
    const float e = expf(l);
    return e / (1.f + e);
}

template <typename T>
__device__ void segloss_partials(const T* logits, const float* targets, const float* roi, i64 V, int C, i64 rows, double* part) {
    __shared__ double s_bce[256];
    __shared__ double s_int[256];
    __shared__ double s_sum[256];
    __shared__ double s_cnt[256];
    const int cw = C < 256 ? C : 256, lanes = 256 / cw;
    const int tid = threadIdx.x, lane = tid / cw, cc = tid % cw;
    const i64 n = blockIdx.y, chunks = gridDim.x;
    const i64 v0 = (i64)blockIdx.x * rows, v1 = min(V, v0 + rows);
    double* out = part + (n * chunks + blockIdx.x) * (3 * (i64)C + 1);
    for (int cbase = 0; cbase < C; cbase += cw) {
        const int c = cbase + cc;
        double bce = 0.0, inter = 0.0, sums = 0.0, cnt = 0.0;
        if (lane < lanes && c < C) {
            for (i64 v = v0 + lane; v < v1; v += lanes) {
                const i64 bv = n * V + v;
                if (roi && roi[bv] == 0.f) continue;
                const i64 i = bv * C + c;
                const float l = ld(logits, i), t = targets[i];
                const float p = segloss_sigmoid(l);
                bce += (double)(fmaxf(l, 0.f) - l * t + log1pf(expf(-fabsf(l))));
                inter += (double)p * t;
                sums += (double)p * p + (double)t * t;
                cnt += 1.0;
            }
        }
        s_bce[tid] = bce;
        s_int[tid] = inter;
        s_sum[tid] = sums;
        s_cnt[tid] = cnt;
        __syncthreads();
        if (lane == 0 && c < C) {
            double b = 0.0, in = 0.0, su = 0.0, co = 0.0;
            for (int l = 0; l < lanes; ++l) {
                b += s_bce[l * cw + cc];
                in += s_int[l * cw + cc];
                su += s_sum[l * cw + cc];
                co += s_cnt[l * cw + cc];
            }
            out[c] = b;
            out[C + c] = in;
            out[2 * C + c] = su;
            // Every class column counts the same ROI voxels: class 0's count is the block's.
            if (c == 0) out[3 * C] = co;
        }
        __syncthreads();
    }
}
extern "C" __global__ void __launch_bounds__(256) segloss_partials_f32(const float* logits, const float* targets, const float* roi, i64 V, int C, i64 rows, double* part) {
    segloss_partials(logits, targets, roi, V, C, rows, part);
}
extern "C" __global__ void __launch_bounds__(256) segloss_partials_bf16(const bf16* logits, const float* targets, const float* roi, i64 V, int C, i64 rows, double* part) {
    segloss_partials(logits, targets, roi, V, C, rows, part);
}

extern "C" __global__ void __launch_bounds__(256) segloss_finalize(const double* part, int chunks, int N, int C, double* stats, float* loss) {
    __shared__ double scratch[256];
    const int tid = threadIdx.x;
    const i64 stride = 3 * (i64)C + 1;
    double bce = 0.0, dice = 0.0, cnt = 0.0;
    for (int j = tid; j < N * C; j += blockDim.x) {
        const int n = j / C, c = j % C;
        double b = 0.0, in = 0.0, su = 0.0;
        for (int k = 0; k < chunks; ++k) {
            const double* p = part + ((i64)n * chunks + k) * stride;
            b += p[c];
            in += p[C + c];
            su += p[2 * C + c];
        }
        stats[2 * (i64)j] = in;
        stats[2 * (i64)j + 1] = su + 1.0;
        bce += b;
        dice += 1.0 - 2.0 * in / (su + 1.0);
    }
    for (int n = tid; n < N; n += blockDim.x) {
        for (int k = 0; k < chunks; ++k) cnt += part[((i64)n * chunks + k) * stride + 3 * C];
    }
    bce = block_sum(bce, scratch);
    dice = block_sum(dice, scratch);
    cnt = block_sum(cnt, scratch);
    if (tid == 0) {
        const double elements = cnt * C;
        stats[2 * (i64)N * C] = elements;
        const double b = elements > 0.0 ? bce / elements : nan("");
        loss[0] = (float)(b + dice / ((double)N * C));
    }
}

template <typename T>
__device__ void segloss_backward(const T* logits, const float* targets, const float* roi, const double* stats, const float* dloss, T* grad, i64 V, int N, int C) {
    const double count = stats[2 * (i64)N * C], nc = (double)N * C, k = dloss[0];
    GRID_STRIDE(i, (i64)N * V * C) {
        const i64 bv = i / C;
        const int c = (int)(i % C);
        if (roi && roi[bv] == 0.f) {
            st(grad, i, 0.f);
            continue;
        }
        const i64 j = (bv / V) * C + c;
        const double p = segloss_sigmoid(ld(logits, i)), t = targets[i];
        const double in = stats[2 * j], s1 = stats[2 * j + 1];
        const double ddice = -2.0 * (t * s1 - 2.0 * in * p) / (s1 * s1 * nc);
        st(grad, i, (float)(k * ((p - t) / count + ddice * p * (1.0 - p))));
    }
}
extern "C" __global__ void segloss_backward_f32(const float* logits, const float* targets, const float* roi, const double* stats, const float* dloss, float* grad, i64 V, int N, int C) {
    segloss_backward(logits, targets, roi, stats, dloss, grad, V, N, C);
}
extern "C" __global__ void segloss_backward_bf16(const bf16* logits, const float* targets, const float* roi, const double* stats, const float* dloss, bf16* grad, i64 V, int N, int C) {
    segloss_backward(logits, targets, roi, stats, dloss, grad, V, N, C);
}
