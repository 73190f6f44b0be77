// 3-D convolution on tensor cores (sm_80+): bf16 activations and weights, fp32 accumulation,
// stride 1, k in {1, 3}, zero padding (k - 1) / 2, Ci a multiple of 16.
//
// Layout: x [N, X, Y, Z, Ci] bf16 (channels-last), w [Co, T, Ci] bf16 (T = k^3 taps,
// tap t = (a k + b) k + c reads voxel (x + a - r, y + b - r, z + c - r)), bias [Co] f32 or
// null, y [N, X, Y, Z, Co] bf16.                                                         (=)
//   y[v, co] = bias[co] + sum_{t, ci} x[v + d_t, ci] w[co, t, ci]
// The same kernel computes the input gradient of a convolution when given dy as x and the
// flipped, transposed weight wf[ci, t, co] = w[co, T - 1 - t, ci] (conv3d_weight_to_bf16).
//
// Algorithm: implicit GEMM (M = voxels, N = Co, K = T Ci) on mma.sync m16n8k16.
//   - A block of 128 threads (4 warps) owns a brick of 2 x 4 x 8 output voxels of one patch
//     and CO_TILE output channels. Warp w owns the 16 voxels with y = w (rows r = 8 x + z).
//   - The brick's halo ((2 + 2r) x (4 + 2r) x (8 + 2r) voxels) is brought into shared memory
//     once per chunk of 16 or 32 input channels with cp.async (zero-filled outside the
//     volume: that is the padding); the 27 taps are then shifted views of it: for tap
//     (a, b, c) a lane's ldmatrix row address is its row's halo voxel plus a constant offset.
//   - The kernel size k (1 or 3) and the chunk width (16 or 32 channels) are template
//     parameters, so the 27 taps unroll with compile-time shared-memory offsets: a tap is one
//     ldmatrix and, per n-tile, one address and two loads per k-step around its HMMAs. No
//     integer division after the block's setup.
//   - B fragments (weights) are read from global memory (L1/L2-resident: the whole weight is
//     at most a few MiB and every block reads the same) as 32-bit pairs of channels, from
//     per-lane row pointers set up once and a 32-bit tap offset.
//   - Epilogue: + bias, round to bf16 once, store the voxels and channels inside the volume.
//
// Fusions of the ResBlock (REFERENCE.md §3; each off when its pointer is null). `bn` tables are
// f32 [3, C] (mean, invstd gamma, beta: bn_affine_table), applied by common.cuh's bn_relu_value
// exactly as bn_apply does, so a fused value is bit-identical to the unfused one.
//   - in_bn [3, Ci]: the convolution reads relu(bn(x)) instead of x. The halo is loaded with
//     16-byte loads, transformed in registers and stored; voxels outside the volume stay zero
//     (the padding of relu(bn(x)), not of x).
//   - residual [.., Co] bf16: y = conv + bias + residual, rounded once (the skip connection).
//     With rX > 0 the residual lives on the half-resolution grid [N, rX, rY, rZ, Co] and is
//     read at (x / 2, y / 2, z / 2): y = conv + bias + upsample2(residual), the FPN decoder's
//     lateral merge (nearest x2 upsample cropped to this grid) without the upsampled tensor.
//   - mask_h [.., Co] bf16 with mask_bn [3, Co]: y = round(conv) where bn(mask_h) > 0, else 0:
//     the ReLU backward of a = relu(bn(h)) on an input gradient, without a.
//   - part [bricks, 2 Co] f32 (=), one row per brick (blockIdx.x), each (brick, channel)
//     written by exactly one block: with mask_h, part = (sum g, sum g (h - mean)) of the
//     stored g (BatchNorm's backward sums); otherwise part = (sum (y - s), sum (y - s)^2) of
//     the stored y with the shift s = bias[co] (0 without bias): BatchNorm's statistics of y.
//     Per brick: lanes' values, then a fixed xor-shuffle tree over the 8 lanes that share
//     columns, then the 4 warps in warp order. col_partials mode 0 reduces the rows in f64.
//
// The weight gradient (conv3d_tc_backward_weight) is a second GEMM, M = Co, N = T Ci,
// K = voxels, split over K deterministically:
//   part[s, co, t, ci] = sum over the bricks of split s of sum_v dy[v, co] x[v + d_t, ci]  (=)
// and conv3d_reduce_splits (conv3d.cu) sums the splits in order into dw[co, t, ci]. With
// db_part, the blocks of input-channel tile 0 also write (=) db_part[s, co] = the sum of dy
// over their bricks (f64), which reduce_chunks sums in split order into the bias gradient.
//   - A block of 128 threads owns 16 output channels (co0), 16 input channels (ci0) and a run
//     of consecutive bricks (2 x 4 x 8 voxels, all patches in one sequence). Per brick it loads
//     the x halo of its 16 channels (cp.async, zero outside the volume) and dy of the brick's
//     64 voxels (zero outside), then: A = dy^T (16 channels x 16 voxels, four k-steps per
//     brick, fragments read once per brick), B = the halo at the tap's shift (16 voxels x 8
//     channels, two n-tiles). Warp w owns taps w, w + 4, ... (at most 7 of 27, 56 f32
//     accumulators per lane). For k = 1 (one tap) warp w owns k-step w instead, and the four
//     warps' sums are added in warp order through shared memory.
//   - Both operands are stored with the GEMM's k (voxels) along their rows, so each fragment
//     is one ldmatrix .trans: A once per k-step and brick, B (both n-tiles) once per tap and
//     k-step, from row addresses fixed per lane; k is a template parameter (one entry per
//     kernel size), the warp's tap offsets are computed once, before the loop.
#include "mma.cuh"

