// InfoNCE on tensor cores (sm_80+): the same flash-style loss and gradient as infonce.cu
// (read that file's header for the formulas and the masking), with every dot product on
// mma.sync m16n8k16 as "bf16x3": each f32 operand is split as x = hi + lo (two bf16, hi =
// bf16(x), lo = bf16(x - hi), together ~16 mantissa bits) and a b ~ hi_a hi_b + hi_a lo_b +
// lo_a hi_b with f32 accumulation (the dropped lo_a lo_b is ~2^-16 relative). That keeps the
// logits within ~1e-5 of fp32 at three bf16 MMAs per product, where fp32 CUDA cores are 15x
// slower. Used for the bf16 precision; --precision fp32 keeps infonce.cu, the oracle on the GPU.
//
// Layout: hi, lo [2N, d] bf16 = split([e1; e2]) (infonce_split_bf16), d a multiple of 16, at
// most NTC_D. e1, e2 [N, d] f32, lse [2N] f64, diag [N] f64, de1, de2 [N, d] f32.
//
//   infonce_split_bf16: hi, lo of e1 (rows 0 .. N) and e2 (rows N .. 2N)                    (=)
//   infonce_tc_row_lse: grid (ceil(N / 64), 2), block 128. Block (r, v): rows i of view v,
//     16 per warp; every 64-column tile of both partner views is staged in shared memory
//     (hi and lo, cp.async, zero rows past N), the warp's 16 x 64 logit tile computed in
//     registers, and each row's (max, sum) updated once per tile (flash-attention style:
//     one exp per logit). The 4 lanes holding a row merge theirs in f64, fixed order.
//       lse[v N + i] = logsumexp_{p, j} s_vp(i, j),  diag[i] = s_01(i, i) (block (r, 0))    (=)
//   infonce_tc_backward: same grid. Per tile the logits are recomputed, turned into the
//     weights w_vp(i, j) of infonce.cu in registers, and the accumulator fragments of that
//     16 x 64 tile are reused as A fragments (split again into hi + lo) of a second GEMM with
//     the staged partner tile: out[i, :] += sum_j w(i, j) e_p[j, :].
//       de_v[i] = g (k out[i] - e_{1-v}[i] / (N t)),  k = 1 / (2 N t), g = dloss[0]           (=)
//     C -> A reuse: the m16n8 accumulators of n-tiles 2q and 2q + 1 hold, per lane, exactly
//     the elements the m16k16 A fragment of k-step q needs (rows g, g + 8; columns 2 t, 2 t + 1
//     of each n-tile), in the order of mma.cuh's mappings: A e = 0..3 <- C[2q] e = 0..3,
//     A e = 4..7 <- C[2q + 1] e = 0..3.
// Every sum is in a fixed order: deterministic, no atomics.
#include "mma.cuh"

#define NTC_ROWS 64
#define NTC_COLS 64
#define NTC_D 128
#define NTC_STRIDE (NTC_D + 8)  // bf16 per staged row: 16-byte rows, banks offset per row
#define NTC_THREADS 128

extern "C" __global__ void infonce_split_bf16(const float* e1, const float* e2, bf16* hi, bf16* lo, i64 nd) {
    GRID_STRIDE(i, 2 * nd) {
        const float x = i < nd ? e1[i] : e2[i - nd];
        const bf16 h = __float2bfloat16_rn(x);
        hi[i] = h;
        lo[i] = __float2bfloat16_rn(x - __bfloat162float(h));
    }
}

// Stage rows j0 .. j0 + 64 of view p (hi and lo, zeros past n) in shared memory; all threads.
__device__ __forceinline__ void ntc_stage_tile(bf16* Ph, bf16* Pl, const bf16* hi, const bf16* lo, int p, int j0, int n, int d) {
    const int pieces = d / 8;
    for (int e = threadIdx.x; e < NTC_COLS * pieces; e += NTC_THREADS) {
        const int c = e / pieces, piece = e % pieces, j = j0 + c;
        const i64 src = j < n ? ((i64)p * n + j) * d + 8 * piece : 0;
        cp_async_16(&Ph[c * NTC_STRIDE + 8 * piece], hi + src, j < n ? 16 : 0);
        cp_async_16(&Pl[c * NTC_STRIDE + 8 * piece], lo + src, j < n ? 16 : 0);
    }
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();
}

