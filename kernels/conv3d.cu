// 3-D convolution, stride 1, kernel k in {1, 3}, zero padding (k - 1) / 2, as implicit GEMMs.
//
// Layout: x [N, X, Y, Z, Ci] channels-last (f32 or bf16), w [Co, k, k, k, Ci] f32 ("KRSC",
// i.e. a row-major [Co, K] matrix with K = k^3 * Ci, tap-major), y [N, X, Y, Z, Co].
// The implicit im2col matrix has one row per voxel m and one column per (tap t, channel c);
// tap t = (a, b, c) reads voxel m + (a - r, b - r, c - r), r = (k - 1) / 2, or 0 outside.
//
//   forward:         y[m, co]  = sum_{t, ci} x[m + d_t, ci] * w[co, t, ci] (+ bias[co])   (=)
//   backward input:  dx[m, ci] = sum_{t, co} dy[m - d_t, co] * w[co, t, ci]               (=)
//   backward weight: dw[co, t, ci] = sum_m dy[m, co] * x[m + d_t, ci]                      (=)
//     split-K over the voxels: grid.z splits each write a partial [Co, K] (=), then
//     conv3d_reduce_splits sums the partials in a fixed order (deterministic).
//
// One generic tiled GEMM (gemm_tiles) serves all three: 64x64 output tile per block of 256
// threads, 4x4 outputs per thread, K in steps of 16 through shared memory, fp32 accumulation.
// Operands are read through small functors that gather from the volume with bounds checks.
// Straightforward by design (correct first); faster variants belong in a lab beside this file.
#include "common.cuh"

#define BM 64
#define BN 64
#define BK 16
#define CONV_THREADS 256

// Implicit im2col: element (voxel m, column kk = tap * C + c) of the volume v [N, X, Y, Z, C],
// read at m + sign * d_tap.
template <typename T>
struct VolGather {
    const T* v;
    int X, Y, Z, C, k, sign;
    __device__ float operator()(i64 m, i64 kk) const {
        int t = (int)(kk / C), c = (int)(kk - (i64)t * C);
        int r = (k - 1) / 2;
        int da = t / (k * k) - r, db = (t / k) % k - r, dc = t % k - r;
        i64 q = m;
        int z = (int)(q % Z); q /= Z;
        int y = (int)(q % Y); q /= Y;
        int x = (int)(q % X);
        i64 n = q / X;
        int xi = x + sign * da, yi = y + sign * db, zi = z + sign * dc;
        if (xi < 0 || xi >= X || yi < 0 || yi >= Y || zi < 0 || zi >= Z) return 0.f;
        return ld(v, (((n * X + xi) * Y + yi) * (i64)Z + zi) * C + c);
    }
};

// B(kk, co) = w[co * K + kk]: the weight as a [K, Co] operand (kk fastest in memory).
struct WeightT {
    const float* w;
    i64 K;
    __device__ float operator()(i64 kk, i64 co) const { return w[co * K + kk]; }
};

// B(kk = t * Co + co, ci) = w[(co * taps + t) * Ci + ci] (ci fastest in memory).
struct WeightFlip {
    const float* w;
    int taps, Ci, Co;
    __device__ float operator()(i64 kk, i64 ci) const {
        int t = (int)(kk / Co), co = (int)(kk - (i64)t * Co);
        return w[((i64)co * taps + t) * Ci + ci];
    }
};

// A(co, m) = dy[m * Co + co] (co fastest in memory).
template <typename T>
struct RowsT {
    const T* dy;
    int Co;
    __device__ float operator()(i64 co, i64 m) const { return ld(dy, m * Co + co); }
};

// B(m, kk) = gather(m, kk): the im2col matrix itself as the right operand.
template <typename T>
struct GatherAsB {
    VolGather<T> g;
    __device__ float operator()(i64 m, i64 kk) const { return g(m, kk); }
};