#define TC_BX 2
#define TC_BY 4
#define TC_BZ 8
#define TC_THREADS 128
// Halo of a 3x3x3 brick, and the padded channel stride of a halo voxel (16-byte rows,
// offset by 16 bytes per voxel so that ldmatrix rows fall in different banks).
#define TC_HALO ((TC_BX + 2) * (TC_BY + 2) * (TC_BZ + 2))
#define TC_CK 32
#define TC_STRIDE (TC_CK + 8)

// Loads a brick's halo: voxel hv of the (TC_BX + 2r) x HY x HZ box whose corner is
// (x0 - r, y0 - r, z0 - r) of patch n gets `pieces` 16-byte runs of 8 channels from ci0 at
// halo[hv * stride + 8 piece]; voxels outside the volume get zeros (the convolution's
// padding). Without `bn` the copies are queued (cp.async, not yet committed); with `bn` (a
// shared [3][bn_width] table for channels ci0 ...) they are loaded, mapped through
// bn_relu_value and stored at once.
__device__ __forceinline__ void halo_load(bf16* halo, int stride, int pieces, const bf16* x, int n, int x0, int y0, int z0, int r, int HY, int HZ, int HV, int X,
                                          int Y, int Z, int Ci, int ci0, const float* bn, int bn_width) {
    for (int e = threadIdx.x; e < HV * pieces; e += TC_THREADS) {
        const int hv = e / pieces, piece = e % pieces;
        const int hz = hv % HZ, hy = (hv / HZ) % HY, hx = hv / (HZ * HY);
        const int gx = x0 + hx - r, gy = y0 + hy - r, gz = z0 + hz - r;
        const bool inside = gx >= 0 && gx < X && gy >= 0 && gy < Y && gz >= 0 && gz < Z;
        const bf16* src = inside ? x + voxel_offset(n, gx, gy, gz, X, Y, Z, Ci, ci0 + piece * 8) : x;
        bf16* dst = &halo[hv * stride + piece * 8];
        if (!bn) {
            cp_async_16(dst, src, inside ? 16 : 0);
            continue;
        }
        // Through memcpy, not a bf16 pointer into the uint4: no strict-aliasing hazard.
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (inside) {
            v = ld_vec16(src);
            bf16 h[8];
            memcpy(h, &v, 16);
            for (int j = 0; j < 8; ++j) {
                const int c = piece * 8 + j;
                h[j] = __float2bfloat16_rn(bn_relu_value(__bfloat162float(h[j]), bn[c], bn[bn_width + c], bn[2 * bn_width + c]));
            }
            memcpy(&v, h, 16);
        }
        st_vec16(dst, v);
    }
}

// tab[3][width] (shared) = channels c0 ... c0 + width of the [3, C] table src (all threads
// call it; followed by a barrier).
__device__ __forceinline__ void bn_table_load(float* tab, const float* src, int C, int c0, int width) {
    for (int e = threadIdx.x; e < 3 * width; e += TC_THREADS) tab[e] = src[(e / width) * C + c0 + e % width];
    __syncthreads();
}


// The block's shared memory, declared once in the kernel entry (each template instantiation
// of a __shared__ variable would be an array of its own).
template <int CO_TILE>
struct TcForwardShared {
    bf16 halo[TC_HALO * TC_STRIDE];
    float bn_tab[3 * TC_CK];
    float red[4][CO_TILE][2];
};