// acc[nt] (m16n8, nt = 0..7) = <X[row0 + m], P_tile[8 nt + c]> in bf16x3 for this warp's 16
// rows (rows past n read as zeros); X rows from global memory (L1-resident), P from the tile.
__device__ __forceinline__ void ntc_scores(const bf16* Xh, const bf16* Xl, int row0, int n, int d, const bf16* Ph, const bf16* Pl, float acc[8][4]) {
    const int lane = lane_id();
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
        for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;
    for (int k0 = 0; k0 < d; k0 += 16) {
        uint32_t ah[4], al[4];
        for (int h = 0; h < 4; ++h) {
            const int i = row0 + mma_a_row(lane, 2 * h), col = k0 + mma_a_col(lane, 2 * h);
            ah[h] = i < n ? *(const uint32_t*)&Xh[(i64)i * d + col] : 0u;
            al[h] = i < n ? *(const uint32_t*)&Xl[(i64)i * d + col] : 0u;
        }
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
            uint32_t bh[2], bl[2];
            for (int h = 0; h < 2; ++h) {
                const int o = (8 * nt + mma_b_n(lane, 2 * h)) * NTC_STRIDE + k0 + mma_b_k(lane, 2 * h);
                bh[h] = *(const uint32_t*)&Ph[o];
                bl[h] = *(const uint32_t*)&Pl[o];
            }
            mma_bf16_16816(acc[nt], al, bh, acc[nt]);
            mma_bf16_16816(acc[nt], ah, bl, acc[nt]);
            mma_bf16_16816(acc[nt], ah, bh, acc[nt]);
        }
    }
}

extern "C" __global__ void __launch_bounds__(NTC_THREADS) infonce_tc_row_lse(const bf16* hi, const bf16* lo, int n, int d, float inv_t, double* lse, double* diag) {
    __shared__ __align__(16) bf16 Ph[NTC_COLS * NTC_STRIDE];
    __shared__ __align__(16) bf16 Pl[NTC_COLS * NTC_STRIDE];
    const int v = blockIdx.y, warp = threadIdx.x / 32, lane = lane_id();
    const int row0 = blockIdx.x * NTC_ROWS + 16 * warp;
    const bf16 *Xh = hi + (i64)v * n * d, *Xl = lo + (i64)v * n * d;
    // This lane's rows: row0 + mma_c_row(lane, 2 r), r = 0, 1; (max, sum) over its columns.
    float m[2] = {-INFINITY, -INFINITY}, s[2] = {0.f, 0.f};
    for (int p = 0; p < 2; ++p) {
        for (int j0 = 0; j0 < n; j0 += NTC_COLS) {
            ntc_stage_tile(Ph, Pl, hi, lo, p, j0, n, d);
            float acc[8][4];
            ntc_scores(Xh, Xl, row0, n, d, Ph, Pl, acc);
            __syncthreads();  // the tile is restaged next
            for (int r = 0; r < 2; ++r) {
                const int i = row0 + mma_c_row(lane, 2 * r);
                float x[16];
                float tmax = -INFINITY;
                for (int nt = 0; nt < 8; ++nt)
                    for (int h = 0; h < 2; ++h) {
                        const int e = 2 * r + h, j = j0 + 8 * nt + mma_c_col(lane, e);
                        float val = acc[nt][e] * inv_t;
                        if (v == 0 && p == 1 && i == j && i < n) diag[i] = (double)val;
                        if (i >= n || j >= n || (p == v && i == j)) val = -INFINITY;
                        x[2 * nt + h] = val;
                        tmax = fmaxf(tmax, val);
                    }
                if (tmax == -INFINITY) continue;
                const float mn = fmaxf(m[r], tmax);
                float sum = s[r] * expf(m[r] - mn);
                for (int q = 0; q < 16; ++q) sum += expf(x[q] - mn);
                m[r] = mn;
                s[r] = sum;
            }
        }
    }
    // The 4 lanes of a row differ in lane bits 0 and 1: merge in f64, fixed butterfly.
    for (int r = 0; r < 2; ++r) {
        double mm = m[r], ss = s[r];
        for (int o = 1; o < 4; o <<= 1) {
            const double mo = __shfl_xor_sync(0xffffffffu, mm, o);
            const double so = __shfl_xor_sync(0xffffffffu, ss, o);
            const double mx = fmax(mm, mo);
            ss = (mx == -INFINITY) ? 0.0 : ss * exp(mm - mx) + so * exp(mo - mx);
            mm = mx;
        }
        const int i = row0 + mma_c_row(lane, 2 * r);
        if ((lane & 3) == 0 && i < n) lse[(i64)v * n + i] = mm + log(ss);
    }
}

// Two bf16 halves of the split of (a, b): hi = (bf16(a), bf16(b)), lo = the remainders.
__device__ __forceinline__ void ntc_split_pair(float a, float b, uint32_t* hi, uint32_t* lo) {
    const bf16 ha = __float2bfloat16_rn(a), hb = __float2bfloat16_rn(b);
    *hi = pack_bf16x2(ha, hb);
    *lo = pack_bf16x2(__float2bfloat16_rn(a - __bfloat162float(ha)), __float2bfloat16_rn(b - __bfloat162float(hb)));
}