// acc += A[m0 .. m0+64, k0 .. k1] * B[k0 .. k1, n0 .. n0+64] for this thread's 4x4 outputs
// (rows (tid / 16) * 4 + i, columns (tid % 16) * 4 + j of the tile). A_M_FAST / B_N_FAST say
// which index is contiguous in memory, so that neighbouring threads load neighbouring values.
template <bool A_M_FAST, bool B_N_FAST, class FA, class FB>
__device__ void gemm_tiles(const FA& fa, const FB& fb, i64 M, i64 N, i64 k0, i64 k1, i64 m0, i64 n0, float acc[4][4]) {
    __shared__ float As[BK][BM + 4];
    __shared__ float Bs[BK][BN + 4];
    const int tid = threadIdx.x, tr = tid / 16, tc = tid % 16;
    for (i64 kb = k0; kb < k1; kb += BK) {
        for (int e = tid; e < BM * BK; e += CONV_THREADS) {
            int ml = A_M_FAST ? e % BM : e / BK;
            int kl = A_M_FAST ? e / BM : e % BK;
            i64 m = m0 + ml, kk = kb + kl;
            As[kl][ml] = (m < M && kk < k1) ? fa(m, kk) : 0.f;
        }
        for (int e = tid; e < BN * BK; e += CONV_THREADS) {
            int nl = B_N_FAST ? e % BN : e / BK;
            int kl = B_N_FAST ? e / BN : e % BK;
            i64 n = n0 + nl, kk = kb + kl;
            Bs[kl][nl] = (n < N && kk < k1) ? fb(kk, n) : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int kl = 0; kl < BK; ++kl) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) a[i] = As[kl][tr * 4 + i];
#pragma unroll
            for (int j = 0; j < 4; ++j) b[j] = Bs[kl][tc * 4 + j];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
}

// Hand this thread's 4x4 outputs (rows m0 + (tid / 16) * 4 + i, columns n0 + (tid % 16) * 4 + j)
// inside [0, M) x [0, N) to store(m, n, value).
template <class Store>
__device__ void store_tile(const float acc[4][4], i64 M, i64 N, i64 m0, i64 n0, Store store) {
    const int tr = threadIdx.x / 16, tc = threadIdx.x % 16;
    for (int i = 0; i < 4; ++i) {
        i64 m = m0 + tr * 4 + i;
        if (m >= M) continue;
        for (int j = 0; j < 4; ++j) {
            i64 n = n0 + tc * 4 + j;
            if (n < N) store(m, n, acc[i][j]);
        }
    }
}

// grid (ceil(M / 64), ceil(Co / 64)), block 256.
template <typename T>
__device__ void conv3d_forward(const T* x, const float* w, const float* bias, T* y, int nb, int X, int Y, int Z, int Ci, int Co, int k) {
    const i64 M = (i64)nb * X * Y * Z, K = (i64)k * k * k * Ci;
    const i64 m0 = (i64)blockIdx.x * BM, n0 = (i64)blockIdx.y * BN;
    float acc[4][4] = {};
    gemm_tiles<false, false>(VolGather<T>{x, X, Y, Z, Ci, k, 1}, WeightT{w, K}, M, Co, 0, K, m0, n0, acc);
    store_tile(acc, M, Co, m0, n0, [=](i64 m, i64 n, float v) { st(y, m * Co + n, v + (bias ? bias[n] : 0.f)); });
}
extern "C" __global__ void __launch_bounds__(CONV_THREADS) conv3d_forward_f32(const float* x, const float* w, const float* bias, float* y, int nb, int X, int Y, int Z, int Ci, int Co, int k) {
    conv3d_forward(x, w, bias, y, nb, X, Y, Z, Ci, Co, k);
}
extern "C" __global__ void __launch_bounds__(CONV_THREADS) conv3d_forward_bf16(const bf16* x, const float* w, const float* bias, bf16* y, int nb, int X, int Y, int Z, int Ci, int Co, int k) {
    conv3d_forward(x, w, bias, y, nb, X, Y, Z, Ci, Co, k);
}