template <int CO_TILE, int K, int CK>
__device__ void conv3d_tc_forward_kc(TcForwardShared<CO_TILE>& sh, const bf16* x, const bf16* w, const float* bias, bf16* y, int nb, int X, int Y, int Z, int Ci, int Co,
                                     const float* in_bn, const bf16* residual, int rX, int rY, int rZ, const bf16* mask_h, const float* mask_bn, float* part) {
    bf16* halo = sh.halo;
    float* bn_tab = sh.bn_tab;
    constexpr int r = (K - 1) / 2, T = K * K * K;
    constexpr int HY = TC_BY + 2 * r, HZ = TC_BZ + 2 * r, HV = (TC_BX + 2 * r) * HY * HZ;
    // The block's brick: patch n, corner (x0, y0, z0); channels co0 ...
    const int bxn = (X + TC_BX - 1) / TC_BX, byn = (Y + TC_BY - 1) / TC_BY, bzn = (Z + TC_BZ - 1) / TC_BZ;
    i64 b = blockIdx.x;
    const int bz = (int)(b % bzn);
    b /= bzn;
    const int by = (int)(b % byn);
    b /= byn;
    const int bx = (int)(b % bxn);
    const i64 n = b / bxn;
    const int x0 = bx * TC_BX, y0 = by * TC_BY, z0 = bz * TC_BZ, co0 = blockIdx.y * CO_TILE;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    // This lane's ldmatrix row: voxel row (lane % 16) of the warp, channel half lane / 16.
    const int row = lane % 16;
    const int lane_voxel = ((row / 8) * HY + warp) * HZ + (row % 8);
    const int lane_half = (lane / 16) * 8;
    const int g = lane >> 2, tg = lane & 3;
    // This lane's weight rows (column co0 + 8 j + g of B, channel pair 2 tg); a column past Co
    // reads row 0 and is zeroed.
    const bf16* wrow[CO_TILE / 8];
    bool wok[CO_TILE / 8];
#pragma unroll
    for (int j = 0; j < CO_TILE / 8; ++j) {
        const int co = co0 + 8 * j + g;
        wok[j] = co < Co;
        wrow[j] = w + (i64)(wok[j] ? co : 0) * T * Ci + 2 * tg;
    }
    float acc[CO_TILE / 8][4];
#pragma unroll
    for (int j = 0; j < CO_TILE / 8; ++j)
        for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;
    for (int ci0 = 0; ci0 < Ci; ci0 += CK) {
        // Halo of channels [ci0, ci0 + CK): 16-byte pieces, zero outside the volume.
        if (in_bn) bn_table_load(bn_tab, in_bn, Ci, ci0, CK);
        halo_load(halo, TC_STRIDE, CK / 8, x, n, x0, y0, z0, r, HY, HZ, HV, X, Y, Z, Ci, ci0, in_bn ? bn_tab : nullptr, CK);
        cp_async_commit();
        cp_async_wait_all();
        __syncthreads();
        const bf16* hrow = &halo[lane_voxel * TC_STRIDE + lane_half];
        // Rows (a, b) of taps, each row's K taps unrolled; the 16-channel tile unrolls all
        // rows too (wider tiles would run out of registers holding the loads in flight).
        constexpr int ROWS_UNROLLED = CO_TILE == 16 ? K * K : 1;
#pragma unroll ROWS_UNROLLED
        for (int ab = 0; ab < K * K; ++ab) {
            const int row_tap = ((ab / K) * HY + ab % K) * HZ;
#pragma unroll
            for (int c = 0; c < K; ++c) {
                const int wo = (ab * K + c) * Ci + ci0;
#pragma unroll
                for (int kk = 0; kk < CK; kk += 16) {
                    uint32_t a[4];
                    ldmatrix_x4(a, hrow + (row_tap + c) * TC_STRIDE + kk);
#pragma unroll
                    for (int j = 0; j < CO_TILE / 8; ++j) {
                        const bf16* p = wrow[j] + wo + kk;
                        uint32_t bb[2];
                        bb[0] = wok[j] ? *(const uint32_t*)p : 0u;
                        bb[1] = wok[j] ? *(const uint32_t*)(p + 8) : 0u;
                        mma_bf16_16816(acc[j], a, bb, acc[j]);
                    }
                }
            }
        }
        __syncthreads();  // the halo is overwritten by the next chunk
    }
    // Epilogue; s1/s2: this lane's partial sums of its two columns of each n-tile.
    float s1[CO_TILE / 8][2], s2[CO_TILE / 8][2];
#pragma unroll
    for (int j = 0; j < CO_TILE / 8; ++j) {
#pragma unroll
        for (int h = 0; h < 2; ++h) s1[j][h] = s2[j][h] = 0.f;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int m = mma_c_row(lane, e), co = co0 + 8 * j + mma_c_col(lane, e);
            const int vx = x0 + m / 8, vy = y0 + warp, vz = z0 + m % 8;
            if (co < Co && vx < X && vy < Y && vz < Z) {
                const i64 o = voxel_offset(n, vx, vy, vz, X, Y, Z, Co, co);
                float v = acc[j][e] + (bias ? bias[co] : 0.f);
                if (residual) v += __bfloat162float(residual[rX ? voxel_offset(n, vx / 2, vy / 2, vz / 2, rX, rY, rZ, Co, co) : o]);
                bf16 out = __float2bfloat16_rn(v);
                if (mask_h) {
                    const float h = __bfloat162float(mask_h[o]);
                    if (!(bn_affine_value(h, mask_bn[co], mask_bn[Co + co], mask_bn[2 * Co + co]) > 0.f)) out = __float2bfloat16_rn(0.f);
                    const float gv = __bfloat162float(out);
                    s1[j][e & 1] += gv;
                    s2[j][e & 1] += gv * (h - mask_bn[co]);
                } else {
                    const float d = __bfloat162float(out) - (bias ? bias[co] : 0.f);
                    s1[j][e & 1] += d;
                    s2[j][e & 1] += d * d;
                }
                y[o] = out;
            }
        }
    }
    if (!part) return;
    // Columns 8 j + 2 tg + h are shared by the lanes with the same tg: sum over g (lane bits 2-4).
    auto& red = sh.red;