extern "C" __global__ void __launch_bounds__(NTC_THREADS) infonce_tc_backward(const bf16* hi, const bf16* lo, const float* e1, const float* e2, int n, int d, float inv_t,
                                                                               const double* lse, const float* dloss, float* de1, float* de2) {
    __shared__ __align__(16) bf16 Ph[NTC_COLS * NTC_STRIDE];
    __shared__ __align__(16) bf16 Pl[NTC_COLS * NTC_STRIDE];
    const int v = blockIdx.y, warp = threadIdx.x / 32, lane = lane_id();
    const int row0 = blockIdx.x * NTC_ROWS + 16 * warp;
    const bf16 *Xh = hi + (i64)v * n * d, *Xl = lo + (i64)v * n * d;
    const int dtiles = d / 8;
    float out[NTC_D / 8][4];
#pragma unroll
    for (int t = 0; t < NTC_D / 8; ++t)
        for (int e = 0; e < 4; ++e) out[t][e] = 0.f;
    float lse_i[2];
    for (int r = 0; r < 2; ++r) {
        const int i = row0 + mma_c_row(lane, 2 * r);
        lse_i[r] = i < n ? (float)lse[(i64)v * n + i] : 0.f;
    }
    for (int p = 0; p < 2; ++p) {
        for (int j0 = 0; j0 < n; j0 += NTC_COLS) {
            ntc_stage_tile(Ph, Pl, hi, lo, p, j0, n, d);
            float acc[8][4];
            ntc_scores(Xh, Xl, row0, n, d, Ph, Pl, acc);
            // The weights, in place of the logits.
            for (int nt = 0; nt < 8; ++nt)
                for (int e = 0; e < 4; ++e) {
                    const int i = row0 + mma_c_row(lane, e), j = j0 + 8 * nt + mma_c_col(lane, e);
                    float w = 0.f;
                    if (i < n && j < n && !(p == v && i == j)) {
                        const float x = acc[nt][e] * inv_t;
                        w = expf(x - lse_i[e >> 1]) + expf(x - (float)lse[(i64)p * n + j]);
                    }
                    acc[nt][e] = w;
                }
            // out += W (16 x 64) . P_tile (64 x d), k-steps of 16 tile columns. Unrolled: acc
            // is indexed by q, and a run-time index would put acc on the stack.
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                uint32_t wh[4], wl[4];
                ntc_split_pair(acc[2 * q][0], acc[2 * q][1], &wh[0], &wl[0]);
                ntc_split_pair(acc[2 * q][2], acc[2 * q][3], &wh[1], &wl[1]);
                ntc_split_pair(acc[2 * q + 1][0], acc[2 * q + 1][1], &wh[2], &wl[2]);
                ntc_split_pair(acc[2 * q + 1][2], acc[2 * q + 1][3], &wh[3], &wl[3]);
#pragma unroll
                for (int t = 0; t < NTC_D / 8; ++t) {
                    if (t >= dtiles) break;
                    uint32_t bh[2], bl[2];
                    for (int h = 0; h < 2; ++h) {
                        // B[k][c] = P_tile[16 q + k][8 t + c]: two rows per register.
                        const int o = (16 * q + mma_b_k(lane, 2 * h)) * NTC_STRIDE + 8 * t + mma_b_n(lane, 2 * h);
                        bh[h] = pack_bf16x2(Ph[o], Ph[o + NTC_STRIDE]);
                        bl[h] = pack_bf16x2(Pl[o], Pl[o + NTC_STRIDE]);
                    }
                    mma_bf16_16816(out[t], wl, bh, out[t]);
                    mma_bf16_16816(out[t], wh, bl, out[t]);
                    mma_bf16_16816(out[t], wh, bh, out[t]);
                }
            }
            __syncthreads();  // the tile is restaged next
        }
    }
    const float g = dloss ? dloss[0] : 1.f;
    const float k = 0.5f * inv_t / (float)n, diag_k = inv_t / (float)n;
    const float* other = v == 0 ? e2 : e1;
    float* dst = v == 0 ? de1 : de2;
#pragma unroll
    for (int t = 0; t < NTC_D / 8; ++t) {
        if (t >= dtiles) break;
        for (int e = 0; e < 4; ++e) {
            const int i = row0 + mma_c_row(lane, e), col = 8 * t + mma_c_col(lane, e);
            if (i < n) dst[(i64)i * d + col] = g * (k * out[t][e] - diag_k * other[(i64)i * d + col]);
        }
    }
}