// The forward of the first convolution, which reads the CT itself (Ci = 1) and where a 64 x 64
// GEMM tile would be mostly padding: k = 3, one thread per voxel and 16 output channels
// (blockIdx.y picks which 16), the 27 taps' weights of those 16 in shared memory as [tap][16],
// read as 16-byte broadcasts. Each sum runs over the taps in K order, taps outside the volume
// skipped (conv3d_forward adds their zeros: the same values), bias added last. Needs
// Co % 16 == 0 and fewer than 2^31 voxels (the launcher checks). grid (ceil(voxels / 256), Co / 16),
// block 256.
template <typename T>
__device__ void conv3d_forward_k3_c1(const T* x, const float* w, const float* bias, T* y, int nb, int X, int Y, int Z, int Co) {
    __shared__ __align__(16) float ws[27 * 16];
    const int co0 = blockIdx.y * 16, M = nb * X * Y * Z;
    for (int e = threadIdx.x; e < 27 * 16; e += blockDim.x) ws[e] = w[(co0 + e % 16) * 27 + e / 16];
    __syncthreads();
    // One voxel per thread, no grid-stride loop: across iterations the compiler would hoist
    // all 432 weights into registers and spill them.
    const int m = GRID_FIRST;
    if (m < M) {
        int q = m;
        const int zz = q % Z;
        q /= Z;
        const int yy = q % Y;
        q /= Y;
        const int xx = q % X;
        float acc[16];
#pragma unroll
        for (int j = 0; j < 16; ++j) acc[j] = 0.f;
#pragma unroll
        for (int t = 0; t < 27; ++t) {
            const int a = t / 9 - 1, b = t / 3 % 3 - 1, c = t % 3 - 1;
            if (xx + a < 0 || xx + a >= X || yy + b < 0 || yy + b >= Y || zz + c < 0 || zz + c >= Z) continue;
            const float v = ld(x, m + (a * Y + b) * Z + c);
#pragma unroll
            for (int j = 0; j < 16; j += 4) {
                const float4 w4 = *reinterpret_cast<const float4*>(ws + t * 16 + j);
                acc[j] = fmaf(v, w4.x, acc[j]);
                acc[j + 1] = fmaf(v, w4.y, acc[j + 1]);
                acc[j + 2] = fmaf(v, w4.z, acc[j + 2]);
                acc[j + 3] = fmaf(v, w4.w, acc[j + 3]);
            }
        }
        if (bias) {
#pragma unroll
            for (int j = 0; j < 16; ++j) acc[j] += bias[co0 + j];
        }
        T* out = y + (i64)m * Co + co0;
#pragma unroll
        for (int j = 0; j < 16; j += VEC_OF(T)) st_lanes(out + j, acc + j);
    }
}
extern "C" __global__ void __launch_bounds__(CONV_THREADS) conv3d_forward_k3_c1_f32(const float* x, const float* w, const float* bias, float* y, int nb, int X, int Y, int Z, int Co) {
    conv3d_forward_k3_c1(x, w, bias, y, nb, X, Y, Z, Co);
}
extern "C" __global__ void __launch_bounds__(CONV_THREADS) conv3d_forward_k3_c1_bf16(const bf16* x, const float* w, const float* bias, bf16* y, int nb, int X, int Y, int Z, int Co) {
    conv3d_forward_k3_c1(x, w, bias, y, nb, X, Y, Z, Co);
}

// dy [N, X, Y, Z, Co] -> dx [N, X, Y, Z, Ci]. grid (ceil(M / 64), ceil(Ci / 64)), block 256.
template <typename T>
__device__ void conv3d_backward_input(const T* dy, const float* w, T* dx, int nb, int X, int Y, int Z, int Ci, int Co, int k) {
    const int taps = k * k * k;
    const i64 M = (i64)nb * X * Y * Z, K = (i64)taps * Co;
    const i64 m0 = (i64)blockIdx.x * BM, n0 = (i64)blockIdx.y * BN;
    float acc[4][4] = {};
    gemm_tiles<false, true>(VolGather<T>{dy, X, Y, Z, Co, k, -1}, WeightFlip{w, taps, Ci, Co}, M, Ci, 0, K, m0, n0, acc);
    store_tile(acc, M, Ci, m0, n0, [=](i64 m, i64 n, float v) { st(dx, m * Ci + n, v); });
}
extern "C" __global__ void __launch_bounds__(CONV_THREADS) conv3d_backward_input_f32(const float* dy, const float* w, float* dx, int nb, int X, int Y, int Z, int Ci, int Co, int k) {
    conv3d_backward_input(dy, w, dx, nb, X, Y, Z, Ci, Co, k);
}
extern "C" __global__ void __launch_bounds__(CONV_THREADS) conv3d_backward_input_bf16(const bf16* dy, const float* w, bf16* dx, int nb, int X, int Y, int Z, int Ci, int Co, int k) {
    conv3d_backward_input(dy, w, dx, nb, X, Y, Z, Ci, Co, k);
}