#pragma unroll
    for (int j = 0; j < CO_TILE / 8; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            for (int off = 4; off < 32; off <<= 1) {
                s1[j][h] += __shfl_xor_sync(0xffffffffu, s1[j][h], off);
                s2[j][h] += __shfl_xor_sync(0xffffffffu, s2[j][h], off);
            }
            if (g == 0) {
                red[warp][8 * j + 2 * tg + h][0] = s1[j][h];
                red[warp][8 * j + 2 * tg + h][1] = s2[j][h];
            }
        }
    __syncthreads();
    for (int c = tid; c < CO_TILE; c += TC_THREADS) {
        if (co0 + c >= Co) continue;
        float* row_out = part + (i64)blockIdx.x * 2 * Co + co0 + c;
        row_out[0] = ((red[0][c][0] + red[1][c][0]) + red[2][c][0]) + red[3][c][0];
        row_out[Co] = ((red[0][c][1] + red[1][c][1]) + red[2][c][1]) + red[3][c][1];
    }
}

// Entry points, one per (output tile, k, chunk width), so that each launch's machine code is
// its own (the plan reads it per kernel): conv3d_tc_forward_co{16,32,64}_k{1,3}_c{16,32}.
// grid (N * ceil(X / 2) * ceil(Y / 4) * ceil(Z / 8), ceil(Co / CO_TILE)), block 128; k is
// the entry's (the argument is kept for one launch signature); c32 needs Ci % 32 == 0.
extern "C" __global__ void __launch_bounds__(TC_THREADS) conv3d_tc_forward_co16_k1_c16(const bf16* x, const bf16* w, const float* bias, bf16* y, int nb, int X, int Y, int Z, int Ci, int Co, int k, const float* in_bn, const bf16* residual, int rX, int rY, int rZ, const bf16* mask_h, const float* mask_bn, float* part) {
    __shared__ __align__(16) TcForwardShared<16> sh;
    conv3d_tc_forward_kc<16, 1, 16>(sh, x, w, bias, y, nb, X, Y, Z, Ci, Co, in_bn, residual, rX, rY, rZ, mask_h, mask_bn, part);
}
extern "C" __global__ void __launch_bounds__(TC_THREADS) conv3d_tc_forward_co16_k1_c32(const bf16* x, const bf16* w, const float* bias, bf16* y, int nb, int X, int Y, int Z, int Ci, int Co, int k, const float* in_bn, const bf16* residual, int rX, int rY, int rZ, const bf16* mask_h, const float* mask_bn, float* part) {
    __shared__ __align__(16) TcForwardShared<16> sh;
    conv3d_tc_forward_kc<16, 1, 32>(sh, x, w, bias, y, nb, X, Y, Z, Ci, Co, in_bn, residual, rX, rY, rZ, mask_h, mask_bn, part);
}
extern "C" __global__ void __launch_bounds__(TC_THREADS) conv3d_tc_forward_co16_k3_c16(const bf16* x, const bf16* w, const float* bias, bf16* y, int nb, int X, int Y, int Z, int Ci, int Co, int k, const float* in_bn, const bf16* residual, int rX, int rY, int rZ, const bf16* mask_h, const float* mask_bn, float* part) {
    __shared__ __align__(16) TcForwardShared<16> sh;
    conv3d_tc_forward_kc<16, 3, 16>(sh, x, w, bias, y, nb, X, Y, Z, Ci, Co, in_bn, residual, rX, rY, rZ, mask_h, mask_bn, part);
}
extern "C" __global__ void __launch_bounds__(TC_THREADS) conv3d_tc_forward_co16_k3_c32(const bf16* x, const bf16* w, const float* bias, bf16* y, int nb, int X, int Y, int Z, int Ci, int Co, int k, const float* in_bn, const bf16* residual, int rX, int rY, int rZ, const bf16* mask_h, const float* mask_bn, float* part) {
    __shared__ __align__(16) TcForwardShared<16> sh;
    conv3d_tc_forward_kc<16, 3, 32>(sh, x, w, bias, y, nb, X, Y, Z, Ci, Co, in_bn, residual, rX, rY, rZ, mask_h, mask_bn, part);
}
extern "C" __global__ void __launch_bounds__(TC_THREADS) conv3d_tc_forward_co32_k1_c16(const bf16* x, const bf16* w, const float* bias, bf16* y, int nb, int X, int Y, int Z, int Ci, int Co, int k, const float* in_bn, const bf16* residual, int rX, int rY, int rZ, const bf16* mask_h, const float* mask_bn, float* part) {
    __shared__ __align__(16) TcForwardShared<32> sh;
    conv3d_tc_forward_kc<32, 1, 16>(sh, x, w, bias, y, nb, X, Y, Z, Ci, Co, in_bn, residual, rX, rY, rZ, mask_h, mask_bn, part);
}
extern "C" __global__ void __launch_bounds__(TC_THREADS) conv3d_tc_forward_co32_k1_c32(const bf16* x, const bf16* w, const float* bias, bf16* y, int nb, int X, int Y, int Z, int Ci, int Co, int k, const float* in_bn, const bf16* residual, int rX, int rY, int rZ, const bf16* mask_h, const float* mask_bn, float* part) {
    __shared__ __align__(16) TcForwardShared<32> sh;
    conv3d_tc_forward_kc<32, 1, 32>(sh, x, w, bias, y, nb, X, Y, Z, Ci, Co, in_bn, residual, rX, rY, rZ, mask_h, mask_bn, part);
}
extern "C" __global__ void __launch_bounds__(TC_THREADS) conv3d_tc_forward_co32_k3_c16(const bf16* x, const bf16* w, const float* bias, bf16* y, int nb, int X, int Y, int Z, int Ci, int Co, int k, const float* in_bn, const bf16* residual, int rX, int rY, int rZ, const bf16* mask_h, const float* mask_bn, float* part) {
    __shared__ __align__(16) TcForwardShared<32> sh;
    conv3d_tc_forward_kc<32, 3, 16>(sh, x, w, bias, y, nb, X, Y, Z, Ci, Co, in_bn, residual, rX, rY, rZ, mask_h, mask_bn, part);
}
extern "C" __global__ void __launch_bounds__(TC_THREADS) conv3d_tc_forward_co32_k3_c32(const bf16* x, const bf16* w, const float* bias, bf16* y, int nb, int X, int Y, int Z, int Ci, int Co, int k, const float* in_bn, const bf16* residual, int rX, int rY, int rZ, const bf16* mask_h, const float* mask_bn, float* part) {
    __shared__ __align__(16) TcForwardShared<32> sh;
    conv3d_tc_forward_kc<32, 3, 32>(sh, x, w, bias, y, nb, X, Y, Z, Ci, Co, in_bn, residual, rX, rY, rZ, mask_h, mask_bn, part);
}
extern "C" __global__ void __launch_bounds__(TC_THREADS) conv3d_tc_forward_co64_k1_c16(const bf16* x, const bf16* w, const float* bias, bf16* y, int nb, int X, int Y, int Z, int Ci, int Co, int k, const float* in_bn, const bf16* residual, int rX, int rY, int rZ, const bf16* mask_h, const float* mask_bn, float* part) {
    __shared__ __align__(16) TcForwardShared<64> sh;
    conv3d_tc_forward_kc<64, 1, 16>(sh, x, w, bias, y, nb, X, Y, Z, Ci, Co, in_bn, residual, rX, rY, rZ, mask_h, mask_bn, part);
}
extern "C" __global__ void __launch_bounds__(TC_THREADS) conv3d_tc_forward_co64_k1_c32(const bf16* x, const bf16* w, const float* bias, bf16* y, int nb, int X, int Y, int Z, int Ci, int Co, int k, const float* in_bn, const bf16* residual, int rX, int rY, int rZ, const bf16* mask_h, const float* mask_bn, float* part) {
    __shared__ __align__(16) TcForwardShared<64> sh;
    conv3d_tc_forward_kc<64, 1, 32>(sh, x, w, bias, y, nb, X, Y, Z, Ci, Co, in_bn, residual, rX, rY, rZ, mask_h, mask_bn, part);
}
extern "C" __global__ void __launch_bounds__(TC_THREADS) conv3d_tc_forward_co64_k3_c16(const bf16* x, const bf16* w, const float* bias, bf16* y, int nb, int X, int Y, int Z, int Ci, int Co, int k, const float* in_bn, const bf16* residual, int rX, int rY, int rZ, const bf16* mask_h, const float* mask_bn, float* part) {
    __shared__ __align__(16) TcForwardShared<64> sh;
    conv3d_tc_forward_kc<64, 3, 16>(sh, x, w, bias, y, nb, X, Y, Z, Ci, Co, in_bn, residual, rX, rY, rZ, mask_h, mask_bn, part);
}
extern "C" __global__ void __launch_bounds__(TC_THREADS) conv3d_tc_forward_co64_k3_c32(const bf16* x, const bf16* w, const float* bias, bf16* y, int nb, int X, int Y, int Z, int Ci, int Co, int k, const float* in_bn, const bf16* residual, int rX, int rY, int rZ, const bf16* mask_h, const float* mask_bn, float* part) {
    __shared__ __align__(16) TcForwardShared<64> sh;
    conv3d_tc_forward_kc<64, 3, 32>(sh, x, w, bias, y, nb, X, Y, Z, Ci, Co, in_bn, residual, rX, rY, rZ, mask_h, mask_bn, part);
}

#define TCW_STRIDE 24  // a halo voxel's 16 channels, padded to 48 bytes (16-byte aligned)
#define TCW_TAPS 7      // taps per warp: ceil(27 / 4)

// VEC: dy is loaded as 16-byte pieces (Co a multiple of 8), else value by value.
template <int K, bool VEC>
__device__ void conv3d_tc_backward_weight_k(const bf16* x, const bf16* dy, float* part, int nb, int X, int Y, int Z, int Ci, int Co, i64 per_split, const float* in_bn,
                                            double* db_part) {
    __shared__ __align__(16) bf16 halo[TC_HALO * TCW_STRIDE];
    __shared__ float bn_tab[3 * 16];
    __shared__ __align__(16) bf16 dys[64][16];
    __shared__ float red[4][16][16];
    constexpr int r = (K - 1) / 2, T = K * K * K;
    constexpr int HY = TC_BY + 2 * r, HZ = TC_BZ + 2 * r, HV = (TC_BX + 2 * r) * HY * HZ;
    constexpr bool one_tap = T == 1;
    const int bxn = (X + TC_BX - 1) / TC_BX, byn = (Y + TC_BY - 1) / TC_BY, bzn = (Z + TC_BZ - 1) / TC_BZ;
    const i64 bricks = (i64)nb * bxn * byn * bzn;
    const i64 b_begin = (i64)blockIdx.x * per_split, b_end = min(bricks, b_begin + per_split);
    const int co0 = blockIdx.y * 16, ci0 = blockIdx.z * 16;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    if (in_bn) bn_table_load(bn_tab, in_bn, Ci, ci0, 16);
    // The bias gradient rides along: blocks of the first input-channel tile sum their dy tiles
    // (thread c < 16: channel co0 + c; f32 per brick, f64 across bricks).
    const bool bias_sums = db_part && blockIdx.z == 0;
    double db_acc = 0.0;
    // Fragments by ldmatrix .trans, row addresses fixed per lane (brick voxel p = (vx * 4 + vy)
    // * 8 + vz, k-step s = voxels [16 s, 16 s + 16)). Matrix m = lane / 8, row lane % 8:
    //   A (dy^T, 16 channels x 16 voxels): matrix m holds voxels 16 s + 8 (m >> 1) + row,
    //     channels 8 (m & 1) ...: dys[voxel][channel] has the voxels (A's k) along its rows;
    //   B (the halo at a tap's shift, 16 voxels x 2 n-tiles of 8 channels): matrix m holds
    //     voxels 16 s + 8 (m & 1) + row, channels 8 (m >> 1) ...; registers (0, 1) are n-tile
    //     0's B fragment, (2, 3) n-tile 1's.
    const int m = lane >> 3, mrow = lane & 7;
    int a_row[4], b_row[4];
#pragma unroll
    for (int s = 0; s < 4; ++s) {
        a_row[s] = (16 * s + 8 * (m >> 1) + mrow) * 16 + 8 * (m & 1);
        const int p = 16 * s + 8 * (m & 1) + mrow;
        b_row[s] = (((p / 32) * HY + (p / 8) % 4) * HZ + p % 8) * TCW_STRIDE + 8 * (m >> 1);
    }
    // This warp's taps w, w + 4, ... as halo offsets (k = 1: the one tap, and k-step w).
    int tap_off[TCW_TAPS];
#pragma unroll
    for (int i = 0; i < TCW_TAPS; ++i) {
        const int t = one_tap ? 0 : warp + 4 * i;
        tap_off[i] = t < T ? ((t / (K * K)) * HY + (t / K) % K) * HZ + t % K : 0;
        tap_off[i] *= TCW_STRIDE;
    }
    float acc[TCW_TAPS][2][4];
#pragma unroll
    for (int i = 0; i < TCW_TAPS; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
    for (i64 b = b_begin; b < b_end; ++b) {
        i64 q = b;
        const int bz = (int)(q % bzn);
        q /= bzn;
        const int by = (int)(q % byn);
        q /= byn;
        const int bx = (int)(q % bxn);
        const i64 n = q / bxn;
        const int x0 = bx * TC_BX, y0 = by * TC_BY, z0 = bz * TC_BZ;
        halo_load(halo, TCW_STRIDE, 2, x, n, x0, y0, z0, r, HY, HZ, HV, X, Y, Z, Ci, ci0, in_bn ? bn_tab : nullptr, 16);
        cp_async_commit();
        if (VEC) {
            // dy's 64 voxels x 16 channels as 128 16-byte pieces, one per thread (zero outside
            // the volume and past Co).
            const int p = tid / 2, piece = tid % 2;
            const int vx = x0 + p / 32, vy = y0 + (p / 8) % 4, vz = z0 + p % 8, co = co0 + 8 * piece;
            const bool inside = vx < X && vy < Y && vz < Z && co < Co;
            cp_async_16(&dys[p][8 * piece], inside ? dy + voxel_offset(n, vx, vy, vz, X, Y, Z, Co, co) : dy, inside ? 16 : 0);
            cp_async_commit();
        } else {
            for (int e = tid; e < 64 * 16; e += TC_THREADS) {
                const int p = e / 16, mm = e % 16;
                const int vx = x0 + p / 32, vy = y0 + (p / 8) % 4, vz = z0 + p % 8, co = co0 + mm;
                const bool inside = vx < X && vy < Y && vz < Z && co < Co;
                dys[p][mm] = inside ? dy[voxel_offset(n, vx, vy, vz, X, Y, Z, Co, co)] : __float2bfloat16_rn(0.f);
            }
        }
        cp_async_wait_all();
        __syncthreads();
        if (bias_sums && tid < 16) {
            float sb = 0.f;
            for (int p = 0; p < 64; ++p) sb += __bfloat162float(dys[p][tid]);
            db_acc += (double)sb;
        }
        uint32_t a[4][4];
#pragma unroll
        for (int s = 0; s < 4; ++s) ldmatrix_x4_trans(a[s], &dys[0][0] + a_row[s]);
#pragma unroll
        for (int i = 0; i < TCW_TAPS; ++i) {
            if (one_tap ? i > 0 : warp + 4 * i >= T) break;
#pragma unroll
            for (int s = 0; s < 4; ++s) {
                if (one_tap && s != warp) continue;
                uint32_t bb[4];
                ldmatrix_x4_trans(bb, halo + b_row[s] + tap_off[i]);
                mma_bf16_16816(acc[i][0], a[s], &bb[0], acc[i][0]);
                mma_bf16_16816(acc[i][1], a[s], &bb[2], acc[i][1]);
            }
        }
        __syncthreads();  // the halo and dy tiles are overwritten by the next brick
    }
    if (bias_sums && tid < 16 && co0 + tid < Co) db_part[(i64)blockIdx.x * Co + co0 + tid] = db_acc;
    float* out = part + (i64)blockIdx.x * Co * T * Ci;
    if (!one_tap) {
#pragma unroll
        for (int i = 0; i < TCW_TAPS; ++i) {
            const int t = warp + 4 * i;
            if (t >= T) break;
#pragma unroll
            for (int j = 0; j < 2; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int co = co0 + mma_c_row(lane, e), ci = ci0 + 8 * j + mma_c_col(lane, e);
                    if (co < Co) out[((i64)co * T + t) * Ci + ci] = acc[i][j][e];
                }
        }
    } else {
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) red[warp][mma_c_row(lane, e)][8 * j + mma_c_col(lane, e)] = acc[0][j][e];
        __syncthreads();
        for (int e = tid; e < 256; e += TC_THREADS) {
            const int mm = e / 16, c = e % 16;
            const float v = ((red[0][mm][c] + red[1][mm][c]) + red[2][mm][c]) + red[3][mm][c];
            if (co0 + mm < Co) out[(i64)(co0 + mm) * Ci + ci0 + c] = v;
        }
    }
}