// Partial weight gradients: part[s, co, kk] over voxels [s * chunk, (s + 1) * chunk).
// grid (ceil(K / 64), ceil(Co / 64), splits), block 256; chunk a multiple of 16.
template <typename T>
__device__ void conv3d_backward_weight(const T* x, const T* dy, float* part, int nb, int X, int Y, int Z, int Ci, int Co, int k, i64 chunk) {
    const i64 P = (i64)nb * X * Y * Z, K = (i64)k * k * k * Ci;
    const i64 k0 = (i64)blockIdx.z * chunk, k1 = min(P, k0 + chunk);
    const i64 m0 = (i64)blockIdx.y * BM, n0 = (i64)blockIdx.x * BN;
    float acc[4][4] = {};
    if (k0 < k1) {
        gemm_tiles<true, true>(RowsT<T>{dy, Co}, GatherAsB<T>{VolGather<T>{x, X, Y, Z, Ci, k, 1}}, Co, K, k0, k1, m0, n0, acc);
    }
    float* out = part + (i64)blockIdx.z * Co * K;
    store_tile(acc, Co, K, m0, n0, [=](i64 m, i64 n, float v) { out[m * K + n] = v; });
}
extern "C" __global__ void __launch_bounds__(CONV_THREADS) conv3d_backward_weight_f32(const float* x, const float* dy, float* part, int nb, int X, int Y, int Z, int Ci, int Co, int k, i64 chunk) {
    conv3d_backward_weight(x, dy, part, nb, X, Y, Z, Ci, Co, k, chunk);
}
extern "C" __global__ void __launch_bounds__(CONV_THREADS) conv3d_backward_weight_bf16(const bf16* x, const bf16* dy, float* part, int nb, int X, int Y, int Z, int Ci, int Co, int k, i64 chunk) {
    conv3d_backward_weight(x, dy, part, nb, X, Y, Z, Ci, Co, k, chunk);
}

// dw[i] = acc[i] + sum_s part[s * stride + i] for i < n <= stride (=); acc (nullable) is a
// gradient accumulated before (the other view's), added as autograd's add would. Block (W, S):
// W threads of V consecutive outputs each (so a warp reads 128 V contiguous bytes per split)
// and S slices of the splits; slice y sums splits y, y + S, y + 2 S, ... in order, then the S
// slice sums meet in a fixed tree: deterministic, and a top level with thousands of splits is
// summed by S threads per output, not one. grid ceil(n / (W V)); S a power of two, W S <= 256.
// _f32x4: V = 4, 16-byte accesses (n and stride multiples of 4, pointers 16-byte aligned).
template <int V>
__device__ void conv3d_reduce_splits_v(const float* part, const float* acc, float* dw, int splits, i64 n, i64 stride) {
    __shared__ __align__(16) float sums[256 * V];
    const i64 i = ((i64)blockIdx.x * blockDim.x + threadIdx.x) * V;
    const int S = blockDim.y, t = threadIdx.y * blockDim.x + threadIdx.x;
    float s[V];
#pragma unroll
    for (int j = 0; j < V; ++j) s[j] = 0.f;
    if (i < n) {
        const float* p = part + threadIdx.y * stride + i;
        const i64 step = (i64)S * stride;
        for (int z = threadIdx.y; z < splits; z += S, p += step) {
            float v[V];
            if (V == 4) {
                ld_lanes(p, v);
            } else {
                v[0] = *p;
            }
#pragma unroll
            for (int j = 0; j < V; ++j) s[j] += v[j];
        }
    }
#pragma unroll
    for (int j = 0; j < V; ++j) sums[t * V + j] = s[j];
    __syncthreads();
    for (int h = S / 2; h > 0; h >>= 1) {
        if ((int)threadIdx.y < h) {
#pragma unroll
            for (int j = 0; j < V; ++j) sums[t * V + j] += sums[(t + h * blockDim.x) * V + j];
        }
        __syncthreads();
    }
    if (threadIdx.y == 0 && i < n) {
#pragma unroll
        for (int j = 0; j < V; ++j) dw[i + j] = acc ? acc[i + j] + sums[t * V + j] : sums[t * V + j];
    }
}
extern "C" __global__ void conv3d_reduce_splits(const float* part, const float* acc, float* dw, int splits, i64 n, i64 stride) { conv3d_reduce_splits_v<1>(part, acc, dw, splits, n, stride); }
extern "C" __global__ void conv3d_reduce_splits_f32x4(const float* part, const float* acc, float* dw, int splits, i64 n, i64 stride) { conv3d_reduce_splits_v<4>(part, acc, dw, splits, n, stride); }