// grid (splits, ceil(Co / 16), Ci / 16), block 128; `per_split` consecutive bricks per split.
// One entry per kernel size (k is the entry's; the argument keeps one launch signature) and
// dy load: _k1, _k3 need Co % 8 == 0 (16-byte pieces), _k1_any, _k3_any take any Co.
extern "C" __global__ void __launch_bounds__(TC_THREADS) conv3d_tc_backward_weight_k1(const bf16* x, const bf16* dy, float* part, int nb, int X, int Y, int Z, int Ci, int Co,
                                                                                     int k, i64 per_split, const float* in_bn, double* db_part) {
    conv3d_tc_backward_weight_k<1, true>(x, dy, part, nb, X, Y, Z, Ci, Co, per_split, in_bn, db_part);
}
extern "C" __global__ void __launch_bounds__(TC_THREADS) conv3d_tc_backward_weight_k1_any(const bf16* x, const bf16* dy, float* part, int nb, int X, int Y, int Z, int Ci, int Co,
                                                                                     int k, i64 per_split, const float* in_bn, double* db_part) {
    conv3d_tc_backward_weight_k<1, false>(x, dy, part, nb, X, Y, Z, Ci, Co, per_split, in_bn, db_part);
}
extern "C" __global__ void __launch_bounds__(TC_THREADS) conv3d_tc_backward_weight_k3(const bf16* x, const bf16* dy, float* part, int nb, int X, int Y, int Z, int Ci, int Co,
                                                                                     int k, i64 per_split, const float* in_bn, double* db_part) {
    conv3d_tc_backward_weight_k<3, true>(x, dy, part, nb, X, Y, Z, Ci, Co, per_split, in_bn, db_part);
}
extern "C" __global__ void __launch_bounds__(TC_THREADS) conv3d_tc_backward_weight_k3_any(const bf16* x, const bf16* dy, float* part, int nb, int X, int Y, int Z, int Ci, int Co,
                                                                                     int k, i64 per_split, const float* in_bn, double* db_part) {
    conv3d_tc_backward_weight_k<3, false>(x, dy, part, nb, X, Y, Z, Ci, Co, per_split, in_bn, db_part);
}

// The f32 weight [Co, T, Ci] as bf16, in the forward layout (flip = 0: out[co, t, ci]) or
// flipped and transposed for the input gradient (flip = 1: out[ci, t, co] = w[co, T-1-t, ci]).
// 32-bit index math: a weight has fewer than 2^31 values (the launcher checks).
extern "C" __global__ void conv3d_weight_to_bf16(const float* w, bf16* out, int Co, int T, int Ci, int flip) {
    const int n = Co * T * Ci;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const int ci = i % Ci, rest = i / Ci, t = rest % T, co = rest / T;
        const int dst = flip ? (ci * T + (T - 1 - t)) * Co + co : i;
        out[dst] = __float2bfloat16_rn(w[i]);
    }
}
